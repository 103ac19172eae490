"""The results contract: every run writes ``metrics.json`` (final numbers) and ``log_history.jsonl`` (one JSON
object per logging step), so that tests, sweeps and reports read numbers instead of console logs."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from transformers import TrainerCallback

METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.jsonl"


def _jsonable(value: Any) -> Any:
    """Turns tensors, numpy scalars and non-finite floats into plain JSON values (NaN/inf become null)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def write_metrics(output_dir: str, metrics: Mapping[str, Any], merge: bool = True) -> str:
    """Writes (or merges into) ``<output_dir>/metrics.json`` and returns its path.

    Merging lets a recipe add evaluation numbers after training without losing the training summary.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, METRICS_FILE)
    current: dict[str, Any] = {}
    if merge and os.path.isfile(path):
        with open(path) as f:
            current = json.load(f)
    current.update(_jsonable(dict(metrics)))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # never leave a half-written file behind
    return path


def read_metrics(output_dir: str) -> dict[str, Any]:
    with open(os.path.join(output_dir, METRICS_FILE)) as f:
        return json.load(f)


def read_log_history(output_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(output_dir, LOG_HISTORY_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ResultsCallback(TrainerCallback):
    """Appends every ``on_log`` record (with its global step) to ``log_history.jsonl``, from the main process only.

    Appending as we go (rather than dumping ``state.log_history`` at the end) keeps the numbers of a run that crashes
    or is stopped early. A resumed run appends to the same file.
    """

    def __init__(self, output_dir: str | None = None):
        self.output_dir = output_dir

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        output_dir = self.output_dir or args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(output_dir, LOG_HISTORY_FILE), "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

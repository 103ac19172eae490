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


def write_experiment_files(
    output_dir: str, stem: str, markdown: str, plot: Any, metrics: Mapping[str, Any]
) -> dict[str, str]:
    """An experiment's three views of its numbers: ``<stem>.md`` (the table), ``<stem>.png`` (``plot(path)`` draws it)
    and ``metrics.json`` (replaced, not merged: it is the experiment's whole result). Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"table": os.path.join(output_dir, f"{stem}.md"), "plot": os.path.join(output_dir, f"{stem}.png")}
    with open(paths["table"], "w") as f:
        f.write(markdown)
    plot(paths["plot"])
    paths["metrics"] = write_metrics(output_dir, metrics, merge=False)
    return paths


def experiment_file_lines(output_dir: str, stem: str, runs: str) -> list[str]:
    """The console lines that say where :func:`write_experiment_files` put an experiment's views, and its runs'
    logs (``runs``: their folders, e.g. ``runs/<trainer>_seed<k>/``)."""
    return [f"table: {os.path.join(output_dir, f'{stem}.md')}", f"plot: {os.path.join(output_dir, f'{stem}.png')}",
            f"numbers: {os.path.join(output_dir, METRICS_FILE)}; each run's log: {runs}"]


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
    or is stopped early; a resumed run appends to the same file. A record is written at the next event (step end,
    save, next log, train end) rather than at once: callbacks that run after this one may still add keys to the same
    ``logs`` dict (e.g. the KL controller adds ``kl_coef``), and those belong in the file too.
    """

    def __init__(self, output_dir: str | None = None):
        self.output_dir = output_dir
        self._pending: tuple[str, dict[str, Any], dict[str, Any]] | None = None

    def flush(self) -> None:
        """Writes the record held back (see the class docstring), if any."""
        if self._pending is None:
            return
        output_dir, header, logs = self._pending
        self._pending = None
        record = {**header, **logs}
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, LOG_HISTORY_FILE), "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.flush()
        if not state.is_world_process_zero or not logs:
            return
        # keep a reference to the live dict (not a copy): later callbacks' additions are written too
        header = {"step": state.global_step, "epoch": state.epoch}
        self._pending = (self.output_dir or args.output_dir, header, logs)

    def on_step_end(self, args, state, control, **kwargs):
        self.flush()

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

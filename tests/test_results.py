"""The results contract: metrics.json merges, log_history.jsonl gets every record, including keys added by later
callbacks, and only from the main process."""

import math
from types import SimpleNamespace

import torch

from hf_rlhf_ext.results import ResultsCallback, read_log_history, read_metrics, write_metrics


def _state(step, main=True):
    return SimpleNamespace(global_step=step, epoch=step / 10, is_world_process_zero=main)


def test_write_metrics_merges_and_cleans_values(tmp_path):
    write_metrics(tmp_path, {"a": 1, "t": torch.tensor(2.5)})
    write_metrics(tmp_path, {"b": float("nan"), "nested": {"x": math.inf}})
    m = read_metrics(tmp_path)
    assert m == {"a": 1, "t": 2.5, "b": None, "nested": {"x": None}}
    write_metrics(tmp_path, {"c": 3}, merge=False)
    assert read_metrics(tmp_path) == {"c": 3}


def test_results_callback_records_keys_added_by_later_callbacks(tmp_path):
    cb = ResultsCallback()
    args = SimpleNamespace(output_dir=str(tmp_path))
    logs = {"loss": 1.0}
    cb.on_log(args, _state(1), None, logs=logs)
    logs["kl_coef"] = 0.2  # a callback after this one adds a key to the same dict
    cb.on_step_end(args, _state(2), None)
    cb.on_log(args, _state(2), None, logs={"loss": 0.5})
    cb.on_train_end(args, _state(2), None)
    rows = read_log_history(tmp_path)
    assert rows == [{"step": 1, "epoch": 0.1, "loss": 1.0, "kl_coef": 0.2}, {"step": 2, "epoch": 0.2, "loss": 0.5}]


def test_results_callback_writes_from_main_process_only(tmp_path):
    cb = ResultsCallback(str(tmp_path))
    cb.on_log(SimpleNamespace(output_dir="unused"), _state(1, main=False), None, logs={"loss": 1.0})
    cb.on_train_end(None, _state(1, main=False), None)
    assert not (tmp_path / "log_history.jsonl").exists()

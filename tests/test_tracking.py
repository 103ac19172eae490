"""Trackers (``--report_to``): a recipe run with TensorBoard writes the reward and KL curves and the held-out
evaluation before and after training, read back with TensorBoard's own ``EventAccumulator``; a run with Trackio
(local mode, no Space) writes the same training curves into its local database, read back with ``sqlite3``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from _ppo_helpers import build_world, prompts
from _recipe_helpers import run_recipe

from hf_rlhf_ext.results import read_log_history, read_metrics

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'hf-rlhf-ext[tracking]'")
ROOT = Path(__file__).resolve().parents[1]



_run = run_recipe


def _scalars(root: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in root.rglob("events.out.tfevents*"):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return out


def test_ppo_run_with_tensorboard_holds_reward_and_kl_curves_and_the_held_out_evaluation(tmp_path):
    world = build_world(str(tmp_path / "world"))
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(16)["prompt"]))
    out = tmp_path / "run"
    _run("ppo", ["--model_name_or_path", world["policy"], "--dataset_name", str(data),
                 "--reward_funcs", "_ppo_helpers.target_word", "test_sweeps.word_count", "--reward_weights", "1", "0",
                 "--output_dir", str(out), "--max_steps", "3", "--num_ppo_epochs", "1",  # a generation per step
                 "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--logging_steps", "1",
                 "--num_eval_prompts", "4", "--disable_tqdm", "true", "--report_to", "tensorboard",
                 "--monitor", "overoptimization,kl", "--monitor_every_n_steps", "1", "--monitor_num_samples", "4"])
    scalars = _scalars(out)
    logs = {r["step"]: r for r in read_log_history(str(out)) if "objective/kl" in r}
    assert sorted(logs) == [1, 2, 3]
    for key in ("rewards/target_word/mean", "objective/kl", "kl"):
        tag = f"train/{key}"  # transformers' TensorBoard callback files training logs under train/
        assert set(scalars[tag]) == {1, 2, 3}, tag
        assert all(scalars[tag][s] == pytest.approx(logs[s][key], rel=1e-5, abs=1e-7) for s in logs), tag
    # the monitors' values reach the tracker at the step they were measured (monitors run ahead of the trackers)
    for key in ("kl_ref/k3_seq", "overopt/gold"):
        measured = {r["step"]: r[key] for r in read_log_history(str(out)) if key in r and r["step"] > 0}
        assert sorted(measured) == [1, 2, 3] and set(scalars[f"train/{key}"]) == {1, 2, 3}, key
        assert all(scalars[f"train/{key}"][s] == pytest.approx(measured[s], rel=1e-5) for s in measured), key
    metrics = read_metrics(str(out))
    # the evaluation before training at step 0, after training at the last step
    assert scalars["eval/target_word"][0] == pytest.approx(metrics["eval_before"]["target_word"])
    assert scalars["eval/target_word"][3] == pytest.approx(metrics["eval_after"]["target_word"])
    assert scalars["eval/kl_k3_to_reference"][3] == pytest.approx(metrics["kl_k3_after"])


def _trackio_metrics(trackio_dir: Path, project: str) -> dict[int, dict[str, float]]:
    """step -> the metrics logged at that step, from Trackio's local SQLite database of ``project``."""
    with sqlite3.connect(trackio_dir / f"{project}.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics").fetchall()
    out: dict[int, dict[str, float]] = {}
    for step, metrics in rows:
        out.setdefault(step, {}).update(json.loads(metrics))
    return out


def test_ppo_run_with_trackio_logs_the_training_curves_locally(tmp_path):
    """``--report_to trackio`` offline: Trackio's local mode (no Space), run in its own process so that its storage
    folder (``TRACKIO_DIR``, read once at import) is this test's."""
    pytest.importorskip("trackio", reason="the tracking extra: pip install 'hf-rlhf-ext[tracking]'")
    world = build_world(str(tmp_path / "world"))
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(16)["prompt"]))
    out, store = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "recipes" / "ppo.py"), "--model_name_or_path", world["policy"],
           "--dataset_name", str(data), "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out),
           "--max_steps", "3", "--num_ppo_epochs", "1", "--per_device_train_batch_size", "4",
           "--max_completion_length", "6",
           "--logging_steps", "1", "--num_eval_prompts", "4", "--disable_tqdm", "true", "--report_to", "trackio",
           "--project", "hf-rlhf-ext-test", "--run_name", "ppo-tiny"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    logged = _trackio_metrics(store, "hf-rlhf-ext-test")
    logs = {r["step"]: r for r in read_log_history(str(out)) if "objective/kl" in r}
    assert sorted(logs) == [1, 2, 3]
    for key in ("rewards/target_word/mean", "objective/kl", "kl"):
        tracked = {step: m[f"train/{key}"] for step, m in logged.items() if f"train/{key}" in m}
        assert sorted(tracked) == [1, 2, 3], key
        assert all(tracked[s] == pytest.approx(logs[s][key], rel=1e-5, abs=1e-7) for s in logs), key

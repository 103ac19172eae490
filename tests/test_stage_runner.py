"""Stages side by side: each in a worker process, its output in its own log, its result stored as it finishes and
reused by a later run with the same fingerprint; a failing stage names itself and its log."""

import json
import os
from functools import partial

import pytest

from hf_rlhf_ext.experiments.report import StageStore
from hf_rlhf_ext.experiments.stage_runner import StageJob, run_stages, worker_threads


def _stage(value: int, out: str) -> dict:
    import torch

    print(f"stage output {value}")
    with open(os.path.join(out, "calls.txt"), "a") as f:
        f.write("x")
    return {"value": value, "pid": os.getpid(), "threads": torch.get_num_threads()}


def _failing(out: str) -> dict:
    raise RuntimeError("this stage broke")


def _jobs(*values: int) -> list[StageJob]:
    return [StageJob(f"s{v}", {"stage": f"s{v}"}, partial(_stage, v)) for v in values]


def test_stages_side_by_side_run_in_workers_with_their_output_in_their_logs(tmp_path, capfd):
    store = StageStore(str(tmp_path))
    seen = []
    results = run_stages(store, _jobs(1, 2, 3), max_parallel=2, on_done=lambda job, r, reused: seen.append(reused))
    assert {name: r["value"] for name, r in results.items()} == {"s1": 1, "s2": 2, "s3": 3}
    assert all(r["pid"] != os.getpid() for r in results.values())  # not in this process
    assert {r["threads"] for r in results.values()} == {worker_threads(2)}
    assert seen == [False] * 3
    for v in (1, 2, 3):
        assert f"stage output {v}" in (tmp_path / f"s{v}" / "stage.log").read_text()
        assert json.loads((tmp_path / "stages" / f"s{v}.json").read_text())["value"] == v
    assert "stage output" not in capfd.readouterr().out  # the console gets no stage's output

    again = run_stages(StageStore(str(tmp_path)), _jobs(1, 2, 3), max_parallel=2,
                       on_done=lambda job, r, reused: seen.append(reused))
    assert seen[3:] == [True] * 3 and (tmp_path / "s1" / "calls.txt").read_text() == "x"  # reused, not rerun
    assert {name: r["value"] for name, r in again.items()} == {"s1": 1, "s2": 2, "s3": 3}


def test_one_after_another_runs_here_with_the_output_on_the_console(tmp_path, capfd):
    results = run_stages(StageStore(str(tmp_path)), _jobs(1, 2), max_parallel=1)
    assert all(r["pid"] == os.getpid() for r in results.values())
    assert "stage output 1" in capfd.readouterr().out


def test_a_failing_stage_names_itself_and_its_log_and_the_others_are_kept(tmp_path):
    jobs = [StageJob("broken", {"stage": "broken"}, _failing), *_jobs(1)]
    with pytest.raises(RuntimeError, match="this stage broke") as err:
        run_stages(StageStore(str(tmp_path)), jobs, max_parallel=2)
    assert any("'broken'" in note and "stage.log" in note for note in err.value.__notes__)
    assert (tmp_path / "stages" / "s1.json").is_file() and not (tmp_path / "stages" / "broken.json").exists()


def test_worker_threads_share_the_cores():
    cores = os.cpu_count() or 1
    assert worker_threads(1) == cores and worker_threads(cores) == 1 and worker_threads(4 * cores) == 1

"""The one process runner of the experiments (hf_rlhf_ext.experiments.grid): in this process, in worker processes (one
fresh process per job too), as Ray tasks; a failing job surfaces its own error; the results file resumes."""

from __future__ import annotations

import json
import os

import pytest

from hf_rlhf_ext.experiments.grid import ResultsFile, run_grid


def square(job: int) -> dict:
    return {"job": job, "value": job * job, "pid": os.getpid(), "env": os.environ.get("HF_RLHF_EXT_GRID_TEST"),
            "stale": os.environ.get("HF_RLHF_EXT_GRID_STALE")}


def fail_on_three(job: int) -> dict:
    if job == 3:
        raise ValueError(f"job {job} is broken")
    return square(job)


def test_in_this_process_in_order_with_on_result():
    seen = []
    results = run_grid([3, 1, 2], square, on_result=lambda job, r: seen.append((job, r["value"])))
    assert [r["value"] for r in results] == [9, 1, 4]
    assert seen == [(3, 9), (1, 1), (2, 4)]
    assert {r["pid"] for r in results} == {os.getpid()}


def test_parallel_workers_return_results_in_job_order_under_the_current_environment(monkeypatch):
    monkeypatch.setenv("HF_RLHF_EXT_GRID_STALE", "from an older environment")
    run_grid([0, 1], square, max_parallel=2)  # the fork server starts with this environment
    monkeypatch.setenv("HF_RLHF_EXT_GRID_TEST", "set just now")
    monkeypatch.delenv("HF_RLHF_EXT_GRID_STALE")
    seen = []
    results = run_grid(list(range(5)), square, max_parallel=2, on_result=lambda job, r: seen.append(job))
    assert [r["value"] for r in results] == [0, 1, 4, 9, 16]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert os.getpid() not in {r["pid"] for r in results}
    assert {(r["env"], r["stale"]) for r in results} == {("set just now", None)}


def test_isolated_and_fresh_process_jobs():
    alone = run_grid([1, 2], square, isolate=True, start_method="spawn")
    assert os.getpid() not in {r["pid"] for r in alone}
    fresh = run_grid([1, 2, 3], square, fresh_process=True, start_method="spawn")
    assert len({r["pid"] for r in fresh}) == 3  # one new process per job


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_failing_job_raises_its_own_error_naming_the_job(parallel):
    seen = []
    with pytest.raises(ValueError, match="job 3 is broken") as info:
        run_grid([1, 3, 2], fail_on_three, max_parallel=parallel, on_result=lambda job, r: seen.append(job))
    assert any("grid job 3" in note for note in getattr(info.value, "__notes__", []))
    assert 1 in seen  # a job finished before the failure keeps its result


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        run_grid([1], square, backend="slurm")
    with pytest.raises(ValueError, match="max_parallel must be >= 1"):
        run_grid([1], square, max_parallel=0)
    with pytest.raises(ValueError, match="job_key"):
        run_grid([1], square, results=object())


def test_the_results_file_resumes_and_keeps_finished_jobs_of_a_failed_grid(tmp_path):
    path = str(tmp_path / "results.jsonl")
    config = {"settings": {"power": 2}}
    store = ResultsFile(path, config, key=lambda r: r["job"])
    with pytest.raises(ValueError, match="job 3 is broken"):
        run_grid([1, 2, 3, 4], fail_on_three, results=store, job_key=lambda job: job)
    lines = [json.loads(line) for line in open(path)]
    assert lines[0]["header"] is True and [r["job"] for r in lines[1:]] == [1, 2]  # written as they finished
    assert all(r["fingerprint"] == lines[0]["fingerprint"] for r in lines[1:])
    ran = []
    store = ResultsFile(path, config, key=lambda r: r["job"])

    def record(job):
        ran.append(job)
        return square(job)

    results = run_grid([1, 2, 3, 4], record, results=store, job_key=lambda job: job)
    assert ran == [3, 4]  # only the jobs not in the file
    assert [r["value"] for r in results] == [1, 4, 9, 16]
    with open(path, "a") as f:
        f.write('{"job": 5, "val')  # a kill in the middle of a write
    store = ResultsFile(path, config, key=lambda r: r["job"])
    assert sorted(store.done) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different config"):
        ResultsFile(path, {"settings": {"power": 3}}, key=lambda r: r["job"])


@pytest.mark.slow
def test_ray_tasks():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
    try:
        assert [r["value"] for r in run_grid([2, 3], square, backend="ray")] == [4, 9]
        with pytest.raises(ValueError, match="job 3 is broken"):
            run_grid([1, 3], fail_on_three, backend="ray")
    finally:
        ray.shutdown()

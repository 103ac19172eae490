"""Running a pipeline's stages: one after another in this process, or independent stages side by side in worker
processes (``max_parallel``), each stage's result kept by a ``StageStore`` as soon as it finishes.

Side by side pays on a small machine because most stages are a single process of small matrix products, which one
core runs almost as fast as two: two stages on two cores take about the time of the longer, where one stage on two
cores takes nearly its own time. Each worker gets ``cpu_count // max_parallel`` torch threads, and a stage's console
output goes to ``<output_dir>/<stage>/stage.log`` so that two stages' progress bars do not interleave.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .grid import run_grid
from .report import StageStore

__all__ = ["StageJob", "run_stages", "worker_threads"]

PRELOAD = ("torch", "transformers", "trl")


@dataclass(frozen=True)
class StageJob:
    """One stage to run: ``run(stage_dir)`` gives its result (picklable: a module-level function, or a
    ``functools.partial`` of one, for the worker processes)."""

    name: str
    fingerprint: dict[str, Any]
    run: Callable[[str], dict[str, Any]]


def worker_threads(max_parallel: int) -> int:
    """Torch threads for each of ``max_parallel`` workers sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max_parallel)


def run_stages(store: StageStore, jobs: Sequence[StageJob], max_parallel: int = 1,
               on_done: Callable[[StageJob, dict[str, Any], bool], None] | None = None) -> dict[str, Any]:
    """``{name: result}`` for every job: its stored result when its fingerprint matches, otherwise run and stored.
    ``on_done(job, result, reused)`` is called here as each finishes. With ``max_parallel > 1`` the jobs run in that
    many worker processes, longest first as given; a failing stage lets the running ones finish (their results are
    kept), then its error is raised."""
    results: dict[str, Any] = {}

    def done(job: StageJob, outcome: tuple[dict[str, Any], bool]) -> None:
        results[job.name] = outcome[0]
        if on_done is not None:
            on_done(job, *outcome)

    stored = {job.name: store.load(job.name, job.fingerprint) for job in jobs}
    for job in jobs:
        if stored[job.name] is not None:
            done(job, (stored[job.name], True))
    todo = [job for job in jobs if stored[job.name] is None]
    if max_parallel <= 1 or len(todo) <= 1:
        for job in todo:
            done(job, store.run(job.name, job.run, job.fingerprint))
        return results
    worker = _Worker(store, worker_threads(max_parallel))
    run_grid(todo, worker, max_parallel=max_parallel, isolate=True, preload=PRELOAD, on_result=done,
             name=lambda job: f"stage {job.name!r} (its log: {worker.log_path(job)})")
    return results


class _Worker:
    """Runs one stage in a worker process, its output going to the stage's log file."""

    def __init__(self, store: StageStore, threads: int) -> None:
        self.store, self.threads = store, threads

    def log_path(self, job: StageJob) -> str:
        return os.path.join(self.store.output_dir, job.name, "stage.log")

    def __call__(self, job: StageJob) -> tuple[dict[str, Any], bool]:
        import torch

        torch.set_num_threads(self.threads)
        os.makedirs(os.path.dirname(self.log_path(job)), exist_ok=True)
        with open(self.log_path(job), "a") as log:
            return _with_output_to(log.fileno(), lambda: self.store.run(job.name, job.run, job.fingerprint))


def _with_output_to(fd: int, func: Callable[[], Any]) -> Any:
    """``func()`` with file descriptors 1 and 2 (this process's and its children's stdout and stderr) sent to ``fd``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        return func()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])

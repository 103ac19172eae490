"""The one process runner of the experiments: a list of jobs (picklable Python objects) and the function that runs one,
run here one after the other, in parallel worker processes, or as Ray tasks; optionally resumable through a results
file that keeps every finished job.

    results = run_grid(points, train_point, max_parallel=2, preload=["torch", "trl"])

Backends:

* ``local``, ``max_parallel == 1`` and not ``isolate``: in this process, in order (a monkeypatched ``run_one`` is seen);
* ``local`` otherwise: ``max_parallel`` worker processes. Each job runs under this process's environment as it is when
  the grid starts (a fork server may predate a variable set since). Workers are forked from a fork server that
  preloaded ``preload`` (POSIX; plain ``fork`` of a process that has started torch threads is unsafe), or spawned
  (``start_method="spawn"``, or where there is no fork server). ``fresh_process``: one new process per job (a job's
  peak memory is then its own);
* ``ray``: one Ray task per job with ``cpus_per_job`` / ``gpus_per_job``, on the running Ray cluster (or a local one).

A failing job: the jobs not yet started are not started, those running finish (their results still reach
``on_result`` and the results file), then the job's own exception is raised, with a note naming the job.

Resumable results (``ResultsFile``): a JSON-lines file whose first line holds the fingerprint of the config the results
depend on; one line per finished job, written as soon as it finishes and synced, so a kill leaves at most one
truncated last line, which the next run drops. A file written with another config is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Hashable, Sequence

from ..validation import InputError

__all__ = [
    "BACKENDS",
    "run_grid",
    "ResultsFile",
    "read_results",
    "append_result",
    "config_fingerprint",
    "worker_context",
    "parse_keeping_kwargs",
]

BACKENDS = ("local", "ray")


# ----------------------------------------------------------------------------------------------------------------------
# Resumable results: a header line with the config fingerprint, then one line per finished job
# ----------------------------------------------------------------------------------------------------------------------
def config_fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted({(p, k) for p in set(a) | set(b) for k in set(a.get(p, {})) | set(b.get(p, {}))})
    return [f"{p}.{k}: {a.get(p, {}).get(k)!r} -> {b.get(p, {}).get(k)!r}" for p, k in keys
            if a.get(p, {}).get(k) != b.get(p, {}).get(k)]


def read_results(path: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished jobs of ``path`` (created with a header when missing). A truncated last line (a killed write) is
    cut off the file; a header of another config is refused."""
    fingerprint = config_fingerprint(config)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps({"header": True, "fingerprint": fingerprint, "config": config}) + "\n")
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # after the last "\n": empty, or a line whose write was cut short
    records = []
    for i, line in enumerate(complete):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(complete) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({err}); it is not a truncated last line.") from err
            tail = line  # a cut-off line followed by a newline: drop it the same way
            complete = complete[:-1]
    if tail.strip() or len(records) < len(complete):
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in complete))
        os.replace(path + ".tmp", path)
    header, points = (records[0], records[1:]) if records and records[0].get("header") else (None, records)
    if header is None or header.get("fingerprint") != fingerprint:
        diff = _config_diff(header.get("config", {}), config) if header else ["no header line"]
        raise InputError(
            f"{path} was written by a sweep with a different config (fingerprint "
            f"{header.get('fingerprint') if header else None} vs {fingerprint}): {'; '.join(diff[:8])}. Resume with "
            "the same settings, or give another --output_dir (or remove the file) to start a new sweep."
        )
    return points


def append_result(path: str, result: dict[str, Any]) -> None:
    """One line per job, flushed and synced: a kill leaves at most one truncated last line."""
    from ..results import _jsonable

    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(result)) + "\n")
        f.flush()
        os.fsync(f.fileno())


class ResultsFile:
    """The finished results of a grid, by key: read (and repaired) from ``path`` on construction, one line appended
    per new result. ``key(result)`` names the job a result belongs to; each appended result carries the config's
    ``fingerprint``."""

    def __init__(self, path: str, config: dict[str, Any], key: Callable[[dict[str, Any]], Hashable]) -> None:
        self.path, self.key = path, key
        self.fingerprint = config_fingerprint(config)
        self.done: dict[Hashable, dict[str, Any]] = {key(r): r for r in read_results(path, config)}

    def add(self, result: dict[str, Any]) -> None:
        result["fingerprint"] = self.fingerprint
        append_result(self.path, result)
        self.done[self.key(result)] = result


# ----------------------------------------------------------------------------------------------------------------------
# Jobs as values: a config rebuilt per job from the keyword arguments its parser built it from
# ----------------------------------------------------------------------------------------------------------------------
class _InitKwargs:
    """Stands in for an argument class while a parser builds it: records the keyword arguments it was built from
    (``__post_init__`` derives fields from them, so a config cannot be rebuilt from its attributes)."""

    def __init__(self, cls: type) -> None:
        self.cls, self.kwargs = cls, None
        self.__dataclass_fields__ = cls.__dataclass_fields__

    def __call__(self, **kwargs: Any) -> Any:
        self.kwargs = dict(kwargs)
        return self.cls(**kwargs)


def parse_keeping_kwargs(parser: Any, argv: Sequence[str], position: int,
                         **parse_kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``parser.parse_args_and_config(argv, **parse_kwargs)`` (a ``TrlParser``) and the keyword arguments that build
    its argument class at ``position`` as parsed: ``type(config)(**kwargs, seed=..., ...)`` is then what a parse of
    the command line with those flags added gives, without parsing again. A change the parser made after building it
    (e.g. the LoRA learning-rate rule) is kept in them."""
    import dataclasses

    recorder = _InitKwargs(parser.dataclass_types[position])
    parser.dataclass_types[position] = recorder
    try:
        outputs = parser.parse_args_and_config(args=list(argv), **parse_kwargs)
    finally:
        parser.dataclass_types[position] = recorder.cls
    kwargs, built = dict(recorder.kwargs), outputs[position]
    again = recorder.cls(**kwargs)
    for f in dataclasses.fields(built):
        if f.init and f.name in kwargs and getattr(built, f.name) != getattr(again, f.name):
            kwargs[f.name] = getattr(built, f.name)
    if "output_dir" in kwargs and kwargs["output_dir"] is None:  # not given (TRL's default): the folder the config
        kwargs["output_dir"] = os.path.abspath(built.output_dir)  # chose, where the runs' own folders then go
    return outputs, kwargs


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------
def run_grid(jobs: Sequence[Any], run_one: Callable[[Any], Any], *, backend: str = "local", max_parallel: int = 1,
             on_result: Callable[[Any, Any], None] | None = None, results: ResultsFile | None = None,
             job_key: Callable[[Any], Hashable] | None = None, isolate: bool = False, fresh_process: bool = False,
             start_method: str = "forkserver", preload: Sequence[str] = (), cpus_per_job: float = 1,
             gpus_per_job: float = 0.0, name: Callable[[Any], str] = repr) -> list[Any]:
    """Runs ``run_one(job)`` for every job and returns the results in the order of ``jobs``.

    ``on_result(job, result)`` is called in this process as each job finishes (in the order they finish). With
    ``results`` (and ``job_key``, naming a job as ``results.key`` names its result) the jobs already in the file are
    not run again, and each new result is appended to it before ``on_result``; their stored results are returned.
    ``isolate``: never in this process (a job in its own worker, even alone). ``name(job)`` names a failed job.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}.")
    if results is not None and job_key is None:
        raise ValueError("A results file needs job_key: the key of a job's result, from the job.")
    jobs = list(jobs)
    todo = [j for j in jobs if results is None or job_key(j) not in results.done]
    finished: dict[int, Any] = {}

    def done(i: int, result: Any) -> None:
        if results is not None:
            results.add(result)
        finished[i] = result
        if on_result is not None:
            on_result(todo[i], result)

    if todo:
        if backend == "ray":
            _run_ray(todo, run_one, done, cpus_per_job, gpus_per_job, name)
        elif max_parallel == 1 and not isolate and not fresh_process:
            for i, job in enumerate(todo):
                done(i, _noted(run_one, job, name))
        else:
            _run_processes(todo, run_one, done, max_parallel, fresh_process, start_method, preload, name)
    if results is not None:
        return [results.done[job_key(j)] for j in jobs]
    return [finished[i] for i in range(len(todo))]


def _noted(run_one: Callable, job: Any, name: Callable[[Any], str]) -> Any:
    try:
        return run_one(job)
    except Exception as err:
        err.add_note(f"(in the grid job {_short(name, job)})")
        raise


def _short(name: Callable[[Any], str], job: Any) -> str:
    text = name(job)
    return text if len(text) <= 200 else text[:197] + "..."


def _call_in_env(env: dict[str, str], func: Callable, *args: Any) -> Any:
    """``func(*args)`` under the caller's environment as it was when the grid started, not as it was when the fork
    server started."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)
    return func(*args)


def worker_context(start_method: str = "forkserver", preload: Sequence[str] = ()):
    """Workers forked from a fork server that preloaded ``preload`` (POSIX), else spawned. Plain ``fork`` of this
    process is unsafe once torch has started threads; the fork server is a fresh single-threaded process. The preload
    takes effect when the fork server starts (once per process)."""
    import multiprocessing

    if start_method != "forkserver" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx


def _run_processes(todo: list, run_one: Callable, done: Callable, max_parallel: int, fresh_process: bool,
                   start_method: str, preload: Sequence[str], name: Callable[[Any], str]) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    extra = {"max_tasks_per_child": 1} if fresh_process else {}
    error: BaseException | None = None
    pool = ProcessPoolExecutor(max_workers=min(max_parallel, len(todo)),
                               mp_context=worker_context(start_method, preload), **extra)
    try:
        env = dict(os.environ)  # the fork server may predate it (e.g. a variable set for this grid only)
        pending = {pool.submit(_call_in_env, env, run_one, job): i for i, job in enumerate(todo)}
        while pending:
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                i = pending.pop(future)
                if future.cancelled():
                    continue
                err = future.exception()
                if err is None:
                    done(i, future.result())
                elif error is None:
                    err.add_note(f"(in the grid job {_short(name, todo[i])})")
                    error = err
                    for other in pending:  # not started yet: not started at all; the running ones finish
                        other.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error


def _call(func: Callable, *args: Any) -> Any:
    return func(*args)


def _run_ray(todo: list, run_one: Callable, done: Callable, cpus: float, gpus: float,
             name: Callable[[Any], str]) -> None:
    """One Ray task per job; uses the running Ray cluster (or starts a local one)."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("--backend ray needs Ray: pip install 'hf-rlhf-ext[ray]'.") from err
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_call)  # run_one may be any callable (a partial, an object)
    pending = {task.remote(run_one, job): i for i, job in enumerate(todo)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as err:
            for ref in pending:
                ray.cancel(ref)
            err.add_note(f"(in the grid job {_short(name, todo[i])})")
            raise
        done(i, result)

"""Speed-up of the β sweep's parallel points: the points run 2 at a time (--max_parallel 2, spawned processes, one torch
thread each) against the same points one after the other in this process (--max_parallel 1), on the lab.

Repeats are interleaved (the order of the two modes alternates) after one untimed warm-up of each; the report gives
the median and min–max of each mode's wall time and of the per-repeat ratio, and the points' own seconds (measured
inside each point), which separate the cost of two points sharing the machine from the cost of starting the workers.

    python benchmarks/sweep_parallel.py --betas 0 0.005 0.02 0.05 0.2 1.0     # the default grid: the target
    python benchmarks/sweep_parallel.py                                        # 2 points: one per worker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_once(max_parallel: int, max_steps: int, betas: list[str]) -> tuple[float, list[float]]:
    """(wall seconds of a sweep over ``betas``, the points' own seconds)."""
    from hf_rlhf_ext.experiments.sweeps import RESULTS_FILE, run_sweep

    with tempfile.TemporaryDirectory() as out:
        argv = ["--betas", *betas, "--max_steps", str(max_steps), "--eval_every", "10", "--num_eval_prompts", "64",
                "--max_parallel", str(max_parallel), "--output_dir", out]
        start = time.perf_counter()
        run_sweep(argv, progress=False)
        wall = time.perf_counter() - start
        with open(os.path.join(out, RESULTS_FILE)) as f:
            points = [json.loads(line)["seconds"] for line in f if '"curve"' in line]
    return wall, points


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_steps", type=int, default=60, help="GRPO steps per point (the sweep's default)")
    parser.add_argument("--betas", nargs="+", default=["0", "1.0"],
                        help="the grid; the default sweep's is 0 0.005 0.02 0.05 0.2 1.0 (3 points per worker)")
    args = parser.parse_args()
    import contextlib
    import io

    import torch

    print(f"# sweep_parallel: {len(args.betas)} GRPO lab points (β {' '.join(args.betas)}) of {args.max_steps} steps; "
          f"{os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, Python {platform.python_version()}; {args.repeats} interleaved repeats")
    times: dict[int, list[float]] = {1: [], 2: []}
    point_secs: dict[int, list[float]] = {1: [], 2: []}
    quiet = contextlib.redirect_stdout(io.StringIO())
    for repeat in range(-1, args.repeats):  # repeat -1: warm-up, not counted
        order = (1, 2) if repeat % 2 == 0 else (2, 1)
        for mode in order:
            with quiet:
                wall, points = run_once(mode, args.max_steps, args.betas)
            if repeat >= 0:
                times[mode].append(wall)
                point_secs[mode].extend(points)
                print(f"repeat {repeat} max_parallel={mode}: {wall:.2f} s "
                      f"(points {', '.join(f'{p:.2f}' for p in points)} s)")
    ratios = [a / b for a, b in zip(times[1], times[2])]
    print(f"one at a time  : {spread(times[1])} s")
    print(f"2 in parallel  : {spread(times[2])} s")
    print(f"speed-up       : {spread(ratios)}x")
    print(f"point seconds  : alone {spread(point_secs[1])}, two at once {spread(point_secs[2])}")
    if len(args.betas) == 2:
        startup = [b - max(p) for b, p in zip(times[2], [point_secs[2][i:i + 2]
                                                         for i in range(0, len(point_secs[2]), 2)])]
        print(f"parallel wall − slower point (worker start-up: spawn + imports): {spread(startup)} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

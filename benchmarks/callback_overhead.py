"""Time-per-step overhead of the monitoring callbacks on GRPO in the lab: all callbacks on vs off, side by side.

    OMP_NUM_THREADS=1 python benchmarks/callback_overhead.py [--steps 60] [--repeats 3] [--every 10]

Each repeat trains the same GRPO run (lab policy, lab proxy RM + gold tracked at weight 0, 32 completions per step,
G = 8, 32 tokens, β = 0.02) twice — without callbacks and with all of them measuring every ``--every`` steps:
``KLToReferenceCallback`` (default sample count: one generation batch, 32 held-out completions),
``GroupAdvantageCheckCallback`` and ``OveroptimizationCallback`` (logs mode, peak checkpoint and forecast on,
logging every ``--every`` steps) — alternating which goes first. The callbacks sample under a forked RNG, so both runs
draw the same training samples and do the same work; the script checks that. Time per step is measured from the
start of step ``--warmup`` + 1 to the end of training, so it includes everything the callbacks do. Prints per-repeat
wall-clock and CPU-time ratios and their medians (target ≤ 1.05), and the ratio implied by the CPU time spent inside
the callbacks' hooks (on / (on − inside)) with each callback's share. On a shared or virtual machine the time per step
of two identical runs can differ by ±15%, so the whole-run ratios are noisy; the inside ratio compares the callbacks'
work with the training steps of the same run and is the number to read.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall and CPU time from the beginning of step ``warmup + 1`` to the end of the last step (callbacks' work
    included). CPU time of this process (one thread) is far less sensitive to other jobs on a shared machine."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.end = (time.perf_counter(), time.process_time())
        self.steps = state.global_step - self.warmup

    def per_step(self, which: int) -> float:
        return (self.end[which] - self.start[which]) / self.steps


def time_hooks(obj, names: tuple[str, ...], acc: dict[str, float], timer: "StepTimer") -> None:
    """Adds the CPU time spent in ``obj``'s methods ``names`` (inside the timed window) to ``acc["s"]`` and to
    ``acc[<class name>]``."""
    key = type(obj).__name__
    acc.setdefault(key, 0.0)
    for name in names:
        method = getattr(obj, name)

        def wrapped(*args, __method=method, **kwargs):
            t0 = time.process_time()
            try:
                return __method(*args, **kwargs)
            finally:
                if timer.start is not None:
                    spent = time.process_time() - t0
                    acc["s"] += spent
                    acc[key] += spent

        setattr(obj, name, wrapped)


def run(
    lab, with_callbacks: bool, steps: int, every: int, warmup: int, num_samples: int | None, out_dir: str
) -> tuple[float, float, list[float], float]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback, KLToReferenceCallback, OveroptimizationCallback
    from hf_rlhf_ext.lab.rewards import lab_gold_reward, lab_proxy_reward

    torch.set_num_threads(1)
    prompts = lab.load_prompts()
    args = GRPOConfig(
        output_dir=out_dir, reward_weights=[1.0, 0.0], beta=0.02, learning_rate=3e-4, per_device_train_batch_size=32,
        num_generations=8, max_completion_length=32, max_steps=steps, logging_steps=every, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
        log_level="error",
    )
    trainer = GRPOTrainer(
        model=lab.policy_path, reward_funcs=[lab_proxy_reward, lab_gold_reward], args=args,
        train_dataset=prompts["train"],
    )
    timer = StepTimer(warmup)
    trainer.add_callback(timer)
    inside = {"s": 0.0}  # CPU time spent inside our callbacks during the timed steps
    if with_callbacks:
        held_out = prompts["test"]["prompt"]
        kl = KLToReferenceCallback(trainer, held_out, every_n_steps=every, num_samples=num_samples)
        check = GroupAdvantageCheckCallback(trainer, every_n_steps=every)
        overopt = OveroptimizationCallback(trainer, save_peak=True, plot=True, forecast=True)
        time_hooks(kl, ("on_step_end",), inside, timer)
        time_hooks(check, ("check",), inside, timer)
        time_hooks(overopt, ("on_step_end", "on_log"), inside, timer)
        for cb in (kl, check, overopt):
            trainer.add_callback(cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    gold = [r["rewards/lab_gold_reward/mean"] for r in trainer.state.log_history if "rewards/lab_gold_reward/mean" in r]
    return timer.per_step(0), timer.per_step(1), gold, {k: v / timer.steps for k, v in inside.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="measuring / logging interval of the callbacks")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    parser.add_argument(
        "--num_samples", type=int, default=None,
        help="held-out completions per KL measurement (default: the callback's, one generation batch = 32 here)",
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    a = parser.parse_args()

    from hf_rlhf_ext.lab import build_lab

    lab = build_lab()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = [False, True] if r % 2 == 0 else [True, False]
            wall, cpu, golds, inside = {}, {}, {}, {}
            for on in order:
                out = os.path.join(tmp, f"r{r}_{int(on)}")
                wall[on], cpu[on], golds[on], inside[on] = run(lab, on, a.steps, a.every, a.warmup, a.num_samples, out)
            same = golds[True] == golds[False]
            row = {
                "repeat": r, "off_wall_s_per_step": wall[False], "on_wall_s_per_step": wall[True],
                "wall_ratio": wall[True] / wall[False], "off_cpu_s_per_step": cpu[False],
                "on_cpu_s_per_step": cpu[True], "cpu_ratio": cpu[True] / cpu[False], "same_training": same,
                "callback_cpu_s_per_step": inside[True]["s"],
                # the same run without the time spent inside the callbacks: a noise-free estimate of the ratio
                "inside_ratio": cpu[True] / (cpu[True] - inside[True]["s"]),
                # each callback's share, as a fraction of the time per step without it
                "share_per_callback": {
                    k: v / (cpu[True] - inside[True]["s"]) for k, v in inside[True].items() if k != "s"
                },
            }
            rows.append(row)
            print(
                f"repeat {r}: wall off {wall[False]:.4f} / on {wall[True]:.4f} s/step = {row['wall_ratio']:.3f}; "
                f"cpu off {cpu[False]:.4f} / on {cpu[True]:.4f} s/step = {row['cpu_ratio']:.3f}; "
                f"inside callbacks {inside[True]['s']:.4f} s/step -> {row['inside_ratio']:.3f} ("
                + ", ".join(f"{k} {v:+.1%}" for k, v in row["share_per_callback"].items()) + ")"
                f"{'' if same else '  (WARNING: the two runs trained differently)'}",
                flush=True,
            )
    summary = {
        "median_wall_ratio": statistics.median(row["wall_ratio"] for row in rows),
        "median_cpu_ratio": statistics.median(row["cpu_ratio"] for row in rows),
        "median_inside_ratio": statistics.median(row["inside_ratio"] for row in rows),
        "steps": a.steps, "every": a.every, "num_samples": a.num_samples, "repeats": a.repeats, "rows": rows,
    }
    print(
        f"time per step with all callbacks / without (median of {a.repeats}): wall {summary['median_wall_ratio']:.3f}, "
        f"cpu {summary['median_cpu_ratio']:.3f}, from the time spent inside the callbacks "
        f"{summary['median_inside_ratio']:.3f} (target <= 1.05)"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

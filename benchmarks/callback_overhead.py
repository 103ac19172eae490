"""Time-per-step overhead of the monitoring callbacks on GRPO in the lab: all callbacks on vs off, side by side.

    OMP_NUM_THREADS=1 python benchmarks/callback_overhead.py [--steps 60] [--repeats 3] [--every 10]

Each repeat trains the same GRPO run (lab policy, lab proxy RM + gold tracked at weight 0, 32 completions per step,
G = 8, 32 tokens, β = 0.02) twice — without callbacks and with ``KLToReferenceCallback`` (every ``--every`` steps),
``GroupAdvantageCheckCallback`` (every batch) and ``OveroptimizationCallback`` (logs mode, peak checkpoint on,
logging every ``--every`` steps) — alternating which goes first. The callbacks sample under a forked RNG, so both runs
draw the same training samples and do the same work; the script checks that. Time per step is measured from the
start of step ``--warmup`` + 1 to the end of training, so it includes everything the callbacks do. Prints per-repeat
ratios and their median (target ≤ 1.05).
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
    """Wall time from the beginning of step ``warmup + 1`` to the end of training (callbacks' work included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()
        self.steps = state.global_step - self.warmup

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


def run(lab, with_callbacks: bool, steps: int, every: int, warmup: int, out_dir: str) -> tuple[float, list[float]]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback, KLToReferenceCallback, OveroptimizationCallback
    from hf_rlhf_ext.rewards import lab_gold_reward, lab_proxy_reward

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
    if with_callbacks:
        held_out = prompts["test"]["prompt"][:32]
        trainer.add_callback(KLToReferenceCallback(trainer, held_out, every_n_steps=every, num_samples=32))
        trainer.add_callback(GroupAdvantageCheckCallback(trainer))
        trainer.add_callback(OveroptimizationCallback(trainer, save_peak=True, plot=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    gold = [r["rewards/lab_gold_reward/mean"] for r in trainer.state.log_history if "rewards/lab_gold_reward/mean" in r]
    return timer.per_step, gold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="measuring / logging interval of the callbacks")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    a = parser.parse_args()

    from hf_rlhf_ext.lab import build_lab

    lab = build_lab()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = [False, True] if r % 2 == 0 else [True, False]
            times, golds = {}, {}
            for on in order:
                times[on], golds[on] = run(lab, on, a.steps, a.every, a.warmup, os.path.join(tmp, f"r{r}_{int(on)}"))
            same = golds[True] == golds[False]
            ratio = times[True] / times[False]
            rows.append({"repeat": r, "off_s_per_step": times[False], "on_s_per_step": times[True], "ratio": ratio,
                         "same_training": same})
            print(f"repeat {r}: off {times[False]:.4f} s/step, on {times[True]:.4f} s/step, ratio {ratio:.3f}"
                  f"{'' if same else '  (WARNING: the two runs trained differently)'}", flush=True)
    ratios = [row["ratio"] for row in rows]
    summary = {
        "median_ratio": statistics.median(ratios),
        "mean_ratio": statistics.fmean(ratios),
        "steps": a.steps, "every": a.every, "repeats": a.repeats, "rows": rows,
    }
    print(f"time per step with all callbacks / without: median {summary['median_ratio']:.3f}, "
          f"mean {summary['mean_ratio']:.3f} (target <= 1.05)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

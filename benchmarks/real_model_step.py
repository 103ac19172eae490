"""Where a real model's step goes: our PPO, our GRPO recipe and a plain ``trl.GRPOTrainer`` on SmolLM2-135M-Instruct.

    python benchmarks/real_model_step.py [--testbed /tmp/testbed-smollm2-graded-scratch] [--repeats 5] [--steps 3]

All three train the same LoRA (r = 8) on the testbed's policy with the testbed's prompts and its proxy reward model,
the same batch (``--batch`` completions per step, G = ``--generations``, 24 new tokens, β = 0.04 so a reference pass
happens), in float32 on the CPU with one torch thread (two threads on a
2-core machine shared with other jobs made SmolLM2's sampling 10x slower):
(a) plain ``trl.GRPOTrainer``; (b) our GRPO recipe's trainer as
``recipes/grpo.py`` builds it (``prepare_rl_run`` + ``make_trainer(ResumableGRPOTrainer)``: reward guard, results
callback, chat-rendered prompts; monitors and gold tracking off, so every trainer scores with the proxy RM alone);
(c) our ``PPOTrainer`` with ``critic_shares_base`` (a LoRA critic + value
head on the policy's frozen base) and one PPO epoch (one optimizer step per rollout, as GRPO's).

Each step is split by timers wrapped around the trainers' own methods: generation (``_generate``), scoring (the rest
of ``_generate_and_score_completions``: the reward model, reference / old log-probs, and for PPO the rollout's critic
pass and GAE) and training (the rest of the step: loss, backward, optimizer; for PPO also the critic's forward in the
loss, its backward and clipping). Each repeat builds every trainer afresh (in turn, the order rotating), runs one
warm-up step and ``--steps`` timed ones; the script prints each repeat's per-step means, then medians over repeats
and the ratios ours-GRPO / plain-GRPO and PPO / plain-GRPO with their min-max.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 shared cores: generation ran 10x slower
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from transformers import TrainerCallback  # noqa: E402

TRAINERS = ("trl_grpo", "ours_grpo", "ours_ppo")
PARTS = ("step", "generation", "scoring", "training", "reward", "ref_logps", "rollout_values", "gae", "loss_values")


class StepClock(TrainerCallback):
    """Wall time of each step after the warm-up, and the time each wrapped method spent inside it."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.current, self.t0 = warmup, [], None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = {} if state.global_step >= self.warmup else None
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.current is not None:
            self.current["step"] = time.perf_counter() - self.t0
            self.steps.append(self.current)
        self.current = None

    def add(self, part: str, seconds: float) -> None:
        if self.current is not None:
            self.current[part] = self.current.get(part, 0.0) + seconds


def time_method(obj, name: str, part: str, clock: StepClock, module: bool = False) -> None:
    """Replaces ``obj.name`` (an instance method, or a module's function) with one that adds its wall time to
    ``part``."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock.add(part, time.perf_counter() - t0)

    setattr(obj, name, timed)
    if module:
        clock.restore = lambda: setattr(obj, name, method)


def common_args(a, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir, per_device_train_batch_size=a.batch, num_generations=a.generations,
        max_completion_length=24, beta=0.04, learning_rate=1e-4, max_steps=1 + a.steps, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
        disable_tqdm=True, log_level="error",
    )


def recipe_setup(a, training_args):
    """The GRPO / PPO recipes' own building: policy, chat-rendered prompts, proxy RM, LoRA config, callbacks."""
    from trl import ModelConfig

    from hf_rlhf_ext.run.build import prepare_rl_run
    from hf_rlhf_ext.run.spec import RLScriptArguments

    script = RLScriptArguments(lab_dir=a.testbed, track_gold=False, monitor="none", num_eval_prompts=0)
    model = ModelConfig(model_name_or_path=os.path.join(a.testbed, "policy"), use_peft=True, lora_r=8, lora_alpha=16)
    return prepare_rl_run(script, training_args, model)


def build(name: str, a, out_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    from hf_rlhf_ext.reward_guard_config import GuardedGRPOConfig
    from hf_rlhf_ext.rewards import RewardModelFunction
    from hf_rlhf_ext.run.build import make_trainer
    from hf_rlhf_ext.trainers.ppo import PPOTrainer
    from hf_rlhf_ext.trainers.ppo_config import PPOConfig
    from hf_rlhf_ext.trainers.resumable_sampling import ResumableGRPOTrainer

    if name == "ours_ppo":
        kwargs = common_args(a, out_dir)
        kl_coef = kwargs.pop("beta")  # PPOConfig derives beta from kl_coef
        args = PPOConfig(**kwargs, kl_coef=kl_coef, critic_shares_base=True, num_ppo_epochs=1)
        return make_trainer(PPOTrainer, recipe_setup(a, args), args)
    args = GuardedGRPOConfig(**common_args(a, out_dir))
    setup = recipe_setup(a, args)
    if name == "ours_grpo":
        return make_trainer(ResumableGRPOTrainer, setup, args)
    plain = GRPOConfig(**common_args(a, out_dir))
    reward = RewardModelFunction(os.path.join(a.testbed, "reward_model"), name="proxy_reward")
    return GRPOTrainer(model=setup.model, reward_funcs=[reward], args=plain, train_dataset=setup.train_dataset,
                       processing_class=setup.tokenizer, peft_config=setup.peft_config)


def instrument(trainer, clock: StepClock) -> None:
    """Timers on the methods every trainer runs, and on PPO's own passes."""
    import hf_rlhf_ext.trainers.ppo as ppo_module

    time_method(trainer, "_generate_and_score_completions", "generate_and_score", clock)
    time_method(trainer, "_generate", "generation", clock)
    time_method(trainer, "_calculate_rewards", "reward", clock)
    if hasattr(trainer, "engine"):
        time_method(trainer, "_reference_logps", "ref_logps", clock)
        time_method(trainer.engine, "_values", "rollout_values", clock)
        time_method(trainer, "_values_for_loss", "loss_values", clock)
        time_method(ppo_module, "gae", "gae", clock, module=True)


def run_one(name: str, a, out_dir: str) -> dict[str, float]:
    """Mean seconds per timed step of each part for one freshly built trainer."""
    trainer = build(name, a, out_dir)
    clock = StepClock(warmup=1)
    trainer.add_callback(clock)
    instrument(trainer, clock)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        getattr(clock, "restore", lambda: None)()
    steps = clock.steps
    mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in {k for s in steps for k in s}}
    mean["scoring"] = mean.get("generate_and_score", 0.0) - mean.get("generation", 0.0)
    mean["training"] = mean["step"] - mean.get("generate_and_score", 0.0)
    del trainer
    gc.collect()
    return {k: mean.get(k, 0.0) for k in PARTS}


def report(rows: list[dict]) -> None:
    med = {n: {p: statistics.median(r[n][p] for r in rows) for p in PARTS} for n in TRAINERS}
    print(f"\nmedians over {len(rows)} repeats, seconds per step:")
    for n in TRAINERS:
        print(f"  {n:10s} " + "  ".join(f"{p} {med[n][p]:.3f}" for p in PARTS))
    for n in ("ours_grpo", "ours_ppo"):
        ratios = [r[n]["step"] / r["trl_grpo"]["step"] for r in rows]
        print(f"ratio {n} / trl_grpo: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    extra = {p: med["ours_ppo"][p] - med["trl_grpo"][p] for p in ("step", "generation", "scoring", "training")}
    print("PPO minus plain GRPO (medians): " + "  ".join(f"{p} {v:+.3f}" for p, v in extra.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default="/tmp/testbed-smollm2-graded-scratch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trainer and repeat (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="completions per step")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = TRAINERS[r % 3:] + TRAINERS[: r % 3]
            row = {}
            for name in order:
                row[name] = run_one(name, a, os.path.join(tmp, f"r{r}_{name}"))
                print(f"repeat {r} {name:10s} " + "  ".join(f"{p} {row[name][p]:.3f}" for p in PARTS), flush=True)
            rows.append(row)
    report(rows)


if __name__ == "__main__":
    main()

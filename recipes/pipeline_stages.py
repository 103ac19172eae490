"""The stages of ``recipes/pipeline.py`` (one function each, in the chapter's order), the claims they decide and the
report they make. Each stage takes the pipeline's arguments and its own output folder and returns a JSON-able dict of
numbers; the claims and the report read only those dicts, so a report can be rebuilt from stored results."""

import contextlib
import copy
import importlib.util
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

RECIPES = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    """``run(args, out)`` gives the stage's result; ``cost``: its typical share of the run (seconds in --quick on 2
    cores), which only orders the stages that run side by side (longest first)."""

    name: str
    title: str
    run: Callable[[Any, str], dict]
    cost: float = 1.0


def stage_args(args: Any, lanes: int, threads: int) -> SimpleNamespace:
    """The pipeline's arguments as a stage sees them (picklable, for the worker processes): with stages side by side
    (``lanes`` > 1) a stage runs its own points one at a time, on ``threads`` torch threads (0: torch's default)."""
    fields = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    return SimpleNamespace(**fields | {"on_lab": args.on_lab, "on_testbed": args.on_testbed, "threads": threads,
                                        "max_parallel": args.max_parallel if lanes == 1 else 1})


def _recipe(name: str):
    """A sibling recipe as a module (registered, so its dataclasses resolve their annotations)."""
    key = f"_recipe_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _parse(name: str, argv: list[str]):
    return _recipe(name).make_parser().parse_args_and_config(args=argv)


def _rl_flags(args: Any, judge_as_weights: bool = True) -> list[str]:
    """Lab directory, policy, prompts, optimised reward and held-out judge for the recipes (empty on the lab). For the
    TRL-based ones a judge goes in as one more reward function with weight 0 (tracked, never optimised); otherwise
    as ``--gold_funcs``."""
    flags: list[str] = ["--lab_dir", args.lab_dir] if getattr(args, "lab_dir", None) else []
    if args.model_name_or_path:
        flags += ["--model_name_or_path", args.model_name_or_path]
    if args.dataset_name:
        flags += ["--dataset_name", args.dataset_name]
    if args.reward_model_name_or_path:
        flags += ["--reward_model_name_or_path", args.reward_model_name_or_path]
    funcs = list(args.reward_funcs or [])
    if args.gold_funcs and not args.on_lab and not judge_as_weights:
        flags += ["--gold_funcs", *args.gold_funcs]
    elif args.gold_funcs and not args.on_lab:
        n_main = len(funcs) + bool(args.reward_model_name_or_path)
        flags += ["--reward_weights", *(["1"] * n_main), *(["0"] * len(args.gold_funcs))]
        funcs += args.gold_funcs
    if funcs:
        flags += ["--reward_funcs", *funcs]
    if args.use_peft:
        flags += ["--use_peft"]
    return flags + _learning_rate_flags(args, "--learning_rate")


def _learning_rate_flags(args: Any, flag: str) -> list[str]:
    """The pipeline's ``--learning_rate`` under the recipe's name for it; nothing when unset (the stage's own)."""
    rate = getattr(args, "learning_rate", None)
    return [] if rate is None else [flag, str(rate)]


FINGERPRINT_ARGS = ("quick", "seed", "model_name_or_path", "dataset_name", "reward_funcs", "reward_model_name_or_path",
                    "gold_funcs", "use_peft")


def fingerprint(args: Any, name: str) -> dict:
    """What a stage's numbers depend on: package versions, the stage and the settings that change its result."""
    import torch
    import transformers
    import trl

    import hf_rlhf_ext

    versions = {"hf_rlhf_ext": hf_rlhf_ext.__version__, "trl": trl.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    # set only when given, so that stages stored without them keep their fingerprint
    optional = {k: getattr(args, k) for k in ("lab_dir", "learning_rate") if getattr(args, k, None) is not None}
    return {"stage": name, "versions": versions, **{k: getattr(args, k, None) for k in FINGERPRINT_ARGS}, **optional}


def _lab_budget(args: Any, config: str) -> list[str]:
    """On a testbed the stage's lab file does not apply (its settings were sized for the lab's tiny policy), but the
    chapter's budget does: the stage's number of steps, from that file (a stage's own flags after it still win)."""
    if not getattr(args, "on_testbed", False):
        return []
    from hf_rlhf_ext.run.parsing import read_shipped_config

    return ["--max_steps", str(read_shipped_config(config)["max_steps"])]


def has_gold(args: Any) -> bool:
    return args.on_lab or bool(args.gold_funcs)


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------
def stage_lab(args: Any, out: str) -> dict:
    """The lab world (built once, cached): its SFT policy's quality is the baseline every experiment starts from."""
    from hf_rlhf_ext.lab import open_lab

    if getattr(args, "on_testbed", False):
        return {"skipped": f"a testbed ({args.lab_dir}): the lab's SFT baseline does not apply; its build's numbers "
                           "are in its lab_metrics.json"}
    lab = open_lab(getattr(args, "lab_dir", None))
    keep = ("sft_test_gold_mean", "sft_test_eos_rate", "sft_test_mean_words", "sft_test_item_rate", "policy_params",
            "rm_params", "pairs_train_n", "pairs_train_flip_rate", "n_train_prompts", "n_test_prompts")
    return {"root": lab.root, **{k: lab.metrics.get(k) for k in keep}}


def stage_reward_model(args: Any, out: str) -> dict:
    """A Bradley–Terry RM trained with ``trl.RewardTrainer`` on the lab's noisy pairs; held-out pairwise accuracy. The
    full run trains it with 3 seeds (the pairs are fixed; the seed changes the order of the pairs and the dropout, the
    lab's RM starts from one initialisation seeded by the lab): the first seed's result in ``test``, every seed's in
    ``per_seed``."""
    if not args.on_lab:
        return {"skipped": "needs the lab's gold-labelled preference pairs (run recipes/reward.py on your own pairs)"}
    seeds = _seeds(args, 3)
    lab_dir = ["--lab_dir", args.lab_dir] if getattr(args, "lab_dir", None) else []
    runs = [_recipe("reward").main(*_parse("reward", ["--output_dir", out if i == 0 else os.path.join(out, f"seed_{s}"),
                                                      "--seed", s, *lab_dir])) for i, s in enumerate(seeds)]
    from hf_rlhf_ext.lab import open_lab

    pairs = open_lab(getattr(args, "lab_dir", None)).load_preferences()
    return {"test": runs[0]["test"], "n_train_pairs": runs[0]["n_train_pairs"],
            "length_only": length_only_accuracy(_lengths(pairs["train"]), _lengths(pairs["test"])),
            "label_flip_rate_test": sum(pairs["test"]["label_flipped"]) / len(pairs["test"]),
            "seeds": [int(s) for s in seeds], "per_seed": [{"seed": int(s), "test": m["test"]}
                                                           for s, m in zip(seeds, runs)]}


def _lengths(pairs: Any) -> list[tuple[int, int]]:
    return [(len(c), len(r)) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"])]


def length_only_accuracy(train: list[tuple[int, int]], test: list[tuple[int, int]]) -> dict:
    """The trivial predictor "prefer the longer (or shorter) reply", its direction fit on the training pairs; held-out
    accuracy on the same pairs as the RM, ties counted half. An RM that only learned length is no better."""
    longer = sum(c > r for c, r in train) >= sum(c < r for c, r in train)
    right = sum((c > r) == longer if c != r else 0.5 for c, r in test)
    return {"accuracy": right / len(test), "prefers": "longer" if longer else "shorter", "n_pairs": len(test)}


def stage_clip(args: Any, out: str) -> dict:
    """PPO's clipped objective on synthetic ratios: its gradient (autograd) against ρ for A = +1 and A = −1."""
    import torch

    from hf_rlhf_ext.objectives import clipped_surrogate, clipped_surrogate_ratio_grad
    from hf_rlhf_ext.plots import plot_clip_gradients

    eps = 0.2
    ratio = torch.linspace(0.0, 2.0, 201, dtype=torch.float64, requires_grad=True)
    rows = {}
    for sign in (1.0, -1.0):
        adv = torch.full_like(ratio, sign)
        (grad,) = torch.autograd.grad(clipped_surrogate(ratio, adv, eps).sum(), ratio)
        rows[sign] = grad.detach()
        closed = clipped_surrogate_ratio_grad(ratio.detach(), adv, eps)
        rows[f"closed_{sign}"] = float((closed - grad).abs().max())
    r = ratio.detach()
    favourable = {1.0: r > 1 + eps, -1.0: r < 1 - eps}  # moved far enough in the direction A rewards: clipped
    unfavourable = {1.0: r < 1 - eps, -1.0: r > 1 + eps}  # moved the wrong way: never clipped, always corrected
    table = [{"ratio": round(float(x), 2), "grad_A_pos": float(rows[1.0][i]), "grad_A_neg": float(rows[-1.0][i])}
             for i, x in enumerate(r) if round(float(x), 2) in (0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)]
    plot = plot_clip_gradients(r.tolist(), rows[1.0].tolist(), rows[-1.0].tolist(), eps, os.path.join(out, "clip.png"))
    return {
        "epsilon": eps, "table": table, "plot": plot,
        "max_abs_grad_favourable": max(float(rows[s][favourable[s]].abs().max()) for s in (1.0, -1.0)),
        "max_abs_grad_minus_A_unfavourable": max(float((rows[s][unfavourable[s]] - s).abs().max())
                                                 for s in (1.0, -1.0)),
        "closed_form_vs_autograd": max(rows["closed_1.0"], rows["closed_-1.0"]),
    }


def _grpo_setup(args: Any, out: str, extra: list[str]):
    """A GRPO trainer on the pipeline's policy, prompts and rewards, built through the GRPO recipe's own parser."""
    from trl import GRPOTrainer

    from hf_rlhf_ext.run.build import make_trainer, prepare_rl_run

    script_args, training_args, model_args = _parse("grpo", ["--output_dir", out, "--seed", str(args.seed),
                                                             "--num_eval_prompts", "64", "--save_strategy", "no",
                                                             *_rl_flags(args), *extra])  # the stage is the unit saved
    setup = prepare_rl_run(script_args, training_args, model_args)
    return _quiet(make_trainer(GRPOTrainer, setup, training_args)), setup


def _quiet(trainer: Any) -> Any:
    """No per-step log dicts on the console: the stage bar shows progress, the numbers go to the stage's files."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def stage_group_advantages(args: Any, out: str) -> dict:
    """GRPO's group-relative advantages recomputed and checked on every real training batch; the last batch's rewards
    and advantages are kept, so the same check can be shown to catch a planted corruption of real data."""
    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback

    class Recording(GroupAdvantageCheckCallback):
        def _statistics(self, logged, expected, rewards, used, g, settings):
            self.batch = {"rewards": rewards.tolist(), "advantages": logged.tolist(), "group_size": int(g),
                          "scale": settings["scale"]}
            return super()._statistics(logged, expected, rewards, used, g, settings)

    trainer, _ = _grpo_setup(args, out, ["--max_steps", "6" if args.quick else "12", "--disable_tqdm", "true"])
    check = Recording(trainer, on_violation="warn", every_n_steps=1)
    trainer.add_callback(check)
    trainer.train()
    hist = check.history
    return {
        "batches": len(hist), "num_generations": int(trainer.num_generations),
        "max_abs_group_mean": max(h["max_abs_group_mean"] for h in hist),
        "max_sign_mismatch_frac": max(h["sign_mismatch_frac"] for h in hist),
        "max_abs_diff_recomputed": max(h["max_abs_diff"] for h in hist),
        "mean_zero_std_frac": sum(h["zero_std_frac"] for h in hist) / len(hist),
        "max_abs_adv": max(h["max_abs_adv"] for h in hist),
        "violations": len(check.violations),
        "recorded_batch": getattr(check, "batch", None),
    }


def stage_best_of_n(args: Any, out: str) -> dict:
    """Best-of-N's own over-optimisation curve and its distillation (``recipes/best_of_n.py``), and the control: one
    round of the same distillation on randomly chosen samples (best of 1). The full run repeats both for 2 more seeds
    and keeps every seed's round-1 gold gain in ``per_seed``; the first seed's full result (curve, plots, model) is
    the stage's."""
    bon = _recipe("best_of_n")
    flags = _rl_flags(args, judge_as_weights=False)
    per_seed, first = [], None
    for i, seed in enumerate(_seeds(args, 3)):
        where = out if i == 0 else os.path.join(out, f"seed_{seed}")
        argv = ["--seed", seed, *flags]
        # seeds after the first at the quick settings: the claim reads round 1's gain, which neither the curve's
        # pool_size nor later rounds change (each draws from its own seed), at a third of a full seed's time
        settings = ["--rounds", "1", "--pool_size", "32"] if args.quick or i > 0 else []
        m = bon.main(*_parse("best_of_n", ["--output_dir", where, *argv, *settings]))
        control = bon.main(*_parse("best_of_n", ["--output_dir", os.path.join(where, "best_of_1"), *argv, "--n", "1",
                                                 "--rounds", "1", "--pool_size", "8"]))
        first = first or (m, control)
        per_seed.append({"seed": int(seed), "rounds": m["rounds"], "pool_size": m["pool_size"],
                         "seconds": m["seconds"] + control["seconds"], "gain": _round_one_gain(m, m["gold"]),
                         "best_of_1_gain": _round_one_gain(control, m["gold"])})
    m, control = first
    return {k: m[k] for k in ("select", "gold", "n", "pool_size", "rounds", "initial", "best_of_n", "distilled",
                              "curve", "seconds")} | {"plots": [os.path.join(out, "bon_curve.png"),
                                                                 os.path.join(out, "distillation.png")],
                                                       "model_dir": out,
                                                       "best_of_1": {k: control[k] for k in ("initial", "distilled")},
                                                       "seeds": [p["seed"] for p in per_seed], "per_seed": per_seed}


def _round_one_gain(m: dict, gold: str | None) -> float | None:
    """Held-out gold after the first distillation round − before it (it depends on neither the curve's pool_size nor
    on later rounds: those draw from their own seeds)."""
    return m["distilled"][0]["eval"][gold] - m["initial"][gold] if gold else None


MINI_KEEP = ("polite_share_before", "polite_share_after", "kl_after", "kl_k3_after", "gold_before", "gold_after",
             "steps", "seconds", "samples_before", "samples_after")
MINI_SEED_KEEP = ("polite_share_before", "polite_share_after", "kl_after", "gold_before", "gold_after", "seconds")


def stage_mini_loop(args: Any, out: str) -> dict:
    """The miniature RLHF loop in plain PyTorch that learns to end politely (``recipes/mini_loop.py``), and its control:
    the same loop, seed and steps with the KL penalty off, so "KL stays bounded" is measured against no leash. The full
    run does both for 3 seeds: the first seed's result at the top, every seed's pair in ``per_seed``."""
    argv = ["--lab_dir", args.lab_dir] if getattr(args, "lab_dir", None) else []
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    if args.dataset_name:
        argv += ["--dataset_name", args.dataset_name]
    if args.use_peft:
        argv += ["--use_peft", "true"]
    argv += _learning_rate_flags(args, "--lr")
    mini, runs = _recipe("mini_loop"), []
    for i, seed in enumerate(_seeds(args, 3)):
        where = out if i == 0 else os.path.join(out, f"seed_{seed}")
        runs.append((int(seed), mini.main(*_parse("mini_loop", ["--output_dir", where, "--seed", seed, *argv])),
                     mini.main(*_parse("mini_loop", ["--output_dir", os.path.join(where, "no_kl_penalty"),
                                                     "--kl_coef", "0", "--seed", seed, *argv]))))
    _, m, control = runs[0]
    per_seed = [{"seed": s, "kl_penalty": {k: a.get(k) for k in MINI_SEED_KEEP},
                 "no_kl_penalty": {k: b.get(k) for k in MINI_SEED_KEEP}} for s, a, b in runs]
    return {k: m.get(k) for k in MINI_KEEP} | {"kl_coef": m["config"]["kl_coef"], "plots": [m["files"]["plot"]],
                                                "no_kl_penalty": {k: control.get(k) for k in MINI_KEEP},
                                                "seeds": [s for s, _, _ in runs], "per_seed": per_seed}


HIGH_BETA = 0.5  # on the lab at OVEROPT_RUN: gold rises and stays (largest fall 0.05 over seeds 0–4, quick mode)
LOW_BETA = 0.0  # no leash at all: the lowest β there is
OVEROPT_SEEDS = 3  # full mode: the claim's t interval is over this many seeds


def stage_overoptimization(args: Any, out: str) -> dict:
    """β too low: GRPO on the proxy without a KL leash (LOW_BETA), held-out proxy and gold watched by
    ``OveroptimizationCallback`` (the gold peak found, and saved, as it happens); the control is the same run from the
    same start at a high β, where gold should not fall. Quick mode: one seed. Full mode: OVEROPT_SEEDS seeds from
    ``--seed``, each with its control, kept in ``per_seed`` (the first seed's runs also at the top, as quick mode
    has them)."""
    if not has_gold(args):
        return {"skipped": "needs a gold reward: the lab's, or --gold_funcs"}
    if args.quick:
        return _overoptimization_pair(args, out)
    seeds = [args.seed + i for i in range(OVEROPT_SEEDS)]
    per_seed = [{"seed": s} | _overoptimization_pair(_with_seed(args, s), os.path.join(out, f"seed_{s}"))
                for s in seeds]
    plots = [p for run in per_seed for p in run["plots"] + run["high_beta"]["plots"]]
    return {k: v for k, v in per_seed[0].items() if k != "seed"} | {"seeds": seeds, "per_seed": per_seed,
                                                                    "plots": plots}


def _with_seed(args: Any, seed: int) -> Any:
    other = copy.copy(args)
    other.seed = seed
    return other


def _overoptimization_pair(args: Any, out: str) -> dict:
    low = _overoptimization_run(args, out, LOW_BETA)
    return low | {"high_beta": _overoptimization_run(args, os.path.join(out, "high_beta"), HIGH_BETA)}


#: the runs' settings, measured on the lab (seeds 0–4, quick mode): at a learning rate of 6e-4 and β = 0 gold peaks
#: and falls within 80 steps while the proxy rises; at 3e-4 and β = 0.005 the fall often came after step 80
OVEROPT_RUN = {"learning_rate": 6e-4, "max_completion_length": 32, "every_n_steps": 5, "steps_quick": 80,
               "steps_full": 150}


def _overoptimization_run(args: Any, out: str, beta: float) -> dict:
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    s = OVEROPT_RUN
    steps = str(s["steps_quick"] if args.quick else s["steps_full"])
    rate = getattr(args, "learning_rate", None) or s["learning_rate"]  # the pipeline's, else the lab-tuned one
    trainer, setup = _grpo_setup(args, out, ["--beta", str(beta), "--learning_rate", str(rate),
                                             "--loss_type", "dapo", "--max_steps", steps,
                                             "--max_completion_length", str(s["max_completion_length"]),
                                             "--disable_tqdm", "true", "--logging_steps", "10"])
    proxy = next(f for f, w in zip(setup.reward_funcs, setup.reward_weights) if w != 0)
    gold = next(f for f, w in zip(setup.reward_funcs, setup.reward_weights) if w == 0)
    monitor = OveroptimizationCallback(trainer, proxy=proxy, gold=gold, eval_prompts=setup.eval_prompts,
                                       every_n_steps=s["every_n_steps"], patience=3, output_dir=out)
    trainer.add_callback(monitor)
    trainer.train()
    findings = monitor.findings()
    return {"beta": beta, "steps": int(steps), "findings": vars(findings) if hasattr(findings, "__dict__") else
            dict(findings), "points": monitor.points, "plots": [os.path.join(out, "overoptimization.png")]}


def stage_concepts(args: Any, out: str) -> dict:
    """The four models of PPO read off a real ``PPOTrainer`` (which train, which are frozen), and the RL view of text
    generation on one sampled completion: state, action, per-token KL terms and the final score."""
    from hf_rlhf_ext.run.build import make_trainer, prepare_rl_run
    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    script_args, training_args, model_args = _parse("ppo", ["--output_dir", out, "--max_steps", "1",
                                                            *_rl_flags(args)])
    setup = prepare_rl_run(script_args, training_args, model_args)
    trainer = _quiet(make_trainer(PPOTrainer, setup, training_args))
    reward_model = getattr(setup.reward_funcs[0], "model", None)
    optimizer = trainer.create_optimizer()  # what train() would update: the truth about "trained"
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    models = {"policy (actor)": trainer.model, "reference policy": trainer.ref_model,
              "value model (critic)": trainer.value_model, "reward model": reward_model}
    table = [_model_row(role, m, optimized) for role, m in models.items()]
    return {"models": table, "trajectory": _trajectory(args, setup, trainer, float(training_args.kl_coef))}


def _model_row(role: str, model: Any, optimized: set[int]) -> dict:
    if model is None:
        return {"role": role, "class": None, "params": 0, "trainable": 0, "trained": False}
    params = list(model.parameters())
    trained = sum(p.numel() for p in params if id(p) in optimized)
    return {"role": role, "class": type(model).__name__, "params": sum(p.numel() for p in params),
            "trainable": trained, "trained": trained > 0}


def _adapter_off(model: Any):
    """The model with its PEFT adapter switched off (the reference of a LoRA run); nothing to do otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _trajectory(args: Any, setup: Any, trainer: Any, kl_coef: float) -> dict:
    """One held-out prompt, one completion sampled from the best-of-N distilled policy when that stage ran (else the
    SFT policy), its per-token log-ratio to the reference and the per-token rewards PPO would train on."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_rlhf_ext.experiments.best_of_n import sample_pool
    from hf_rlhf_ext.objectives import token_level_rewards
    from hf_rlhf_ext.sampling import per_token_logps

    tok = setup.tokenizer
    bon_dir = os.path.join(args.output_dir, "best_of_n")
    source = bon_dir if os.path.isfile(os.path.join(bon_dir, "config.json")) else None
    # with LoRA there is no reference copy: the reference is the trained model with its adapter switched off
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    policy = AutoModelForCausalLM.from_pretrained(source) if source else reference
    with _adapter_off(policy if policy is reference else None):
        pool = sample_pool(policy, tok, setup.eval_prompts[:1], 1, max_new_tokens=24, seed=args.seed)
    ids = pool.completion_ids[0]
    prompt = torch.tensor([pool.prompt_ids[0]])
    comp, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():  # k1 per token: log π(a_t | s_t) − log π_ref(a_t | s_t)
        with _adapter_off(policy if policy is reference else None):
            policy_logps = per_token_logps(policy, prompt, torch.ones_like(prompt), comp, mask)
        with _adapter_off(reference):
            kl = policy_logps - per_token_logps(reference, prompt, torch.ones_like(prompt), comp, mask)
    score = float(setup.reward_funcs[0](prompts=pool.prompts, completions=pool.completions,
                                        completion_ids=pool.completion_ids)[0])
    rewards, _ = token_level_rewards(torch.tensor([score]), kl, mask, kl_coef)
    tokens = tok.convert_ids_to_tokens(ids)
    steps = [{"t": t, "action": tokens[t], "log_ratio": float(kl[0, t]), "reward": float(rewards[0, t])}
             for t in range(len(ids))]
    return {"policy": "best-of-N distilled" if source else "SFT", "prompt": pool.prompts[0],
            "completion": pool.completions[0], "score": score, "kl_coef": kl_coef, "steps": steps,
            "return": float(rewards.sum())}


def _seeds(args: Any, full: int) -> list[str]:
    return [str(args.seed + i) for i in range(1 if args.quick else full)]


REINFORCE_SEEDS = 3  # in quick mode too: the reward gain's 95% t interval needs seeds (t = 4.30 with 3, 12.7 with 2)


def stage_reinforce(args: Any, out: str) -> dict:
    """REINFORCE with and without a baseline on a reward with an offset (+5): gradient variance and reward over
    training (``hf_rlhf_ext.experiments.baselines``); per seed, the running-mean run's final reward, and the untrained
    start: the same run at learning rate 0 for two final windows, its first window the reward before any learning and
    its second the same start measured again (the control: a run that cannot learn)."""
    from hf_rlhf_ext.experiments.baselines import run_baselines

    seeds = [str(args.seed + i) for i in range(REINFORCE_SEEDS)]
    flags = [*_rl_flags(args), *_lab_budget(args, "reinforce_baselines_lab.yaml")]
    quick = ["--baselines", "none", "running_mean", "--max_steps", "30"] if args.quick else []
    m = run_baselines(["--output_dir", out, "--seeds", *seeds, *flags, *quick], progress=False)
    # the variance cut again without the +5 offset, which alone inflates the no-baseline variance
    flat = run_baselines(["--output_dir", os.path.join(out, "no_offset"), "--seeds", *seeds[:1 if args.quick else None],
                          *flags, *quick, "--baselines", "none", "running_mean", "--reward_offset", "0",
                          *(["--max_steps", "16"] if args.quick else [])], progress=False)  # its variance only
    window = m["settings"]["final_window"]
    still = run_baselines(["--output_dir", os.path.join(out, "untrained"), "--seeds", *seeds, *flags, "--baselines",
                           "running_mean", "--learning_rate", "0", "--max_steps", str(2 * window),
                           "--grad_variance_every", str(2 * window)],  # its reward is all it is for
                          progress=False)
    return {"baselines": _keep_baselines(m), "seeds": m["settings"]["seeds"],
            "reward_offset": m["settings"]["reward_offset"], "no_offset": _keep_baselines(flat),
            "final_window": window, "per_seed": [{"seed": r["seed"], "first_reward": r["curve"][0]["reward"],
                                                  "final_reward": r["final_reward"]}
                                                 for r in m["runs"] if r["baseline"] == "running_mean"],
            "untrained": {"learning_rate": 0.0, "steps": 2 * window,
                          "per_seed": [{"seed": r["seed"], **_two_windows(r["curve"])} for r in still["runs"]]},
            "plots": [os.path.join(out, "baselines.png")]}


def _two_windows(curve: list[dict]) -> dict:
    """Mean training reward of the first and of the second half of a run's logged steps."""
    half = len(curve) // 2
    start, later = curve[:half], curve[half:2 * half]
    return {"start_window": sum(p["reward"] for p in start) / half,
            "later_window": sum(p["reward"] for p in later) / half}


def _keep_baselines(m: dict) -> dict:
    return {name: {k: b[k] for k in ("median_grad_variance", "final_reward", "final_gold", "variance_vs_none")}
            | {"first_reward": b["reward_curve"]["mean"][0]} for name, b in m["baselines"].items()}


def stage_beta_sweep(args: Any, out: str) -> dict:
    """One GRPO run per β (held-out k3 KL, proxy, gold), the Gao RL-form fit (``hf_rlhf_ext.experiments.sweeps``);
    per β and seed the k1, k3 and exact KL of every measurement (``kl_estimators``)."""
    from hf_rlhf_ext.experiments.sweeps import RESULTS_FILE, run_sweep

    if __package__:
        from . import pipeline_findings
    else:
        import pipeline_findings

    argv = ["--output_dir", out, "--seeds", *_seeds(args, 3), *_rl_flags(args),
            *_lab_budget(args, "beta_sweep_lab.yaml")]
    # quick: 4 β, 128 held-out completions per measurement (256 in full) every 10 steps (5 in full), a quarter of
    # what the measurements cost; the KL ordering it decides spans 3.1 → 0.26 nats, far beyond the added noise
    argv += ["--betas", "0", "0.02", "0.2", "1.0", "--num_eval_prompts", "128", "--eval_every", "10"] \
        if args.quick else []
    m = run_sweep(argv, progress=False)
    keep = ("betas", "per_beta", "spearman_beta_final_kl", "spearman_beta_final_kl_all_points", "lowest_beta",
            "highest_beta", "gao_fit", "penalty_vs_early_stopping")
    return {k: m[k] for k in keep} | {"seeds": m.get("seeds"), "plots": [os.path.join(out, "frontier.png")],
                                      "kl_estimators": pipeline_findings.sweep_kl_runs(os.path.join(out, RESULTS_FILE))}


COMPARE_QUICK_SEEDS = 2  # in quick mode too: the control compares each method with itself under another seed


def stage_ppo_vs_grpo(args: Any, out: str) -> dict:
    """PPO (with a critic) and GRPO on the same prompts and sampled completions per step
    (``hf_rlhf_ext.experiments.compare``); each run in its own process, so peak memory is measured alike. Each run
    also reports its training state (``state_memory_mb``: the tensors it holds, the same for every seed)."""
    from hf_rlhf_ext.experiments.compare import run_compare

    if not has_gold(args):
        return {"skipped": "needs a gold reward: the lab's, or --gold_funcs"}
    flags = _rl_flags(args) if args.on_lab else [*_rl_flags(args), "--gold_reward", args.gold_funcs[0]]
    seeds = [str(args.seed + i) for i in range(COMPARE_QUICK_SEEDS if args.quick else 3)]
    argv = ["--output_dir", out, "--seeds", *seeds, *[f for f in flags if f != "--reward_weights"],
            *_lab_budget(args, "compare_lab.yaml")]
    argv += ["--threads_per_run", str(args.threads)] if getattr(args, "threads", 0) else []
    argv += ["--eval_every", "10"] if args.quick else []  # the claim reads the start and the end, both measured
    m = run_compare(argv, progress=False)
    keep = ("gold_start", "gold_peak", "gold_end", "kl_end", "proxy_end", "peak_memory_mb", "state_memory_mb",
            "seconds_per_step", "collapsed_fraction", "memory_method", "gold_gain")
    trainers = {t: {k: v[k] for k in keep if k in v} for t, v in m["trainers"].items()}
    per_run = ("trainer", "seed", "gold_start", "gold_end", "peak_memory_mb", "state_memory_mb")
    runs = [{k: r.get(k) for k in per_run} for r in m["runs"]]
    return {"trainers": trainers, "seeds": m["settings"]["seeds"], "runs": runs,
            "plots": [os.path.join(out, "compare.png")]}


def stage_ensembles(args: Any, out: str) -> dict:
    """The single proxy RM against ensembles of RMs (mean, worst case, mean − λ·std) at the same low β
    (``hf_rlhf_ext.experiments.ensembles``): a finding, reported whichever way it comes out. The single RM's runs also
    measure the ensemble's disagreement; their held-out points are kept per seed (``single_points``)."""
    from hf_rlhf_ext.experiments.ensembles import read_runs, run_experiment

    if __package__:
        from . import pipeline_findings
    else:
        import pipeline_findings

    if not args.on_lab:
        return {"skipped": "the lab's ensemble of reward models (run recipes/rm_ensemble.py with your own)"}
    argv = ["--output_dir", out, "--seeds", *_seeds(args, 3), "--max_parallel", str(args.max_parallel)]
    argv += ["--lab_dir", args.lab_dir, *_lab_budget(args, "rm_ensemble_lab.yaml")] if getattr(args, "lab_dir", None) \
        else []
    argv += ["--objectives", "single", "min", "--max_steps", "30", "--eval_every", "10"] if args.quick else []
    m = run_experiment(argv)
    single = read_runs(os.path.join(out, "single"), m["settings"]["beta"], m["settings"]["seeds"]) if "single" in m[
        "objectives"] else []
    return {"objectives": ensemble_objectives(m),
            "settings": {k: m["settings"][k] for k in ("beta", "seeds", "max_steps", "k", "penalty")},
            "plots": [os.path.join(out, "ensemble.png")],
            "single_points": pipeline_findings.ensemble_seed_points(single)}


def ensemble_objectives(metrics: dict) -> dict:
    """What the report keeps of the ensembles experiment's ``metrics.json`` per objective: the gold numbers over seeds
    and each seed's gold fall (the finding pairs them by seed)."""
    keep = ("end_gold", "peak_gold", "fall", "final_kl")
    return {o: {**{k: v[k] for k in keep}, "fall_per_seed": {str(r["seed"]): r["fall"] for r in v["per_seed"]}}
            for o, v in metrics["objectives"].items()}


# ----------------------------------------------------------------------------------------------------------------------
# Claims: each decided by a statistic of a stage's result, with the threshold stated here
# ----------------------------------------------------------------------------------------------------------------------
def _missing(results: dict, name: str) -> str | None:
    r = results.get(name)
    if r is None:
        return f"stage {name!r} has not run"
    return r.get("skipped")


def _claim_seeds(results: dict, name: str) -> list[int] | None:
    """The seeds a stage's numbers come from: its own list, else the seed it ran with."""
    r = results.get(name) or {}
    seeds = r.get("seeds") or (r.get("settings") or {}).get("seeds")
    if seeds:
        return [int(x) for x in seeds]
    seed = ((r.get("_provenance") or {}).get("fingerprint") or {}).get("seed")
    return None if seed is None else [int(seed)]


RM_Z, RM_MARGIN = 2.0, 0.05


def _beats(acc: float, ref: float, n: int) -> tuple[bool, float]:
    """(rule, z): accuracy at least RM_MARGIN above a reference predictor on the same n pairs, z >= RM_Z (the variance
    of the difference taken as the sum of both, conservative for positively correlated predictors)."""
    se = math.sqrt(max(acc * (1 - acc) + ref * (1 - ref), 1e-12) / n)
    z = (acc - ref) / se
    return acc - ref >= RM_MARGIN and z >= RM_Z, z


def claim_reward_model(results: dict):
    """One seed: accuracy z over chance and the margin and z over the length-only predictor. With seeds (the full run):
    besides the per-seed z rules, the 95% t intervals of the accuracy above 0.5 and of the margin above RM_MARGIN."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("rm_accuracy", "12–13", "The reward model orders held-out pairs better than chance and than a length-only "
            "predictor", "held-out pairwise accuracy vs the labels; z = (acc − 0.5) / sqrt(0.25 / n); margin and z "
            "over the length-only predictor on the same pairs; with seeds, 95% t intervals over them",
            {"z": f">= {RM_Z}", "acc - length_only_acc": f">= {RM_MARGIN}", "z_vs_length_only": f">= {RM_Z}",
             "with seeds": "every seed's z rules; accuracy interval > 0.5; margin interval > " + str(RM_MARGIN)})
    if reason := _missing(results, "reward_model"):
        return Claim.skip(*args, reason)
    r = results["reward_model"]
    acc, n = r["test"]["accuracy"], r["test"]["n_pairs"]
    z = (acc - 0.5) / math.sqrt(0.25 / n)
    flips = r.get("label_flip_rate_test")
    values = {"accuracy": acc, "n_pairs": n, "z": z, "gold_accuracy": r["test"].get("gold_accuracy"),
              "label_flip_rate": flips, "label_noise_ceiling": None if flips is None else 1 - flips}
    seeds = _claim_seeds(results, "reward_model")
    if "length_only" not in r:  # a result from before the control existed: said, not hidden
        return Claim.experiment(*args, values, z >= RM_Z, seeds=seeds)
    ref = r["length_only"]["accuracy"]
    z_ref = _beats(acc, ref, n)[1]
    values |= {"length_only_accuracy": ref, "margin_over_length_only": acc - ref, "z_vs_length_only": z_ref}
    control = {"statement": f"length-only predictor (prefers the {r['length_only']['prefers']} reply) on the same "
               "held-out pairs, put in the RM's place (and the RM in its)", "values": r["length_only"]}
    accs = {p["seed"]: p["test"]["accuracy"] for p in r.get("per_seed") or []}
    if len(accs) < 2:  # one seed (quick, or a result from before the seeds): decided as one run
        return Claim.experiment(*args, values, _rm_rule(acc, ref, n), control, _rm_rule(ref, acc, n), seeds)
    values |= {"accuracy_over_seeds": _seed_stats(accs),
               "margin_over_length_only_over_seeds": _seed_stats({s: a - ref for s, a in accs.items()})}
    mine, refs = list(accs.values()), [ref] * len(accs)
    return Claim.experiment(*args, values, _rm_seeds_rule(mine, refs, n), control, _rm_seeds_rule(refs, mine, n), seeds)


def _rm_rule(acc: float, ref: float, n: int) -> bool:
    """One seed: above chance by z and above the reference predictor by the margin and z."""
    return (acc - 0.5) / math.sqrt(0.25 / n) >= RM_Z and _beats(acc, ref, n)[0]


def _rm_seeds_rule(accs: list[float], refs: list[float], n: int) -> bool:
    """Over seeds: the one-seed rule on every seed, the accuracy's interval above 0.5 and the interval of the margin
    over the reference predictor above RM_MARGIN."""
    margins = [a - b for a, b in zip(accs, refs)]
    return all(_rm_rule(a, b, n) for a, b in zip(accs, refs)) and ci_clears(accs, 0.5) and ci_clears(margins, RM_MARGIN)


def claim_clip(results: dict):
    from hf_rlhf_ext.experiments.report import Claim

    args = ("clip_gradient", "16", "The clipped objective gives zero gradient beyond 1 ± ε in the favourable direction "
            "and the full gradient A in the unfavourable one", "max |∂L/∂ρ| where clipped; max |∂L/∂ρ − A| where not",
            {"both": "<= 1e-12"})
    if reason := _missing(results, "clip"):
        return Claim.skip(*args, reason, kind="exact")
    r = results["clip"]
    values = {k: r[k] for k in ("max_abs_grad_favourable", "max_abs_grad_minus_A_unfavourable", "epsilon")}
    return Claim(*args, values, holds=r["max_abs_grad_favourable"] <= 1e-12
                 and r["max_abs_grad_minus_A_unfavourable"] <= 1e-12, kind="exact")


ADV_TOL = 1e-3  # |logged − recomputed| allowed (float32 arithmetic in TRL vs here)


def check_advantages(rewards: list[float], advantages: list[float], group_size: int, scale: str = "group") -> dict:
    """The callback's checks on one batch: group means, signs against r − group mean, the recompute, how many are
    non-zero, and how many checks fail."""
    import torch

    from hf_rlhf_ext.callbacks.group_advantage import expected_advantages

    r, a = torch.tensor(rewards, dtype=torch.float32), torch.tensor(advantages, dtype=torch.float32)
    expected, _ = expected_advantages(r.unsqueeze(1), torch.ones(1), group_size, scale=scale)
    dev = (r.view(-1, group_size) - r.view(-1, group_size).mean(dim=1, keepdim=True)).view(-1)
    decided = (dev.abs() > 1e-6 * max(1.0, float(r.abs().max()))) & (a != 0)
    mismatch = float(((torch.sign(a) != torch.sign(dev)) & decided).sum()) / max(int(decided.sum()), 1)
    stats = {"max_abs_group_mean": float(a.view(-1, group_size).mean(dim=1).abs().max()),
             "sign_mismatch_frac": mismatch,
             "max_abs_diff_recomputed": float((a - expected).abs().max()),
             "nonzero_frac": float((a != 0).float().mean())}
    stats["violations"] = int(stats["max_abs_group_mean"] >= 1e-6) + int(stats["sign_mismatch_frac"] > 0) + int(
        stats["max_abs_diff_recomputed"] > ADV_TOL)
    return stats


def _advantages_rule(s: dict) -> bool:
    """Zero-mean groups, signs of r − mean, equal to the recomputed ones, no violation — and not all zero."""
    return (s["nonzero_frac"] > 0 and s["violations"] == 0 and s["max_abs_group_mean"] < 1e-6
            and s["sign_mismatch_frac"] == 0 and s["max_abs_diff_recomputed"] <= ADV_TOL)


def _planted(batch: dict) -> dict:
    """The recorded real batch with its advantages sign-flipped, and zeroed: each must fail the same check."""
    flipped = check_advantages(batch["rewards"], [-a for a in batch["advantages"]], batch["group_size"], batch["scale"])
    zeroed = check_advantages(batch["rewards"], [0.0] * len(batch["advantages"]), batch["group_size"], batch["scale"])
    return {"sign_flipped": flipped, "zeroed": zeroed}


def claim_group_advantages(results: dict):
    from hf_rlhf_ext.experiments.report import Claim

    args = ("grpo_advantages", "19", "GRPO's advantages on real training batches are non-zero, have zero mean per "
            "group, the sign of r − group mean and equal the recomputed ones",
            "over all batches: max |group mean of A|, sign mismatches, max |A − recomputed|, the callback's "
            "violations, max |A|", {
                "max_abs_group_mean": "< 1e-6", "sign_mismatch": "= 0", "max_abs_diff_recomputed": f"<= {ADV_TOL}",
                "violations": "= 0", "max_abs_adv": "> 0"})
    if reason := _missing(results, "group_advantages"):
        return Claim.skip(*args, reason)
    r = results["group_advantages"]
    values = {k: r.get(k) for k in ("max_abs_group_mean", "max_sign_mismatch_frac", "batches",
                                    "max_abs_diff_recomputed", "violations", "max_abs_adv")}
    real = {"max_abs_group_mean": r["max_abs_group_mean"], "sign_mismatch_frac": r["max_sign_mismatch_frac"],
            "max_abs_diff_recomputed": r["max_abs_diff_recomputed"], "violations": r.get("violations", 0),
            "nonzero_frac": float(r.get("max_abs_adv", 0.0) > 0)}
    holds = r["batches"] > 0 and _advantages_rule(real)
    seeds = _claim_seeds(results, "group_advantages")
    if not r.get("recorded_batch"):
        return Claim.experiment(*args, values, holds, seeds=seeds)
    batch = r["recorded_batch"]
    values["recorded_batch"] = check_advantages(batch["rewards"], batch["advantages"], batch["group_size"],
                                                batch["scale"])
    planted = _planted(batch)
    control = {"statement": "the last real batch with its advantages sign-flipped, and zeroed", "values": planted}
    return Claim.experiment(*args, values, holds and _advantages_rule(values["recorded_batch"]), control,
                            any(_advantages_rule(p) for p in planted.values()), seeds)


BON_MARGIN = 0.1


def claim_best_of_n(results: dict):
    """One seed: the round-1 gold gain at least BON_MARGIN. With seeds (the full run): its 95% t interval above
    BON_MARGIN. The control, best of 1 of the same seed, is decided the same way."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("bon_distillation", "21", "Best-of-N distillation raises the policy's held-out gold over the SFT model",
            "held-out gold after one round − SFT gold; with seeds, its 95% t interval over them",
            {"gain": f">= {BON_MARGIN}", "with seeds": f"95% t interval > {BON_MARGIN}"})
    if reason := _missing(results, "best_of_n"):
        return Claim.skip(*args, reason)
    r = results["best_of_n"]
    if not r.get("gold"):
        return Claim.skip(*args, "no gold reward (pass --gold_funcs)")
    gold = r["gold"]
    initial, first = r["initial"][gold], r["distilled"][0]["eval"][gold]
    values = {"sft_gold": initial, "distilled_gold": first, "gain": first - initial,
              "distilled_kl": r["distilled"][0]["eval"].get("kl"), "best_of_n_gold": r["best_of_n"].get(gold)}
    seeds = _claim_seeds(results, "best_of_n")
    if not r.get("best_of_1"):
        return Claim.experiment(*args, values, first - initial >= BON_MARGIN, seeds=seeds)
    c = r["best_of_1"]
    c_gain = c["distilled"][0]["eval"][gold] - c["initial"][gold]
    control = {"statement": "one round of the same distillation on randomly chosen samples (best of 1)",
               "values": {"sft_gold": c["initial"][gold], "distilled_gold": c["distilled"][0]["eval"][gold],
                          "gain": c_gain}}
    per = r.get("per_seed") or []
    if len(per) < 2:  # one seed (quick, or a result from before the seeds): decided as one run
        return Claim.experiment(*args, values, first - initial >= BON_MARGIN, control, c_gain >= BON_MARGIN, seeds)
    gains, c_gains = ({p["seed"]: p[k] for p in per} for k in ("gain", "best_of_1_gain"))
    values |= {"gain_over_seeds": _seed_stats(gains), "settings_per_seed": {
        str(p["seed"]): {"rounds": p["rounds"], "pool_size": p["pool_size"]} for p in per},
        "note": "the gain is round 1's; pool_size sets only the best-of-n curve and later rounds come after round 1, "
                "so seeds run with fewer of either measure the same gain"}
    control["values"] |= {"gain_over_seeds": _seed_stats(c_gains)}
    return Claim.experiment(*args, values, ci_clears(list(gains.values()), BON_MARGIN), control,
                            ci_clears(list(c_gains.values()), BON_MARGIN), seeds)


POLITE_GAIN, POLITE_KL, KL_RATIO = 0.3, 5.0, 0.75
# With seeds the interval carries the noise, so the bar is the claim itself: the penalised KL below the unpenalised
# one (ratio < 1). One run has no interval, so there the ratio must clear a margin (KL_RATIO) instead. On the lab's
# three seeds the ratios were 0.41, 0.70 and 0.59: every seed's penalty lowered KL, by amounts that vary.
KL_RATIO_SEEDS = 1.0


def _mini_rule(run: dict, other: dict) -> bool:
    """The polite share rises by POLITE_GAIN and the KL ends at most KL_RATIO × the other run's KL."""
    gain = run["polite_share_after"] - run["polite_share_before"]
    return gain >= POLITE_GAIN and run["kl_after"] <= KL_RATIO * other["kl_after"]


def claim_mini_loop(results: dict):
    """One seed: ``_mini_rule`` on the penalised run against its control and back. With seeds (the full run): the
    95% t intervals over them of the gain above POLITE_GAIN and of the KL ratio below KL_RATIO_SEEDS, the control the
    same rule with the roles swapped on every seed."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("mini_loop", "18", "The mini loop raises the share of polite endings while its KL penalty keeps KL "
            "below the same loop without it", "held-out polite share after − before; KL to the reference after "
            "(nats per reply), with the penalty ÷ without it; with seeds, 95% t intervals over them",
            {"gain": f">= {POLITE_GAIN}", "kl / kl_without_penalty": f"<= {KL_RATIO}",
             "with seeds": f"gain interval > {POLITE_GAIN}; kl ratio interval < {KL_RATIO_SEEDS}"})
    if reason := _missing(results, "mini_loop"):
        return Claim.skip(*args, reason)
    r = results["mini_loop"]
    gain = r["polite_share_after"] - r["polite_share_before"]
    values = {"before": r["polite_share_before"], "after": r["polite_share_after"], "gain": gain, "kl": r["kl_after"]}
    seeds = _claim_seeds(results, "mini_loop")
    if not r.get("no_kl_penalty"):  # no control run: the absolute bound, said to be uncontrolled
        return Claim.experiment(*args, values, gain >= POLITE_GAIN and r["kl_after"] <= POLITE_KL, seeds=seeds)
    c = r["no_kl_penalty"]
    values |= {"kl_without_penalty": c["kl_after"], "kl_ratio": r["kl_after"] / max(c["kl_after"], 1e-12)}
    control = {"statement": "the same loop, seed and steps with kl_coef = 0 (its KL against the penalised run's)",
               "values": {"before": c["polite_share_before"], "after": c["polite_share_after"],
                          "gain": c["polite_share_after"] - c["polite_share_before"], "kl": c["kl_after"]}}
    per = r.get("per_seed") or []
    if len(per) < 2:  # one seed (quick, or a result from before the seeds): decided as one run
        return Claim.experiment(*args, values, _mini_rule(r, c), control, _mini_rule(c, r), seeds)
    effect = _mini_over_seeds({p["seed"]: (p["kl_penalty"], p["no_kl_penalty"]) for p in per})
    swapped = _mini_over_seeds({p["seed"]: (p["no_kl_penalty"], p["kl_penalty"]) for p in per})
    values |= {"gain_over_seeds": effect["gain"], "kl_ratio_over_seeds": effect["kl_ratio"]}
    control["values"] |= {"gain_over_seeds": swapped["gain"], "kl_ratio_over_seeds": swapped["kl_ratio"]}
    return Claim.experiment(*args, values, _mini_interval_rule(effect), control, _mini_interval_rule(swapped), seeds)


def _mini_over_seeds(pairs: dict) -> dict:
    """Per seed (run, other): the run's polite gain and its KL ÷ the other's, each with mean and 95% t interval."""
    gains = {s: run["polite_share_after"] - run["polite_share_before"] for s, (run, _) in pairs.items()}
    ratios = {s: run["kl_after"] / max(other["kl_after"], 1e-12) for s, (run, other) in pairs.items()}
    return {"gain": _seed_stats(gains), "kl_ratio": _seed_stats(ratios)}


def _mini_interval_rule(stats: dict) -> bool:
    """The gain's interval above POLITE_GAIN and the KL ratio's below KL_RATIO_SEEDS."""
    return (ci_clears(list(stats["gain"]["per_seed"].values()), POLITE_GAIN)
            and ci_clears(list(stats["kl_ratio"]["per_seed"].values()), KL_RATIO_SEEDS, above=False))


HACK_MARGIN = 0.1


def gold_noise(points: list[dict]) -> float:
    """Measurement noise (σ) of one held-out gold value. Points that carry their own standard error (``gold_se``: the
    held-out samples' std / √n at that measurement) give the largest of them: the sampling noise of the measurement
    and nothing else, where successive differences also count the policy's real drift between points (gold climbing
    or falling over the steps between them) as noise; the largest, not a median, because a collapsed policy scores
    its samples alike (a standard error near 0) and would pull a median below the noise at the peak. A stored result
    without it: the median |successive difference| / (√2 · 0.6745), robust to the few large steps of a real fall."""
    ses = [p["gold_se"] for p in points if p.get("gold_se") is not None and math.isfinite(p["gold_se"])]
    if ses:
        return max(ses)
    gold = [p["gold"] for p in points if p.get("gold") is not None and math.isfinite(p["gold"])]
    diffs = sorted(abs(b - a) for a, b in zip(gold, gold[1:]))
    return statistics.median(diffs) / (math.sqrt(2) * 0.6745) if diffs else float("inf")


def _hump(run: dict) -> tuple[bool, dict]:
    """The rule: a gold peak before the end, a fall from it larger than HACK_MARGIN and 2× the gold noise, and the
    proxy above its value at the peak."""
    f, last_step = run["findings"], run["points"][-1]["step"]
    fall = f["peak_gold"] - f["final_gold"] if f["peak_gold"] is not None else None
    rise = f["final_proxy"] - f["proxy_at_peak"] if f["proxy_at_peak"] is not None else None
    noise = gold_noise(run["points"])
    values = {"peak_step": f["peak_step"], "last_step": last_step, "peak_gold": f["peak_gold"],
              "end_gold": f["final_gold"], "fall": fall, "gold_noise": noise, "proxy_at_peak": f["proxy_at_peak"],
              "end_proxy": f["final_proxy"], "kl_at_peak": f["kl_at_peak"], "end_kl": f["final_kl"],
              "detected_step": f["detected_step"]}
    holds = f["peak_step"] is not None and f["peak_step"] < last_step and fall is not None \
        and fall >= max(HACK_MARGIN, 2 * noise) and rise is not None and rise > 0
    return holds, values


def _hump_shortfall(values: dict) -> str:
    """Which part of the hump rule a run missed, in words (the reason an undecided claim gives)."""
    bar = max(HACK_MARGIN, 2 * values["gold_noise"])
    if values["peak_step"] is None or values["peak_step"] >= values["last_step"]:
        return "gold peaked at the last step"
    if values["fall"] is None or values["fall"] < bar:
        return (f"the fall {values['fall'] or 0:.2f} is under the bar max({HACK_MARGIN}, 2 × noise "
                f"{values['gold_noise']:.2f})")
    return (f"the gold fell {values['fall']:.2f} (over the bar {bar:.2f}) but the proxy ended at "
            f"{values['end_proxy']:.2f}, not above its {values['proxy_at_peak']:.2f} at the gold peak")


def claim_overoptimization(results: dict):
    """One run (quick mode, or a stored result without ``per_seed``): the hump rule on it, undecided in quick mode
    when neither it nor its control shows one. Several seeds: :func:`_humps_over_seeds` on the low-β runs, and the
    same rule on their high-β controls."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("beta_too_low", "9, 10, 22", "With β too low the proxy keeps rising while gold peaks and falls",
            "OveroptimizationCallback: gold peak found before the end; end gold below the peak; end proxy above the "
            "proxy at the gold peak (smoothed held-out values)", {
                "peak_gold - end_gold": f">= max({HACK_MARGIN}, 2 × gold noise)", "end_proxy - proxy_at_peak": "> 0"})
    if reason := _missing(results, "overoptimization"):
        return Claim.skip(*args, reason)
    r = results["overoptimization"]
    seeds = _claim_seeds(results, "overoptimization")
    if r.get("per_seed"):
        return _claim_over_seeds(args, r, seeds)
    holds, values = _hump(r)
    if not r.get("high_beta"):
        return Claim.experiment(*args, values, holds, seeds=seeds)
    control_holds, control_values = _hump(r["high_beta"])
    control = {"statement": f"the same run from the same start at β = {r['high_beta']['beta']}",
               "values": control_values}
    fp = (r.get("_provenance") or {}).get("fingerprint") or {}
    if not holds and not control_holds and fp.get("quick"):  # too short to resolve a hump: undecided, not false
        reason = (f"not decided in quick mode: {_hump_shortfall(values)} in {values['last_step']} steps; run without "
                  "--quick")
        return Claim(*args, values, None, skipped=reason, control=control, control_holds=False, seeds=seeds)
    return Claim.experiment(*args, values, holds, control, control_holds, seeds)


def _claim_over_seeds(args: tuple, r: dict, seeds: list[int] | None):
    from hf_rlhf_ext.experiments.report import Claim

    args = (*args[:3], "per seed: smoothed held-out gold at its peak − at the end (0 without a peak before the end) "
            "and end proxy − proxy at the gold peak; 95% t interval of the fall over seeds",
            {"fall_ci95_low": f"> max({HACK_MARGIN}, 2 × the largest gold noise)",
             "end_proxy - proxy_at_peak": "> 0 in every seed"})
    holds, values = _humps_over_seeds(r["per_seed"])
    control_holds, control_values = _humps_over_seeds([run["high_beta"] | {"seed": run["seed"]}
                                                       for run in r["per_seed"]])
    control = {"statement": f"the same runs from the same starts at β = {r['per_seed'][0]['high_beta']['beta']}",
               "values": control_values}
    return Claim.experiment(*args, values, holds, control, control_holds, seeds)


def _humps_over_seeds(runs: list[dict]) -> tuple[bool, dict]:
    """The hump rule over seeds: the 95% t interval of the gold fall lies above max(HACK_MARGIN, 2 × the largest gold
    noise of any seed), and the proxy rose from the gold peak to the end in every seed."""
    per_seed = {}
    for run in runs:
        _, v = _hump(run)
        before_end = v["peak_step"] is not None and v["peak_step"] < v["last_step"] and v["fall"] is not None
        rise = v["end_proxy"] - v["proxy_at_peak"] if v["proxy_at_peak"] is not None else None
        per_seed[str(run["seed"])] = {k: v[k] for k in ("peak_step", "last_step", "peak_gold", "end_gold",
                                                        "gold_noise", "proxy_at_peak", "end_proxy")} | {
            "fall": v["fall"] if before_end else 0.0, "proxy_rise": rise}
    falls = [v["fall"] for v in per_seed.values()]
    noise = max(v["gold_noise"] for v in per_seed.values())
    bar, ci = max(HACK_MARGIN, 2 * noise), t_interval(falls)
    proxy_rose = all(v["proxy_rise"] is not None and v["proxy_rise"] > 0 for v in per_seed.values())
    values = {"per_seed": per_seed, "fall_mean": sum(falls) / len(falls), "fall_ci95": ci, "largest_gold_noise": noise,
              "bar": bar, "proxy_rose_in_every_seed": proxy_rose}
    return ci is not None and ci[0] > bar and proxy_rose, values


VARIANCE_CUT, REWARD_GAIN = 2.0, 0.1


def t_interval(values: list[float]) -> list[float] | None:
    """The 95% Student t interval of the mean; None with fewer than 2 values."""
    from hf_rlhf_ext.experiments.early_stopping import t_interval as interval

    return interval(values)


def ci_clears(values: list[float], bar: float, above: bool = True) -> bool:
    """The 95% t interval of the mean lies wholly above ``bar`` (``above``) or wholly below it; False without one."""
    ci = t_interval(values)
    return ci is not None and (ci[0] > bar if above else ci[1] < bar)


def _seed_stats(per_seed: dict) -> dict:
    """Mean, 95% t interval and the per-seed numbers of one statistic over seeds."""
    vals = list(per_seed.values())
    return {"mean": sum(vals) / len(vals), "ci95": t_interval(vals),
            "per_seed": {str(k): v for k, v in per_seed.items()}}


def _gain_rule(gains: list[float]) -> bool:
    """The reward gain over seeds: its 95% t interval above 0 and its mean at least REWARD_GAIN."""
    ci = t_interval(gains)
    return ci is not None and ci[0] > 0 and sum(gains) / len(gains) >= REWARD_GAIN


def reinforce_gains(r: dict) -> tuple[dict, dict] | None:
    """Per seed: the running-mean run's final reward − the untrained start (learning rate 0, first window) of the same
    seed; and the control, the untrained start's second window − its first (the same start measured twice). None
    for a result from before the stage kept them."""
    if not (r.get("per_seed") and r.get("untrained")):
        return None
    start = {u["seed"]: u for u in r["untrained"]["per_seed"]}
    seeds = [p["seed"] for p in r["per_seed"] if p["seed"] in start]
    final = {p["seed"]: p["final_reward"] for p in r["per_seed"]}
    gains = {s: final[s] - start[s]["start_window"] for s in seeds}
    again = {s: u["later_window"] - u["start_window"] for s, u in start.items()}
    return gains, again


def _gain_values(gains: dict) -> dict:
    """``_seed_stats`` with the sd over seeds and their count (the REINFORCE claim states its noise with them)."""
    if not gains:
        return {"mean": None, "ci95": None, "sd_over_seeds": None, "n_seeds": 0, "per_seed": {}}
    n = len(gains)
    return _seed_stats(gains) | {"sd_over_seeds": _sd(list(gains.values())) if n > 1 else None, "n_seeds": n}


def claim_reinforce(results: dict):
    """The reward gain is the running-mean run's final reward (mean of the last final_window logged steps) minus the
    untrained start of the same seed (the same run at learning rate 0, its first final_window steps), decided by a
    95% t interval over the seeds the stage ran: above 0 (and a mean of at least REWARD_GAIN). The control is a run
    that cannot learn: that untrained start's second window minus its first must not show a gain. With fewer than 2
    seeds there is no interval and the claim is undecided, said with the reason."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("reinforce_baseline", "14–15", ("REINFORCE raises the mean reward; a baseline cuts the measured gradient "
            "variance at least 2× on a reward with a +5 offset (the cut without the offset is reported beside it)"),
            ("running-mean baseline: final training reward − the untrained start (learning rate 0) per seed, 95% t "
             "interval over seeds; median gradient variance of none ÷ running mean"),
            {"reward_gain_ci95_low": "> 0", "reward_gain": f">= {REWARD_GAIN}", "variance_cut": f">= {VARIANCE_CUT}"})
    if reason := _missing(results, "reinforce"):
        return Claim.skip(*args, reason)
    r = results["reinforce"]
    rm, none = r["baselines"]["running_mean"], r["baselines"]["none"]
    cut = _variance_cut(r["baselines"])
    values = {"first_reward": rm["first_reward"], "final_reward": rm["final_reward"]["mean"],
              "variance_none": none["median_grad_variance"]["median"],
              "variance_running_mean": rm["median_grad_variance"]["median"], "variance_cut": cut,
              "variance_cut_no_offset": _variance_cut(r["no_offset"]) if r.get("no_offset") else None}
    seeds = _claim_seeds(results, "reinforce")
    measured = reinforce_gains(r)
    if measured is None:  # a result from before the stage kept per-seed gains: said, never a silent pass
        values["reward_gain"] = rm["final_reward"]["mean"] - rm["first_reward"]
        return Claim(*args, values, None, skipped="no per-seed reward gains in this result (it predates them): no "
                     "interval, undecided; rerun the stage", seeds=seeds)
    gains, again = measured
    effect, still = _gain_values(gains), _gain_values(again)
    values |= {"reward_gain": effect["mean"], "reward_gain_ci95": effect["ci95"], "reward_gain_per_seed":
               effect["per_seed"], "noise": f"sd of the gain over seeds {effect['sd_over_seeds']:.3f}"
               if effect["n_seeds"] > 1 else "not measured (one seed)"}
    control = {"statement": f"a run that cannot learn: the untrained start (learning rate 0) measured twice, its "
               f"second window of {r.get('final_window')} logged steps − its first, per seed", "values": still}
    if effect["n_seeds"] < 2:
        return Claim(*args, values, None, skipped=f"{effect['n_seeds']} seed(s): a t interval of the reward gain "
                     "needs at least 2 (the stage runs 3); undecided", control=control, control_holds=None,
                     seeds=seeds)
    holds = _gain_rule(list(gains.values())) and cut >= VARIANCE_CUT
    return Claim.experiment(*args, values, holds, control, _gain_rule(list(again.values())), seeds)


def _variance_cut(baselines: dict) -> float:
    """Median gradient variance without a baseline ÷ with the running mean."""
    return baselines["none"]["median_grad_variance"]["median"] / baselines["running_mean"]["median_grad_variance"][
        "median"]


KL_RHO, CHANCE = -0.9, 0.05
#: the smallest KL fall (nats) that shows a leash: a policy that barely moved (a learning rate too small for the
#: model, e.g. TRL's default on a testbed) orders its tiny KLs by β as well, and 1e-7 nats is no effect
MIN_KL_FALL = 0.05
MAX_ORDERINGS = 40320  # 8! : every reordering of up to 8 β values; beyond, this many seeded random ones


def _kl_rule(betas: list[float], kls: list[float]) -> bool:
    """Spearman ρ(β, final KL) <= KL_RHO."""
    from hf_rlhf_ext.experiments.sweeps import spearman

    rho = spearman(betas, kls)
    return rho is not None and rho <= KL_RHO


def shuffled_beta_control(betas: list[float], kls: list[float], seed: int = 0) -> dict:
    """The KL rule on the same per-β final KLs with the β labels reordered (a β-independent assignment): the share of
    orderings on which it holds. Every ordering when there are at most 8 β values, else ``MAX_ORDERINGS`` random ones.
    With distinct KLs this is the chance that a KL unrelated to β looks as ordered (1/24 for 4 β values, 1/6 for 3):
    a grid too small to tell an ordering from chance shows it here."""
    import itertools
    import random

    exact = math.factorial(len(betas)) <= MAX_ORDERINGS
    rng = random.Random(seed)
    orders = itertools.permutations(betas) if exact else (rng.sample(betas, len(betas)) for _ in range(MAX_ORDERINGS))
    hits = [_kl_rule(list(order), kls) for order in orders]
    return {"orderings": len(hits), "exact": exact, "share_rule_holds": sum(hits) / len(hits)}


def claim_kl_vs_beta(results: dict):
    """The rule: ρ(β, mean final KL) <= KL_RHO and the KL fall from the lowest to the highest β larger than the
    seed-to-seed range of the final KL at any one β (stated as not measured with one seed) and at least MIN_KL_FALL.
    The control needs no
    extra run: the same KLs with the β labels shuffled, where the rule must hold on fewer than CHANCE of the
    orderings — a permutation test of the ordering, so a grid of 3 β values, or one whose KLs are unrelated to β,
    cannot pass. A shuffled grid is preferred to a second sweep: it is exact, free, and is the null hypothesis
    itself (KL does not depend on β)."""
    from hf_rlhf_ext.experiments.report import Claim

    args = ("kl_falls_with_beta", "17", "KL to the reference falls as β rises",
            ("Spearman ρ(β, mean final held-out KL) over the grid; KL fall from the lowest to the highest β against "
             "the largest seed-to-seed range of the final KL at one β"), {
                "rho": f"<= {KL_RHO}", "kl_fall": f"> seed range at one β and >= {MIN_KL_FALL} nats",
                "shuffled β: share of orderings where the rule holds": f"< {CHANCE}"})
    if reason := _missing(results, "beta_sweep"):
        return Claim.skip(*args, reason)
    r = results["beta_sweep"]
    rows = r["per_beta"]
    betas, kls = [row["beta"] for row in rows], [row["final_kl"]["mean"] for row in rows]
    per_row = [row.get("seeds") for row in rows]
    seeds = sorted({int(x) for s in per_row for x in s}) if all(per_row) else _claim_seeds(results, "beta_sweep")
    several = bool(per_row) and all(per_row) and min(len(s) for s in per_row) >= 2
    noise = max(row["final_kl"]["max"] - row["final_kl"]["min"] for row in rows) if several else None
    fall = kls[0] - kls[-1] if kls else None
    values = {"rho": r["spearman_beta_final_kl"], "betas": betas, "final_kl": kls, "kl_fall": fall,
              "seed_range_at_one_beta": noise,
              "noise": "largest max − min over seeds of the final KL at one β" if several else
              "seed-to-seed spread not measured (one seed): the shuffled-β control alone bounds chance"}
    holds = _kl_rule(betas, kls) and fall is not None and fall > (noise or 0.0) and fall >= MIN_KL_FALL
    shuffled = shuffled_beta_control(betas, kls)
    control = {"statement": "the same per-β final KLs with the β labels shuffled (every ordering): the share on "
               f"which the rule holds; the control holds when it reaches {CHANCE}", "values": shuffled}
    return Claim.experiment(*args, values, holds, control, shuffled["share_rule_holds"] >= CHANCE, seeds)


# The memory margin: GRPO's training state is 15 % below PPO's on the lab (the critic, its gradients and its Adam
# moments: 10.3 vs 12.1 MB), the same for every seed. Peak RSS, the measure of results from before the training state
# was kept, moved up to 12 MB (12 %) between two seeds of one method against a 21 MB gap between the methods.
GOLD_GAIN, MEMORY_MARGIN = 0.1, 0.10
# The memory that decides, by key of a run: its training state when every run has one, else its peak (older results).
MEMORY_MEASURES = {"state_memory_mb": "training state (MB of the tensors each trainer holds: weights, a gradient per "
                                      "trainable parameter, optimizer state; each storage once)",
                   "peak_memory_mb": "peak memory (MB above the imports)"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sd(values: list[float]) -> float:
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def _memory_rule(lower: list[float], higher: list[float]) -> bool:
    """The mean memory of ``lower`` at least MEMORY_MARGIN (a fraction) below that of ``higher``."""
    return _mean(higher) - _mean(lower) >= MEMORY_MARGIN * _mean(higher)


def _gold_rule(gains: list[float]) -> bool:
    """The mean gold gain at least GOLD_GAIN and at least 2 standard errors over seeds (sd / √n)."""
    return _mean(gains) >= max(GOLD_GAIN, 2 * _sd(gains) / math.sqrt(len(gains)))


def memory_measure(result: dict) -> str:
    """The key of the memory that decides the ppo_vs_grpo claim: ``state_memory_mb`` (fixed by the shapes, the same
    for every seed) when the result has it for every run and trainer, else ``peak_memory_mb`` (results from before the
    training state was kept)."""
    key = "state_memory_mb"
    runs_have = all(x.get(key) is not None for x in result.get("runs") or [])
    trainers_have = all((v.get(key) or {}).get("mean") is not None for v in result["trainers"].values())
    return key if runs_have and trainers_have else "peak_memory_mb"


def _self_comparison(runs: list[dict], key: str) -> dict:
    """One method against itself: its lowest- against its highest-memory seed (by ``key``; on a tie the lowest
    against the highest seed), put through the memory rule."""
    ordered = sorted(runs, key=lambda r: (r[key], r["seed"]))
    low, high = ordered[0], ordered[-1]
    return {"lower_seed": low["seed"], "lower_mb": low[key], "higher_seed": high["seed"], "higher_mb": high[key],
            "rule_holds": _memory_rule([low[key]], [high[key]])}


def _ppo_vs_grpo_args(measure: str) -> tuple:
    """The claim's id, exercise, statement, statistic and thresholds, naming the memory that decides it."""
    peak = "" if measure == "peak_memory_mb" else "; peak memory (MB above the imports) reported beside it"
    return ("grpo_vs_ppo", "20, 22", ("GRPO trains without a critic at lower memory than PPO; both raise gold over the "
            "SFT model"), (f"{MEMORY_MEASURES[measure]} of each, mean over seeds{peak}; end − start held-out gold of "
                           "each, per seed"),
            {"grpo_memory": f"<= (1 − {MEMORY_MARGIN}) × ppo_memory",
             "gold_gain": f">= max({GOLD_GAIN}, 2 × sd / √n) for each", "each method against itself": "not shown"})


def claim_ppo_vs_grpo(results: dict):
    """The rule: GRPO's mean memory at least MEMORY_MARGIN below PPO's, and each method's mean gold gain (end −
    start, per seed) at least GOLD_GAIN and 2 standard errors over seeds. Memory is the training state when every run
    has it (``memory_measure``; peak RSS moves between seeds more than the trainers differ), else the peak; the other
    is reported beside it. The control needs no extra run beyond a second seed: the same rule on the same measure
    applied to each method against itself with another seed (its lowest- against its highest-memory seed), and to the
    untrained start measured in every run (its largest gold difference against the gold bar) — neither may show the
    effect. The noise stated: each method's seed range of memory and sd of the gain. With one seed the control cannot
    be measured and the claim is undecided."""
    from hf_rlhf_ext.experiments.report import Claim

    if reason := _missing(results, "ppo_vs_grpo"):
        return Claim.skip(*_ppo_vs_grpo_args("state_memory_mb"), reason)
    r = results["ppo_vs_grpo"]
    key = memory_measure(r)
    args = _ppo_vs_grpo_args(key)
    t, seeds = r["trainers"], _claim_seeds(results, "ppo_vs_grpo")
    gain = {name: v["gold_end"]["mean"] - v["gold_start"]["mean"] for name, v in t.items()}
    values = {"memory_measure": key, "ppo_memory_mb": t["ppo"][key]["mean"], "grpo_memory_mb": t["grpo"][key]["mean"],
              "ppo_gold_gain": gain["ppo"], "grpo_gold_gain": gain["grpo"]}
    if key != "peak_memory_mb":
        values |= {"ppo_peak_memory_mb": t["ppo"]["peak_memory_mb"]["mean"],
                   "grpo_peak_memory_mb": t["grpo"]["peak_memory_mb"]["mean"]}
    if not r.get("runs"):  # a result from before the per-run numbers were kept: no control, said
        holds = values["grpo_memory_mb"] < values["ppo_memory_mb"] and min(gain.values()) >= GOLD_GAIN
        return Claim.experiment(*args, values, holds, seeds=seeds)
    runs = {name: sorted((x for x in r["runs"] if x["trainer"] == name), key=lambda x: x["seed"]) for name in t}
    mem = {name: [x[key] for x in rs] for name, rs in runs.items()}
    gains = {name: [x["gold_end"] - x["gold_start"] for x in rs] for name, rs in runs.items()}
    starts = [x["gold_start"] for rs in runs.values() for x in rs]
    values |= {"memory_ok": _memory_rule(mem["grpo"], mem["ppo"]), "ppo_lower": _memory_rule(mem["ppo"], mem["grpo"]),
               "gold_ok": {name: _gold_rule(g) for name, g in gains.items()},
               "per_seed": {name: {key: mem[name], "peak_memory_mb": [x["peak_memory_mb"] for x in runs[name]],
                                   "gold_gain": gains[name]} for name in runs},
               "noise": {name: {"memory_seed_range_mb": max(mem[name]) - min(mem[name]),
                                "gold_gain_sd": _sd(gains[name]), "n_seeds": len(gains[name])} for name in runs}}
    if min(len(rs) for rs in runs.values()) < 2:
        return Claim(*args, values, None, skipped="one seed per method: the control (each method against itself "
                     "with another seed) needs 2; undecided", seeds=seeds)
    selves = {name: _self_comparison(rs, key) for name, rs in runs.items()}
    start_spread = max(starts) - min(starts)
    control = {"statement": f"each method against itself with another seed (lowest- vs highest-memory seed, by "
               f"{key}), and the untrained start measured in every run (largest gold difference)",
               "values": {"memory_measure": key, "self": selves, "gold_start_spread": start_spread}}
    control_holds = any(c["rule_holds"] for c in selves.values()) or start_spread >= GOLD_GAIN
    holds = values["memory_ok"] and all(values["gold_ok"].values())
    return Claim.experiment(*args, values, holds, control, control_holds, seeds)


CLAIMS = [claim_reward_model, claim_reinforce, claim_clip, claim_kl_vs_beta, claim_overoptimization,
          claim_group_advantages, claim_ppo_vs_grpo, claim_best_of_n, claim_mini_loop]


def fit_verdict(fit: dict) -> str:
    """'fits' when the fit may be read as a result, otherwise 'no fit' with the reason: the fit's own judgement
    (R² below ``MIN_FIT_R2``, or a peak far outside the measured KL), else its R² alone (older results)."""
    from hf_rlhf_ext.objectives import MIN_FIT_R2

    if "valid" in fit:
        return "fits" if fit["valid"] else f"no fit: {fit.get('reason')}"
    r2 = fit.get("r2")
    if r2 is None or not math.isfinite(r2):
        return "no fit: R² undefined"
    return "fits" if r2 >= MIN_FIT_R2 else f"no fit: R² {r2:.2f} < {MIN_FIT_R2}"


def early_stopping_finding(pves: dict):
    """The β sweep's answer to "does the KL penalty beat early stopping?"; the verdict is the one its interval chose
    (``hf_rlhf_ext.experiments.early_stopping``), never a fixed expectation."""
    from hf_rlhf_ext.experiments.report import Finding

    values = {k: pves[k] for k in ("mean_difference", "ci95", "n_pairs", "n_seeds", "min_seeds")}
    return Finding("penalty_vs_early_stopping", "Higher-β final gold − lower-β gold early-stopped at the same held-out "
                   "KL (β sweep, within-seed pairs; 95% t interval over seeds)", values, pves["verdict"])


def findings(results: dict) -> list:
    from hf_rlhf_ext.experiments.report import Finding

    if __package__:
        from . import pipeline_findings
    else:
        import pipeline_findings

    out = []
    bon = results.get("best_of_n")
    if bon and bon.get("curve", {}).get("fit"):
        fit = bon["curve"]["fit"]
        out.append(Finding("bon_gao_fit", "Gao best-of-N form R(d) = d(α − β d) fitted to best-of-N's gold gain",
                           {k: fit[k] for k in ("alpha", "beta", "r2", "peak_kl")}, fit_verdict(fit)))
    sweep = results.get("beta_sweep")
    if sweep and "alpha" in sweep.get("gao_fit", {}):
        fit = sweep["gao_fit"]
        out.append(Finding("rl_gao_fit", "Gao RL form R(d) = d(α − β ln d) fitted to the β sweep's gold gain",
                           {k: fit[k] for k in ("alpha", "beta", "r2", "peak_kl", "n_points")},
                           fit_verdict(fit)))
    if sweep and "penalty_vs_early_stopping" in sweep:
        out.append(early_stopping_finding(sweep["penalty_vs_early_stopping"]))
    ens = results.get("ensembles")
    if ens and "objectives" in ens:
        out.append(pipeline_findings.ensemble_objectives_finding(ens["objectives"], ens["settings"]["beta"]))
    if bon and bon.get("curve", {}).get("points"):
        out.append(pipeline_findings.bon_kl_finding(bon["curve"]["points"]))
    if forecast_runs := pipeline_findings.forecast_point_lists((sweep or {}).get("kl_estimators") or []):
        out.append(pipeline_findings.forecast_finding(forecast_runs))  # the β sweep's lowest β, every seed
    elif (over := results.get("overoptimization")) and over.get("points"):  # every seed's low-β run (full mode)
        runs = over.get("per_seed") or [over]
        out.append(pipeline_findings.forecast_finding([run["points"] for run in runs if run.get("points")]))
    if ens and (ens.get("single_points") or {}).get("per_seed"):
        out.append(pipeline_findings.ensemble_warning_finding(ens["single_points"]["per_seed"]))
    if sweep and sweep.get("kl_estimators"):
        out.append(pipeline_findings.kl_estimator_finding(sweep["kl_estimators"]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The report: one section per stage, in the chapter's order
# ----------------------------------------------------------------------------------------------------------------------
def _rel(args: Any, path: str) -> str:
    return os.path.relpath(path, args.output_dir)


def section_lab(args, r):
    from hf_rlhf_ext.experiments.report import Section

    return Section("The lab", "An offline world small enough for a CPU where over-optimisation emerges for real: a "
                   "tiny GPT-2 warm-started with SFT on customer-support replies, a programmatic gold reward, and a "
                   f"proxy reward model trained on {r.get('pairs_train_n')} gold-labelled noisy pairs.",
                   [("SFT mean gold (held-out)", r.get("sft_test_gold_mean")),
                    ("SFT EOS rate", r.get("sft_test_eos_rate")),
                    ("policy parameters", r.get("policy_params")), ("label flip rate", r.get("pairs_train_flip_rate"))])


def _reading(holds: bool | None, yes: str, no: str) -> str:
    """The sentence the numbers support: ``yes`` when the claim holds, else ``no``."""
    return yes if holds else no


def section_reward_model(args, r):
    from hf_rlhf_ext.experiments.report import Section

    t, c = r["test"], claim_reward_model({"reward_model": r})
    acc, z = t["accuracy"], c.values["z"]
    over = c.values.get("accuracy_over_seeds")
    accs = list(over["per_seed"].values()) if over else [acc]
    above = all((a - 0.5) / math.sqrt(0.25 / t["n_pairs"]) >= RM_Z for a in accs) and (not over or ci_clears(accs, 0.5))
    seeds = (f" on the first of {len(accs)} seeds; accuracy over them {over['mean']:.3f}, {_ci(over['ci95'])}"
             if over else "")
    chance = _reading(above, f"above chance (z = {z:.1f}{seeds})",
                      f"not distinguishable from chance (z = {z:.1f}{seeds})")
    quality = "far from perfect — a proxy" if acc < 0.9 else "close to perfect on these pairs"
    if "length_only_accuracy" in c.values:
        ref, over = c.values["length_only_accuracy"], c.values.get("margin_over_length_only_over_seeds")
        margin = _over_seeds(over, "margin")
        quality += _reading(c.holds, f"; it beats a length-only predictor ({ref:.0%}) by the margin{margin}",
                            f"; it does NOT beat a length-only predictor ({ref:.0%}) by the margin{margin}")
    if c.values.get("label_noise_ceiling") is not None:
        quality += f" (label noise caps accuracy near {c.values['label_noise_ceiling']:.0%})"
    return Section("Reward model (exercises 12–13)",
                   f"Trained with a Bradley–Terry loss on noisy labels, the RM orders "
                   f"{acc:.0%} of held-out pairs like their labels and {t.get('gold_accuracy', float('nan')):.0%} of "
                   f"clearly separated pairs like the gold reward: {chance}, {quality}.",
                   [(k, t.get(k)) for k in ("accuracy", "gold_accuracy", "corr_gold", "n_pairs")])


def section_clip(args, r):
    from hf_rlhf_ext.experiments.report import Section

    rows = [(f"ρ = {row['ratio']}", {"A=+1": row["grad_A_pos"], "A=−1": row["grad_A_neg"]}) for row in r["table"]]
    text = _reading(claim_clip({"clip": r}).holds, f"On synthetic ratios with ε = {r['epsilon']}: for A > 0 the "
                    "gradient is A up to ρ = 1 + ε and 0 beyond (nothing more to gain); for A < 0 it is A down to "
                    "1 − ε and 0 below. Moves in the harmful direction are never clipped: the full gradient corrects "
                    "them.", f"On synthetic ratios with ε = {r['epsilon']} the objective does NOT behave as the "
                    f"chapter says: |∂L/∂ρ| reaches {r['max_abs_grad_favourable']:.3g} where it should be clipped "
                    f"to 0, and |∂L/∂ρ − A| {r['max_abs_grad_minus_A_unfavourable']:.3g} where it should be the full "
                    "gradient.")
    return Section("The clipped objective (exercise 16)", text, rows, [_rel(args, r["plot"])])


def section_group_advantages(args, r):
    from hf_rlhf_ext.experiments.report import Section

    verdict = _reading(claim_group_advantages({"group_advantages": r}).holds,
                       "They are what GRPO says they are.", "They are NOT what GRPO says they are (see the claim).")
    return Section("GRPO's group advantages (exercise 19)", f"On {r['batches']} real training batches (groups of "
                   f"{r['num_generations']}), the advantages were recomputed from the logged rewards and checked: the "
                   f"largest |group mean| was {r['max_abs_group_mean']:.1e}, sign mismatches "
                   f"{r['max_sign_mismatch_frac']:.0%}, largest difference from the recomputed ones "
                   f"{r['max_abs_diff_recomputed']:.1e}, {r['violations']} violations; "
                   f"{r['mean_zero_std_frac']:.0%} of groups had identical rewards (no signal). {verdict}",
                   [(k, r[k]) for k in ("max_abs_group_mean", "max_sign_mismatch_frac", "max_abs_diff_recomputed",
                                        "mean_zero_std_frac", "violations")])


def _trend(values: list[float]) -> str:
    """How a curve moves: at every step, overall, or not at all."""
    if all(b >= a for a, b in zip(values, values[1:])) and values[-1] > values[0]:
        return "rises at every N"
    if values[-1] > values[0]:
        return "rises overall, though not at every N"
    return "does NOT rise with N"


def _gold_shape(pts: list[dict], gold: str) -> str:
    peak = max(pts, key=lambda p: p[gold])
    if peak is pts[-1] or peak[gold] - pts[-1][gold] < HACK_MARGIN:
        return f"gold ends at {pts[-1][gold]:.2f}, near its best ({peak[gold]:.2f} at N = {peak['n']}): no fall"
    return (f"gold peaks at N = {peak['n']} ({peak[gold]:.2f}, KL {peak['kl']:.2f} nats) and falls to "
            f"{pts[-1][gold]:.2f}")


def section_best_of_n(args, r):
    from hf_rlhf_ext.experiments.report import Section

    gold, proxy = r.get("gold"), r["select"]
    pts = r["curve"]["points"]
    text = (f"From one pool of {r['pool_size']} samples per held-out prompt, the best of N by {proxy} "
            f"{_trend([p[proxy] for p in pts])} ({pts[0][proxy]:.2f} → {pts[-1][proxy]:.2f})")
    if gold:
        before, after = r["initial"][gold], r["distilled"][0]["eval"][gold]
        claim = claim_best_of_n({"best_of_n": r})
        moved = _reading(claim.holds, "raises", "does NOT raise (by the margin)")
        text += (f", while {_gold_shape(pts, gold)}. One round of distillation {moved} the policy's own gold: "
                 f"{before:.2f} → {after:.2f}{' on the first seed' if r.get('per_seed', [])[1:] else ''}"
                 f"{_over_seeds(claim.values.get('gain_over_seeds'))}.")
        if c := r.get("best_of_1"):
            text += (f" Distilling randomly chosen samples (best of 1) moved it {c['initial'][gold]:.2f} → "
                     f"{c['distilled'][0]['eval'][gold]:.2f}"
                     f"{_over_seeds(claim.control['values'].get('gain_over_seeds'))}.")
    table = [(f"N = {p['n']}", {k: p[k] for k in p if k not in ("n", "sqrt_kl")}) for p in pts]
    table += [(f"distilled round {d['round']}", d["eval"]) for d in r["distilled"]]
    return Section("Best-of-N and its distillation (exercise 21)", text, table, [_rel(args, p) for p in r["plots"]])


def _over_seeds(stats: dict | None, what: str = "gain") -> str:
    """' (gain over 3 seeds +0.21, 95% t interval [...])', or nothing for one seed."""
    if not stats:
        return ""
    return f" ({what} over {len(stats['per_seed'])} seeds {stats['mean']:+.3f}, {_ci(stats['ci95'])})"


def section_mini_loop(args, r):
    from hf_rlhf_ext.experiments.report import Section

    claim = claim_mini_loop({"mini_loop": r})
    seeds = ""
    if g := claim.values.get("gain_over_seeds"):
        k = claim.values["kl_ratio_over_seeds"]
        seeds = (f" (over {len(g['per_seed'])} seeds: polite gain {g['mean']:+.2f}, {_ci(g['ci95'])}; KL ÷ the "
                 f"same seed's KL without the penalty {k['mean']:.2f}, {_ci(k['ci95'])})")
    verdict = _reading(claim.holds, f"The loop learned the behaviour under its leash{seeds}.",
                       f"The claim does NOT hold on these numbers{seeds} (see the claim and its control).")
    if c := r.get("no_kl_penalty"):
        verdict = (f"Without the KL penalty the same loop went {c['polite_share_before']:.2f} → "
                   f"{c['polite_share_after']:.2f} at {c['kl_after']:.2f} nats. " + verdict)
    return Section("The mini loop that ends politely (exercise 18)",
                   f"Plain PyTorch: sample, score 'ends with a polite "
                   f"closing', subtract a baseline, PPO-clip with a per-token KL penalty. In {r['steps']} steps"
                   f"{' on the first seed' if seeds else ''} the "
                   f"held-out polite share went {r['polite_share_before']:.2f} → {r['polite_share_after']:.2f} at "
                   f"{r['kl_after']:.2f} nats. {verdict}",
                   [(k, r.get(k)) for k in ("polite_share_before", "polite_share_after", "kl_after", "gold_before",
                                            "gold_after")], [_rel(args, p) for p in r["plots"]])


def section_overoptimization(args, r):
    """One run's curve in words, read by the claim in quick mode; in full mode that run is the first seed's (read by
    the hump rule on it alone) and a second reading over the seeds follows, chosen by the claim."""
    from hf_rlhf_ext.experiments.report import Section

    f = r["findings"]
    kl = f"KL {f['kl_at_peak']:.2f}, " if f["kl_at_peak"] is not None else ""  # none measured at β = 0
    text = (f"GRPO at β = {r['beta']} for {r['steps']} steps. The monitor found the gold peak at step {f['peak_step']} "
            f"({kl}smoothed gold {f['peak_gold']:.2f}); by the end gold was {f['final_gold']:.2f} while the proxy "
            f"had gone from {f['proxy_at_peak']:.2f} to {f['final_proxy']:.2f}"
            ) if f["peak_step"] is not None else "No gold peak was found"
    claim = claim_overoptimization({"overoptimization": r})
    this_run = _hump(r)[0] if r.get("per_seed") else claim.holds
    if r.get("per_seed"):
        text = f"Seed {r['per_seed'][0]['seed']}: " + text
    text += _reading(this_run, ": Goodhart's law, measured.", ": the rise-then-fall was NOT resolved in this run.")
    if r.get("per_seed"):
        text += " " + _seeds_reading(claim, r["high_beta"]["beta"])
    if h := r.get("high_beta"):
        g = h["findings"]
        highest = g.get("max_gold") if g.get("max_gold") is not None else g["peak_gold"]  # older results: the peak
        text += (f" From the same start at β = {h['beta']} gold ended at {g['final_gold'] or float('nan'):.2f} "
                 f"(its highest {highest or float('nan'):.2f}).")
    return Section("β too low hacks the reward (exercises 9, 10, 22)", text,
                   [(k, f[k]) for k in ("peak_step", "peak_gold", "final_gold", "proxy_at_peak", "final_proxy",
                                         "kl_at_peak", "final_kl", "detected_step")],
                   [_rel(args, p) for p in r["plots"]])


def _seeds_reading(claim, high_beta: float) -> str:
    """Over seeds: the fall's interval against its bar and the proxy, in words chosen by the claim's verdict."""
    v, c = claim.values, claim.control["values"]
    lo, hi = v["fall_ci95"] or (float("nan"), float("nan"))
    rose = sum(s["proxy_rise"] is not None and s["proxy_rise"] > 0 for s in v["per_seed"].values())
    numbers = (f"Over seeds {', '.join(v['per_seed'])} gold fell {v['fall_mean']:.2f} on average (95% interval "
               f"[{lo:.2f}, {hi:.2f}], bar {v['bar']:.2f}) and the proxy rose after the gold peak in {rose} of "
               f"{len(v['per_seed'])}; at β = {high_beta} the fall was "
               f"{c['fall_mean']:.2f}")
    return numbers + _reading(claim.holds, ": the hump is beyond seed-to-seed noise.",
                              ": the hump is NOT shown beyond seed-to-seed noise (or the control shows it too).")


def section_reinforce(args, r):
    from hf_rlhf_ext.experiments.report import Section

    b = r["baselines"]
    rows = [(name, {"median grad variance": v["median_grad_variance"]["median"], "× none": v["variance_vs_none"],
                    "final reward": v["final_reward"]["mean"]}) for name, v in b.items()]
    cut = b["none"]["median_grad_variance"]["median"] / b["running_mean"]["median_grad_variance"]["median"]
    gain = {name: b[name]["final_reward"]["mean"] - b[name]["first_reward"] for name in ("none", "running_mean")}
    cuts = _reading(cut >= VARIANCE_CUT, f"cuts the gradient variance {cut:.0f}×",
                    f"does NOT cut the gradient variance (×{cut:.2f})")
    if r.get("no_offset"):
        flat = _variance_cut(r["no_offset"])
        cuts += f" (without the offset {flat:.1f}×: " + _reading(
            flat >= VARIANCE_CUT, "a real cut, not only the offset's)", "most of the cut was the offset's)")
    learns = _reading(gain["none"] < 0.5 * gain["running_mean"], "the run without a baseline barely learns",
                      "the run without a baseline learns about as much or more")
    return Section("REINFORCE and its baseline (exercises 14–15)", f"A constant +{r['reward_offset']:g} added to every "
                   "reward changes no expected gradient, only its variance without a baseline. Measured over seeds "
                   f"{r['seeds']}: the running-mean baseline {cuts}, and {learns} in the same number of steps (reward "
                   f"gain {gain['none']:+.2f} against {gain['running_mean']:+.2f}). "
                   f"{_gain_reading(claim_reinforce({'reinforce': r}))}", rows, [_rel(args, p) for p in r["plots"]])


def _ci(ci: list[float] | None) -> str:
    return "no interval" if ci is None else f"95% t interval [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _gain_reading(claim: Any) -> str:
    """Whether REINFORCE raised the reward, as the interval over seeds and the untrained control say."""
    v = claim.values
    if "reward_gain_ci95" not in v or v["reward_gain_ci95"] is None:
        return f"Whether REINFORCE raises the reward is NOT decided here: {claim.skipped}."
    ci, n = v["reward_gain_ci95"], len(v["reward_gain_per_seed"])
    c = claim.control["values"]
    against = (f"the untrained start measured twice moved {c['mean']:+.2f} ({_ci(c['ci95'])})" if c["mean"] is not
               None else "the untrained start was not measured twice")
    gain = f"{v['reward_gain']:+.2f} ({_ci(ci)} over {n} seeds)"
    if claim.control_holds:
        return (f"Over the untrained start the reward moved {gain}, but {against}: a gain of that size needs no "
                "learning, so it is NOT shown.")
    if _gain_rule(list(v["reward_gain_per_seed"].values())):
        return f"REINFORCE raised the reward by {gain} over the untrained start, while {against}."
    if ci[1] < 0:
        return f"The reward FELL under REINFORCE: {gain} against the untrained start, while {against}."
    return (f"The reward gain over the untrained start, {gain}, is NOT distinguishable from no gain (the interval "
            f"must lie above 0 with a mean of at least {REWARD_GAIN}); {against}.")


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _leash(claim: Any) -> str:
    """The reading of the KL-vs-β claim: its verdict, else which of its parts failed, in the direction measured."""
    v, share = claim.values, (claim.control or {}).get("values", {}).get("share_rule_holds")
    if claim.holds:
        return (f"KL falls as β rises: the leash works (a shuffled β order is this ordered in {share:.0%} of "
                "orderings)")
    if v.get("rho") is not None and v["rho"] >= -KL_RHO:
        return "KL RISES with β: the leash does NOT work here"
    if not _kl_rule(v["betas"], v["final_kl"]):
        return "KL is not ordered by β: the leash is not shown here"
    if claim.control_holds:
        return (f"KL falls as β rises on this grid, but a shuffled β order is as ordered in {share:.0%} of "
                "orderings: too few β values to tell the leash from chance, NOT shown")
    if v["kl_fall"] < MIN_KL_FALL:
        return (f"KL falls as β rises, but only by {v['kl_fall']:.2g} nats (< {MIN_KL_FALL}): the policy barely "
                "moved from the reference, so the leash is NOT shown")
    return (f"KL falls as β rises, but by {v['kl_fall']:.2f} nats, within the seed-to-seed range at one β "
            f"({v['seed_range_at_one_beta']:.2f}): the leash is NOT shown beyond the noise")


def section_beta_sweep(args, r):
    from hf_rlhf_ext.experiments.report import Section

    rows = [(f"β = {row['beta']:g}", {"final KL": row["final_kl"]["mean"], "final proxy": row["final_proxy"]["mean"],
                                     "final gold": row["final_gold"]["mean"], "gold peak": row["peak_gold"]["mean"]})
            for row in r["per_beta"]]
    fit, low, rho = r["gao_fit"], r["lowest_beta"], r["spearman_beta_final_kl"]
    fall = low["peak_gold"] - low["final_gold"]
    gold = _reading(fall >= HACK_MARGIN, f"gold peaks at {low['peak_gold']:.2f} and falls to {low['final_gold']:.2f}",
                    f"gold ends at {low['final_gold']:.2f}, near its peak {low['peak_gold']:.2f}")
    leash = _leash(claim_kl_vs_beta({"beta_sweep": r}))
    text = (f"ρ(β, final KL) = {rho if rho is not None else float('nan'):.2f}: {leash}. At β = {low['beta']:g} "
            f"{gold} while the proxy goes {low['proxy_at_peak']:.2f} → {low['final_proxy']:.2f}; at β = "
            f"{r['highest_beta']['beta']:g} the KL ends at {r['highest_beta']['final_kl']:.2f} nats.")
    if "alpha" in fit:
        fits = fit_verdict(fit)
        text += (f" The Gao RL form {'fits' if fits == 'fits' else 'does NOT fit'} the gold gain (α = "
                 f"{fit['alpha']:.2f}, β = {fit['beta']:.2f}, R² = {fit['r2']:.2f}; {fits}).")
    if pves := r.get("penalty_vs_early_stopping"):
        text += (f" Against early stopping at the same KL, a higher β changes the gold by "
                 f"{_signed(pves['mean_difference'])} ({pves['n_pairs']} pairs, {pves['n_seeds']} seed(s)): "
                 f"{pves['verdict']}.")
    return Section("β sweep: KL against reward (exercise 17)", text, rows, [_rel(args, p) for p in r["plots"]])


# What the section says of GRPO's memory, by measure: (lower by the margin, not lower, the measure's name)
MEMORY_WORDS = {"state_memory_mb": ("holds less training state", "does NOT hold less training state",
                                    "training state"),
                "peak_memory_mb": ("peaks lower", "does NOT peak lower", "peak memory")}


def _memory_reading(v: dict, key: str, grpo_mb: float, ppo_mb: float) -> str:
    """The memory half of the verdict, in the words of the measure that decided it."""
    lower, not_lower, _ = MEMORY_WORDS[key]
    if "memory_ok" not in v:  # a result without per-run numbers
        return _reading(grpo_mb < ppo_mb, f"GRPO needs no critic and {lower}", f"GRPO needs no critic, yet {not_lower}")
    return (f"GRPO needs no critic and {lower}" if v["memory_ok"] else
            f"GRPO needs no critic, yet {not_lower}: PPO {lower} by the margin" if v["ppo_lower"] else
            f"GRPO needs no critic, yet {not_lower} by the margin ({MEMORY_MARGIN:.0%})")


def _memory_numbers(t: dict, key: str) -> str:
    """GRPO's memory against PPO's by the deciding measure, peak memory beside a training state."""
    method = t["ppo"].get("memory_method", "per process")
    grpo_peak, ppo_peak = t["grpo"]["peak_memory_mb"]["mean"], t["ppo"]["peak_memory_mb"]["mean"]
    if key == "peak_memory_mb":
        return f"peak memory {grpo_peak:.0f} MB against PPO's {ppo_peak:.0f} MB (measured the same way, {method})"
    return (f"training state {t['grpo'][key]['mean']:.1f} MB against PPO's {t['ppo'][key]['mean']:.1f} MB (the "
            "weights, gradients and optimizer state each holds, each storage once: the same for every seed; peak "
            f"memory {grpo_peak:.0f} vs {ppo_peak:.0f} MB beside it, {method})")


def section_ppo_vs_grpo(args, r):
    from hf_rlhf_ext.experiments.report import Section

    t = r["trainers"]
    key = memory_measure(r)
    shown = ("gold_start", "gold_peak", "gold_end", "kl_end", "peak_memory_mb", "state_memory_mb", "seconds_per_step")
    rows = [(name, {k: v[k]["mean"] for k in shown if k in v}) for name, v in t.items()]
    claim = claim_ppo_vs_grpo({"ppo_vs_grpo": r})
    v = claim.values
    memory = _memory_reading(v, key, v["grpo_memory_mb"], v["ppo_memory_mb"])
    if "memory_ok" not in v:  # a result without per-run numbers
        both = _reading(min(v["ppo_gold_gain"], v["grpo_gold_gain"]) >= GOLD_GAIN, "both raise gold",
                        "gold does NOT rise by the margin under both")
    else:
        risen = [name.upper() for name, ok in v["gold_ok"].items() if ok]
        both = ("both raise gold" if len(risen) == 2 else f"gold does NOT rise by the margin under both (only "
                f"{risen[0]} does)" if risen else "gold does NOT rise by the margin under both (under neither)")
    text = (f"Same prompts, 32 sampled completions per step, seeds {r['seeds']}. {memory}: {_memory_numbers(t, key)}; "
            f"{both}: held-out gold {t['ppo']['gold_start']['mean']:.2f} → {t['ppo']['gold_end']['mean']:.2f} (PPO) "
            f"and → {t['grpo']['gold_end']['mean']:.2f} (GRPO).")
    if claim.control:
        c = claim.control["values"]
        moved = max(x["higher_mb"] - x["lower_mb"] for x in c["self"].values())
        text += (f" Against itself with another seed a method's {MEMORY_WORDS[key][2]} moved at most {moved:.1f} MB "
                 f"and the untrained start's gold {c['gold_start_spread']:.2f}" + _reading(
                     not claim.control_holds, ": neither shows the effect.",
                     ": the control shows an effect as large, so the comparison is NOT beyond the noise."))
    elif claim.holds is None:
        text += f" Not decided: {claim.skipped}."
    return Section("PPO vs GRPO (exercises 20, 22)", text, rows, [_rel(args, p) for p in r["plots"]])


def section_ensembles(args, r):
    from hf_rlhf_ext.experiments.report import Section

    o = r["objectives"]
    rows = [(name, {k: v[k]["mean"] for k in ("peak_gold", "end_gold", "fall", "final_kl")}) for name, v in o.items()]
    best = min(o, key=lambda n: o[n]["fall"]["mean"])
    return Section("Reward-model ensembles (a mitigation)", f"At β = {r['settings']['beta']} the single proxy RM and "
                   f"ensembles of {r['settings']['k']} RMs were optimised alike. The smallest gold fall from its peak "
                   f"was under '{best}' ({o[best]['fall']['mean']:.3f}); with seeds {r['settings']['seeds']} whether "
                   "an ensemble objective falls less than the single RM is the finding 'rm_ensembles' (paired by "
                   "seed, with its interval), not a claim.", rows,
                   [_rel(args, p) for p in r["plots"]])


def concepts_text(r: dict) -> str:
    lines = ["**The four models of PPO**, read off the `PPOTrainer` this run built:", "",
             "| role | class | parameters | updated by the optimizer | trained? |", "|---|---|---|---|---|"]
    lines += [f"| {m['role']} | {m['class']} | {m['params']:,} | {m['trainable']:,} | "
              f"{'yes' if m['trained'] else 'frozen'} |" for m in r["models"]]
    t = r["trajectory"]
    lines += ["",
              f"**Text generation as RL**, on one completion sampled from the {t['policy']} policy. The state s_t is "
              f"the prompt plus the tokens so far, the action a_t the next token, the trajectory the whole reply; the "
              f"reward of each token is −β·(log π − log π_ref) (β = {t['kl_coef']}) and the reward model's score "
              f"({t['score']:.3f}) is added at the last token.", "", f"prompt: `{t['prompt']}`", "",
              "| t | action a_t | log π − log π_ref | r_t |", "|---|---|---|---|"]
    lines += [f"| {s['t']} | `{s['action']}` | {s['log_ratio']:+.3f} | {s['reward']:+.3f} |" for s in t["steps"]]
    lines += ["", f"Return Σ r_t = {t['return']:.3f}."]
    return "\n".join(lines)


SECTIONS = {"lab": section_lab, "reward_model": section_reward_model, "reinforce": section_reinforce,
            "clip": section_clip, "beta_sweep": section_beta_sweep, "group_advantages": section_group_advantages,
            "ppo_vs_grpo": section_ppo_vs_grpo, "best_of_n": section_best_of_n, "ensembles": section_ensembles,
            "mini_loop": section_mini_loop, "overoptimization": section_overoptimization}

STAGES = [  # the chapter's order; the cost (seconds in --quick) orders the stages that run side by side
    Stage("lab", "The lab", stage_lab, 0),
    Stage("reward_model", "Reward model", stage_reward_model, 7),
    Stage("reinforce", "REINFORCE baselines", stage_reinforce, 69),
    Stage("clip", "The clipped objective", stage_clip, 0.1),
    Stage("beta_sweep", "β sweep", stage_beta_sweep, 72),
    Stage("group_advantages", "GRPO's group advantages", stage_group_advantages, 2),
    Stage("ppo_vs_grpo", "PPO vs GRPO", stage_ppo_vs_grpo, 82),
    Stage("best_of_n", "Best-of-N and distillation", stage_best_of_n, 17),
    Stage("ensembles", "Reward-model ensembles", stage_ensembles, 23),
    Stage("mini_loop", "The mini loop", stage_mini_loop, 32),
    Stage("overoptimization", "β too low", stage_overoptimization, 38),
    Stage("concepts", "Concepts", stage_concepts, 0.2),
]
FIRST, LAST = ("lab",), ("concepts",)  # the lab before all (it builds the cache); the concepts read best-of-N's model
NAMES = [s.name for s in STAGES]


CLAIM_STAGES = {"rm_accuracy": "reward_model", "reinforce_baseline": "reinforce", "clip_gradient": "clip",
                "kl_falls_with_beta": "beta_sweep", "beta_too_low": "overoptimization",
                "grpo_advantages": "group_advantages", "grpo_vs_ppo": "ppo_vs_grpo", "bon_distillation": "best_of_n",
                "mini_loop": "mini_loop"}


def _provenance(results: dict, store: Any) -> dict:
    """Per stage: run in this invocation, reused from which one, or its stored file not used."""
    from hf_rlhf_ext.experiments.report import PROVENANCE

    return {name: store.provenance(results[name]) if PROVENANCE in results[name] else
            {"ran": "stored file not used (no matching fingerprint)", "invocation": None, "created": None}
            for name in NAMES if name in results}


def _intro(args: Any, results: dict, provenance: dict) -> str:
    total = sum(r.get("stage_seconds") or 0 for r in results.values())
    reused = [name for name, p in provenance.items() if p["ran"] == "reused"]
    ran = sum(p["ran"] == "this invocation" for p in provenance.values())
    where = ("the numbers of every stage come from this invocation" if not reused else
             f"{ran} stage(s) ran in this invocation and {len(reused)} were reused from earlier invocations with the "
             f"same settings ({', '.join(reused)}; see 'Where the numbers come from')")
    side = f", up to {args.max_parallel} side by side" if getattr(args, "max_parallel", 1) > 1 else ""
    world = f"the testbed {args.lab_dir}" if getattr(args, "on_testbed", False) else "the offline lab"
    return (f"Every experiment of the RLHF chapter, run {'in quick mode ' if args.quick else ''}on "
            f"{world if args.on_lab else args.model_name_or_path or 'your model'}: {total / 60:.1f} "
            f"minutes of stage time{side}. Each claim below is decided by the statistic next to it; {where}.")


def write_report(args: Any, results: dict, seconds: float, store: Any) -> dict:
    """claims.json and report.md from the stages' results; prints the verdicts. Returns the claims payload."""
    from hf_rlhf_ext.experiments.report import read_claims, render_report, write_claims

    provenance = _provenance(results, store)
    claims = [build(results) for build in CLAIMS]
    for c in claims:
        c.provenance = provenance.get(CLAIM_STAGES.get(c.id, ""))
    found = findings(results)
    sections = [SECTIONS[name](args, results[name]) for name in NAMES
                if name in SECTIONS and name in results and not results[name].get("skipped")]
    concepts = concepts_text(results["concepts"]) if "concepts" in results and not results["concepts"].get(
        "skipped") else ""
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(render_report("The RLHF chapter, measured", _intro(args, results, provenance), sections, claims,
                              found, concepts, provenance))
    stage_seconds = {name: r.get("stage_seconds") for name, r in results.items()}
    total = sum(v for v in stage_seconds.values() if v)  # all stages' time, also when some ran before a resume
    write_claims(args.output_dir, claims, found, total, args.quick,
                 {"on_lab": args.on_lab and not getattr(args, "on_testbed", False),
                  "testbed": args.lab_dir if getattr(args, "on_testbed", False) else None,
                  "stage_seconds": stage_seconds, "this_invocation_seconds": round(seconds, 1),
                  "invocation": store.invocation, "stages": provenance})
    for c in claims:
        print(f"  [{c.verdict():>13}] {c.statement}")
    print(f"wrote {args.output_dir}/report.md and claims.json ({seconds:.0f} s now, {total:.0f} s of stages)")
    return read_claims(args.output_dir)

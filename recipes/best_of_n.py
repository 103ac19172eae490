"""Best-of-N and its distillation (hf_rlhf_ext.experiments.best_of_n) — on the offline lab by default, on any model
with flags.

    python recipes/best_of_n.py                                   # the lab: SFT policy, proxy RM selects, gold tracked
    python recipes/best_of_n.py --n 8 --rounds 3 --output_dir runs/bon-ei     # expert iteration, 3 rounds
    accelerate launch recipes/best_of_n.py --config recipes/configs/best_of_n_lab.yaml
    python recipes/best_of_n.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_name_or_path <rm> --use_peft --output_dir runs/bon-qwen

1. Best-of-N's own over-optimisation curve on held-out prompts: one pool of ``pool_size`` samples per prompt, the
   expected proxy and gold of the best of n for n = 1, 2, 4, …, pool_size (unbiased, no resampling), against
   sqrt(KL_bon), with the Gao best-of-N form fitted to the gold gain  ->  bon_curve.png
2. Best-of-N distillation: sample ``n`` per training prompt, keep the best by the first reward, fine-tune with
   ``trl.SFTTrainer`` (this script's training arguments are ``SFTConfig``'s), ``rounds`` times  ->  distillation.png
3. Held-out proxy, gold and KL (to the initial policy) of the initial policy, of best-of-N at inference and of the
   distilled model after each round.

Writes <output_dir>/{metrics.json, bon_curve.png, distillation.png}, each round's model (and a card saying which
round it is) in <output_dir>/round_<k>/ and, at the top level, the round with the best held-out gold (``best_round``
in metrics.json; without a gold reward, the last round). When no round beats the starting policy's held-out gold,
that round is still the one kept at the top level (it is the best distilled model) and the console and the model card
say that the starting policy is better (or as good, on a tie).
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trl import ModelConfig, SFTConfig

from hf_rlhf_ext.rewards import import_reward_func
from hf_rlhf_ext.run.build import build_reward_funcs, load_lab, load_prompt_datasets, resolve_policy
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import outputs_line, recipe_command
from hf_rlhf_ext.run.parsing import apply_cpu_defaults, make_recipe_parser, read_lab_config
from hf_rlhf_ext.run.spec import RLScriptArguments

#: The lab run's settings, written once in this YAML file: the parser's defaults on the lab only (elsewhere TRL's);
#: flags and --config override them.
LAB_CONFIG = Path(__file__).parent / "configs" / "best_of_n_lab.yaml"


@dataclass
class BestOfNScriptArguments(RLScriptArguments):
    """The RL recipes' arguments (policy, prompts, rewards, evaluation) plus best-of-N's own.

    Args:
        n: samples per training prompt in distillation, and the N of best-of-N at inference.
        pool_size: samples per held-out prompt for the best-of-n curve (n = 1, 2, 4, …, pool_size).
        rounds: distillation rounds (expert iteration: each round samples from the last round's model).
        max_new_tokens: completion length limit.
        eval_samples_per_prompt: samples per held-out prompt when evaluating a policy.
        sampling_batch_size: sequences per forward pass when sampling (at most).
        sampling_memory_budget_mb: what the sequences in flight may hold (KV caches, logits) when sampling and
            scoring pools: pools are sampled in chunks that fit (default: as much as the policy's weights, >= 256 MB).
        select: the reward that picks the best (default: the first, i.e. the optimised RM / function).
        gold_funcs: held-out judges (dotted paths) scored alongside as "<name>_tracked", never used to pick; the first
            stands in for gold off the lab (on the lab, the lab's gold reward is used; on a testbed, its judge).
    """

    n: int = field(default=8, metadata={"help": "Best of N: samples per prompt."})
    pool_size: int = field(default=64, metadata={"help": "Samples per held-out prompt for the best-of-n curve."})
    rounds: int = field(default=2, metadata={"help": "Distillation rounds (expert iteration)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Completion length limit."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt in evaluations."})
    sampling_batch_size: int = field(default=256, metadata={"help": "Sequences per forward pass when sampling."})
    sampling_memory_budget_mb: float | None = field(
        default=None,
        metadata={"help": "MB the sequences in flight may hold when sampling (default: the weights' size)."}
    )
    select: str | None = field(default=None, metadata={"help": "Reward that picks the best (default: the first)."})
    gold_funcs: list[str] | None = field(
        default=None, metadata={"help": "Held-out judge(s) scored alongside, never used to pick (off the lab)."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("n", "pool_size", "rounds", "max_new_tokens", "eval_samples_per_prompt", "sampling_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_eval_prompts < 1:
            raise ValueError("--num_eval_prompts must be >= 1: best-of-N is measured on held-out prompts.")


def load_models(path: str, training_args: SFTConfig, use_peft: bool) -> tuple[Any, Any]:
    """(policy to distil, reference = the initial policy): a frozen second copy, or "disable_adapter" with LoRA
    (the reference is then the same model with its adapter off)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = None  # used here: SFTTrainer is handed the model itself
    policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if use_peft:
        return policy, "disable_adapter"
    reference = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    reference.requires_grad_(False)
    return policy, reference


def main(script_args: BestOfNScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    from trl import get_peft_config

    from hf_rlhf_ext.experiments.best_of_n import (
        BestOfNSampler,
        choose_round,
        copy_model_files,
        distill_best_of_n,
        evaluate_samples,
    )
    from hf_rlhf_ext.model_card import push_folder
    from hf_rlhf_ext.objectives import best_of_n_kl
    from hf_rlhf_ext.plots import plot_best_of_n_curve, plot_distillation
    from hf_rlhf_ext.results import write_metrics
    from hf_rlhf_ext.rewards import tracking

    start = time.time()
    apply_cpu_defaults(training_args)
    needs_lab = not (model_args.model_name_or_path and script_args.dataset_name and
                     (script_args.reward_model_name_or_path or script_args.reward_funcs))
    lab = load_lab(script_args) if needs_lab else None
    on_lab = not script_args.dataset_name and lab is not None
    path, tokenizer = resolve_policy(model_args, training_args, lab)
    train, test = load_prompt_datasets(script_args, lab, seed=training_args.seed, tokenizer=tokenizer)
    _, _, rewards = build_reward_funcs(script_args, SimpleNamespace(reward_weights=None), lab, on_lab=on_lab)
    # the lab's gold reward, or a testbed's judge: build_reward_funcs appends it last
    gold = list(rewards)[-1] if on_lab and script_args.track_gold else None
    for name in script_args.gold_funcs or []:
        judge = tracking(import_reward_func(name))  # renamed: the same function may also be the optimised one
        rewards[judge.__name__] = judge
        gold = gold or judge.__name__
    select = script_args.select or next(iter(rewards))
    if test is None or not len(test):
        raise ValueError("Best-of-N is measured on held-out prompts: give the data set a test split.")
    pool = list(test["prompt"])
    eval_prompts = [pool[i % len(pool)] for i in range(script_args.num_eval_prompts)]
    policy, reference = load_models(path, training_args, model_args.use_peft)
    sampling = dict(select=select, max_new_tokens=script_args.max_new_tokens,
                    batch_size=script_args.sampling_batch_size, memory_budget_mb=script_args.sampling_memory_budget_mb)

    # 1. best-of-N's curve on held-out prompts, from one pool of pool_size samples per prompt
    sampler = BestOfNSampler(policy, tokenizer, rewards, n=script_args.n, **sampling)
    curve, _, _ = sampler.curve(eval_prompts, script_args.pool_size, gold=gold, seed=training_args.seed)
    at_n = next((p for p in curve.points if p["n"] == script_args.n), None)

    # 2. the initial policy, then distillation rounds, each evaluated the same way
    def evaluate(model: Any, round_index: int) -> dict[str, float]:
        return evaluate_samples(model, tokenizer, eval_prompts, rewards, script_args.max_new_tokens,
                                reference=None if round_index == 0 else reference,
                                num_samples=script_args.eval_samples_per_prompt, seed=training_args.seed + 1000,
                                batch_size=script_args.sampling_batch_size,
                                memory_budget_mb=script_args.sampling_memory_budget_mb)

    initial = evaluate(policy, 0)
    peft_config = get_peft_config(model_args)
    model, rounds = distill_best_of_n(
        policy, tokenizer, list(train["prompt"]), {**sampling, "reward_funcs": rewards, "n": script_args.n},
        training_args, rounds=script_args.rounds, evaluate=evaluate, peft_config=peft_config, seed=training_args.seed,
    )
    kept = choose_round(initial, rounds, gold)

    metrics = {
        "select": select, "gold": gold, "n": script_args.n, "pool_size": script_args.pool_size,
        "rounds": script_args.rounds, "num_eval_prompts": len(eval_prompts),
        "eval_samples_per_prompt": script_args.eval_samples_per_prompt,
        "initial": initial,
        "best_of_n": {**(at_n or {}), "kl": best_of_n_kl(script_args.n)},
        "distilled": [r.to_dict() for r in rounds],
        "best_round": kept["best_round"],
        "kept": kept,
        "curve": curve.to_dict(),
        "seconds": round(time.time() - start, 1),
    }
    if training_args.process_index == 0:
        copy_model_files(rounds[kept["best_round"] - 1].model_dir, training_args.output_dir)
        plot_best_of_n_curve(curve, os.path.join(training_args.output_dir, "bon_curve.png"))
        plot_distillation(metrics, list(rewards), os.path.join(training_args.output_dir, "distillation.png"))
        write_metrics(training_args.output_dir, metrics)
        print(summary_text(metrics, list(rewards), training_args.output_dir, path))
        repo = (training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
                if training_args.push_to_hub else None)
        write_card(metrics, list(rewards), path, script_args, training_args, peft_config, repo)
        write_round_cards(metrics, list(rewards), path, script_args, peft_config)
        if repo:  # the folder as it is: model, card, plots, metrics
            push_folder(training_args.output_dir, repo, token=training_args.hub_token,
                        private=training_args.hub_private_repo, revision=training_args.hub_revision)
        print(outputs_line(training_args.output_dir))
    return metrics


def _rows(metrics: dict[str, Any]) -> list[tuple[str, dict, float | None]]:
    """(label, rewards, KL) for the initial policy, best-of-N at inference and every distilled round."""
    rows = [("initial policy", metrics["initial"], 0.0),
            (f"best-of-{metrics['n']} (inference)", metrics["best_of_n"], metrics["best_of_n"]["kl"])]
    return rows + [(f"distilled, round {r['round']}", r["eval"], r["eval"].get("kl")) for r in metrics["distilled"]]


def kept_text(metrics: dict[str, Any], policy: str) -> str:
    """Which round's model is at the top level and why, in one sentence (console and card), with a clear warning when
    no round beat the starting policy."""
    kept = metrics["kept"]
    k, by = kept["best_round"], kept["by"]
    n = metrics["rounds"]
    where = f"every round's model is in its folder, round_1/{f' … round_{n}/' if n > 1 else ''}"
    if by is None:
        return f"The top-level model is round {k}, the last ({kept['reason']}); {where}."
    if kept["beats_initial"] is False:
        tie = f"{kept['gold']:.3f}" == f"{kept['initial_gold']:.3f}"  # equal as printed: neither is better
        verdict = f"is as good on held-out {by}" if tie else "is the better model"
        return (f"WARNING: no distilled round beat the starting policy on held-out {by} (the best, round {k}: "
                f"{kept['gold']:.3f}; the starting policy: {kept['initial_gold']:.3f}). Round {k} is kept at the top "
                f"level as the best distilled model, but the starting policy ({policy}) {verdict}; {where}.")
    start = f"; the starting policy: {kept['initial_gold']:.3f}" if kept["initial_gold"] is not None else ""
    return (f"The top-level model is round {k}, the highest held-out {by} of the {metrics['rounds']} round(s) "
            f"({kept['gold']:.3f}{start}); {where}.")


def write_card(metrics: dict[str, Any], names: list[str], policy: str, script_args: BestOfNScriptArguments,
               training_args: SFTConfig, peft_config: Any, hub_repo: str | None = None) -> None:
    """The distilled model's card: the held-out table of ``summary_text``, both plots, how to load the model (from
    ``hub_repo`` when it is pushed there)."""
    from hf_rlhf_ext.model_card import (
        RunCard,
        hub_id_or_none,
        load_snippet,
        lora_settings,
        markdown_table,
        settings_from,
        write_model_card,
    )

    out = training_args.output_dir
    table = markdown_table(["held-out", *names, "KL to the initial policy (nats)"],
                           [(label, *(values.get(n) for n in names), kl) for label, values, kl in _rows(metrics)])
    dataset = hub_id_or_none(script_args.dataset_name)
    write_model_card(out, RunCard(
        title=(hub_repo or os.path.basename(os.path.abspath(out))).split("/")[-1],
        summary=(f"Best-of-{metrics['n']} distilled into the policy ({metrics['rounds']} round(s) of sampling "
                 f"{metrics['n']} replies per prompt, keeping the best by `{metrics['select']}` and fine-tuning on "
                 "it with TRL's SFTTrainer), with best-of-N's own over-optimisation curve on held-out prompts. "
                 + kept_text(metrics, policy)),
        recipe="recipes/best_of_n.py", command=recipe_command("recipes/best_of_n.py", script_args.cli_args),
        tags=("best-of-n", "distillation", "sft"), base_model=hub_id_or_none(policy),
        datasets=[dataset] if dataset else [], library_name="peft" if peft_config is not None else "transformers",
        hyperparameters={**settings_from(("n", "pool_size", "rounds", "select", "max_new_tokens", "learning_rate",
                                          "num_train_epochs", "per_device_train_batch_size", "seed"),
                                         script_args, training_args),
                         **lora_settings(peft_config)},
        results_markdown=table + f"\n\nOn {metrics['num_eval_prompts']} held-out prompts × "
                                 f"{metrics['eval_samples_per_prompt']} samples; all numbers are in `metrics.json`.",
        plots={"bon_curve.png": curve_caption(metrics.get("curve", {}).get("fit")),
               "distillation.png": "Each reward against KL: the initial policy, best-of-N and each distilled round"},
        usage=load_snippet(hub_repo or out, "peft" if peft_config is not None else "causal_lm"),
    ))


def write_round_cards(metrics: dict[str, Any], names: list[str], policy: str, script_args: BestOfNScriptArguments,
                      peft_config: Any) -> None:
    """Each ``round_<k>/`` folder's card: which round it is, its held-out numbers, whether it is the top-level model
    (SFTTrainer leaves its generic card there, which names no model and links to huggingface.co/None)."""
    from hf_rlhf_ext.model_card import RunCard, hub_id_or_none, load_snippet, markdown_table, write_model_card

    kind = "peft" if peft_config is not None else "causal_lm"
    for r in metrics["distilled"]:
        k, kept = r["round"], metrics["best_round"]
        where = "the top-level model" if k == kept else f"not the top-level model (round {kept} is)"
        write_model_card(r["model_dir"], RunCard(
            title=f"round_{k}",
            summary=(f"Round {k} of {metrics['rounds']} of best-of-{metrics['n']} distillation of {policy} (fine-tuned "
                     f"on the best of {metrics['n']} samples per prompt by `{metrics['select']}`); {where}. Every "
                     "round's held-out numbers and why one is kept are in the card one folder up (../README.md)."),
            recipe="recipes/best_of_n.py", command=recipe_command("recipes/best_of_n.py", script_args.cli_args),
            tags=("best-of-n", "distillation", "sft"), base_model=hub_id_or_none(policy),
            library_name="peft" if peft_config is not None else "transformers",
            results_markdown=markdown_table(["held-out", *names, "KL to the initial policy (nats)"],
                                            [(f"round {k}", *(r["eval"].get(n) for n in names), r["eval"].get("kl"))]),
            usage=load_snippet(r["model_dir"], kind),
        ))


def curve_caption(fit: dict[str, Any] | None) -> str:
    """The curve plot's caption: it names the Gao fit only where the plot draws one (a fit that describes the data)."""
    text = "Best-of-n on held-out prompts: each reward against sqrt(KL_bon)"
    if not fit:
        return text
    return f"{text}, with the Gao fit" if fit.get("valid", True) else f"{text}; no Gao fit drawn ({fit['reason']})"


def fit_text(fit: dict[str, Any]) -> str:
    """The Gao fit in one line: its numbers only when it describes the data, else "no fit" and why."""
    if not fit.get("valid", True):
        return f"Gao best-of-N fit to the gold gain: no fit ({fit['reason']})"
    peak = f"{fit['peak_kl']:.2f} nats" if fit["peak_kl"] is not None else "none in range"
    return (f"Gao best-of-N fit to the gold gain: alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f}, "
            f"R^2 {fit['r2']:.3f}, predicted peak at KL {peak}")


def summary_text(metrics: dict[str, Any], names: list[str], output_dir: str, policy: str = "") -> str:
    """Console lines: each reward and the KL for the initial policy, best-of-N and every distilled round, and which
    round is kept."""
    widths = [max(len(n), 9) + 2 for n in names]  # every column wider than its name: two spaces between columns
    header = f"  {'':<28}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)) + f"{'KL (nats)':>12}"
    lines = ["", f"held-out ({metrics['num_eval_prompts']} prompts):", header]
    for label, values, kl in _rows(metrics):
        cells = "".join(f"{values.get(n, float('nan')):>+{w}.3f}" for n, w in zip(names, widths))
        lines.append(f"  {label:<28}{cells}{kl if kl is not None else float('nan'):>12.3f}")
    if metrics["curve"].get("fit"):
        lines.append("  " + fit_text(metrics["curve"]["fit"]))
    lines.append("  " + kept_text(metrics, policy or "the initial policy"))
    lines.append(f"wrote {output_dir}/metrics.json, bon_curve.png, distillation.png and the distilled model "
                 f"(round {metrics['best_round']}; {metrics['seconds']:.0f} s)")
    return "\n".join(lines)


def make_parser():
    return make_recipe_parser(BestOfNScriptArguments, SFTConfig, read_lab_config(LAB_CONFIG),
                              lora_learning_rate_multiplier=None)  # distillation with LoRA: not measured


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

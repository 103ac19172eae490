"""What a recipe run leaves: the held-out evaluation of the policy before and after training, ``metrics.json`` and
``log_history.jsonl``, the model card and its plots, the evaluation in the trackers, the push, and the last line
saying where it all is."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from transformers import TrainerCallback

from ..model_card import RecipeCard, lora_settings, settings_from
from ..objectives import kl_k1, kl_k3
from ..reference import Reference, ReferencePolicy, reference_model, resolve_reference
from ..results import ResultsCallback, write_metrics
from ..sampling import completion_mask, per_token_logps, policy_eos_ids, sample_policy
from .build import end_trainer
from .errors import RunInterrupted
from .monitors import monitor_results
from .parsing import launch_command

if TYPE_CHECKING:
    from .spec import RLScriptArguments, RLSetup

logger = logging.getLogger(__name__)


def _prompt_texts(prompts: Sequence[Any], tokenizer: Any) -> list[str]:
    if prompts and isinstance(prompts[0], list):  # conversational
        return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return list(prompts)


@torch.no_grad()
def evaluate_policy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    reward_funcs: dict[str, Callable],
    max_new_tokens: int,
    sampling: str = "sample",
    reference: Reference | None = None,
    batch_size: int = 32,
    seed: int = 0,
    num_samples: int = 4,
) -> dict[str, Any]:
    """Samples one completion per held-out prompt (:func:`hf_rlhf_ext.sampling.sample_policy`, at temperature 1, or
    greedy) and scores it with every reward function.

    Returns ``{"<name>": mean reward, ..., "eos_rate", "mean_length", "kl_to_reference" (sequence k1, sampled
    completions only, when ``reference`` is given: a model, ``"disable_adapter"`` for the same PEFT model with its
    adapters disabled, or a trainer's :class:`~hf_rlhf_ext.reference.ReferencePolicy`), "kl_k3_to_reference" (the same
    with k3), "samples": [...]}``.
    """
    if not prompts:
        return {}
    eos_ids = policy_eos_ids(model, tokenizer)
    completion_ids, kl = _sample_for_eval(model, tokenizer, prompts, max_new_tokens, sampling == "sample", reference,
                                          batch_size, seed, eos_ids)
    completions: list[Any] = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    result: dict[str, Any] = {}
    for name, func in reward_funcs.items():
        values = func(prompts=list(prompts), completions=completions, completion_ids=completion_ids)
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        result[name] = sum(finite) / len(finite) if finite else None
    result["eos_rate"] = sum(bool(ids) and ids[-1] in eos_ids for ids in completion_ids) / len(completion_ids)
    result["mean_length"] = sum(len(ids) for ids in completion_ids) / len(completion_ids)
    if kl:
        result["kl_to_reference"] = sum(k1 for k1, _ in kl) / len(kl)
        result["kl_k3_to_reference"] = sum(k3 for _, k3 in kl) / len(kl)
    result["samples"] = [
        {"prompt": p, "completion": c} for p, c in zip(list(prompts)[:num_samples], completions[:num_samples])
    ]
    return result


def _sample_for_eval(model, tokenizer, prompts, max_new_tokens, sample, reference, batch_size, seed, eos_ids):
    """(completion ids cut after the first EOS, [(k1, k3)] per completion when sampled with a reference). The
    model's training mode and the caller's CPU random state are restored."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    texts = _prompt_texts(prompts, tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completion_ids, kl = [], []
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            tokens, logps = sample_policy(
                model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, temperature=1.0,
                pad_token_id=pad_id, eos_token_ids=eos_ids, greedy=not sample,
            )
            mask = completion_mask(tokens, eos_ids)
            completion_ids.extend(row[m.bool()].tolist() for row, m in zip(tokens, mask))
            if reference is not None and sample:
                kl.extend(_sequence_kl(model, reference, enc, tokens, mask, logps))
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return completion_ids, kl


def _sequence_kl(model, reference, enc, tokens, mask, logps) -> list[tuple[float, float]]:
    """(k1, k3) summed over each sampled completion: k1 = log π − log π_ref and k3 = eˣ − 1 − x with
    x = log π_ref − log π, both unbiased for KL(π‖π_ref) at temperature 1; k3 is ≥ 0 and has the lower variance.
    log π comes with the samples; log π_ref from one forward pass of the reference."""
    with reference_model(model, reference) as ref:
        ref_logps = per_token_logps(ref, enc["input_ids"], enc["attention_mask"], tokens, mask)
    m = mask.to(logps.dtype)
    k1, k3 = (kl_k1(logps, ref_logps) * m).sum(dim=1), (kl_k3(logps, ref_logps) * m).sum(dim=1)
    return [(float(a), float(b)) for a, b in zip(k1, k3)]


def _reference_for_eval(trainer: Any) -> ReferencePolicy | None:
    """The initial policy, as every π_ref of this package is found (:func:`hf_rlhf_ext.reference.resolve_reference`:
    the adapter-disabled PEFT model or the trainer's reference model); None without one (no copy is made)."""
    return resolve_reference(trainer, allow_copy=False, who="the held-out evaluation")


def summary_text(metrics: dict[str, Any]) -> str:
    """A few console lines for a person: each reward before -> after on held-out prompts, the KL to the initial
    policy (k3: never negative, lower variance than k1, which stays in ``metrics.json`` as ``kl_after``), and sample
    completions before and after (the numbers themselves live in ``metrics.json``)."""
    lines = ["", f"held-out evaluation ({metrics.get('num_eval_prompts', 0)} completions, "
                 f"{metrics.get('eval_sampling')}):"]
    for name in metrics.get("reward_funcs", []):
        if f"{name}_before" in metrics:
            lines.append(f"  {name:<24} {metrics[f'{name}_before']:+.3f} -> {metrics[f'{name}_after']:+.3f}")
    if "kl_k3_after" in metrics:
        lines.append(f"  {'KL to initial policy':<24} {metrics['kl_k3_after']:.3f} nats per completion (k3)")
    before, after = metrics.get("samples_before", []), metrics.get("samples_after", [])
    for b, a in zip(before, after):
        lines += [f"  prompt: {_as_text(b['prompt'])}", f"    before: {_as_text(b['completion'])}",
                  f"    after:  {_as_text(a['completion'])}"]
    return "\n".join(lines)


def _as_text(value: Any) -> str:
    """A prompt or completion as a person reads it: chat messages as ``role: content`` turns, not a Python list."""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return " | ".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
# Model card of an RL recipe's output folder
# ----------------------------------------------------------------------------------------------------------------------
def recipe_command(script: str, cli_args: list[str] | None) -> str:
    """The command line that reproduces a recipe run (``cli_args``: as parsed; None when run from Python)."""
    import shlex

    if cli_args is None:
        return f"python {script}  # run from Python: the settings are listed below"
    return " ".join([launch_command(script), *(shlex.quote(a) for a in cli_args)])


def _result_rows(metrics: dict[str, Any]) -> list[tuple]:
    before, after = metrics["eval_before"], metrics["eval_after"]
    rows: list[tuple] = []
    for name, weight in zip(metrics["reward_funcs"], metrics["reward_weights"]):
        role = "tracked, weight 0" if weight == 0 else f"optimised, weight {weight:g}"
        rows.append((f"held-out {name} ({role})", before.get(name), after.get(name)))
    if "kl_k3_to_reference" in after:
        rows.append(("KL to the initial policy, k3 (nats per completion)", 0.0, after["kl_k3_to_reference"]))
        rows.append(("KL to the initial policy, k1 (nats per completion)", 0.0, after["kl_to_reference"]))
    rows += [("completions ending with EOS", before.get("eos_rate"), after.get("eos_rate")),
             ("mean completion length (tokens)", before.get("mean_length"), after.get("mean_length"))]
    return rows


def write_run_card(trainer: Any, setup: RLSetup, script_args: RLScriptArguments, training_args: Any,
                   card: RecipeCard, metrics: dict[str, Any]) -> str:
    """Writes the training-curve plot and ``<output_dir>/README.md`` (a ``huggingface_hub.ModelCard``); returns the
    card's path. Called after ``save_model``, so it replaces the template PEFT writes for an adapter."""
    from ..callbacks.overoptimization import PLOT_FILE as OVEROPTIMIZATION_PLOT
    from ..model_card import CARD_FILE, RunCard, hub_id_or_none, load_snippet, write_model_card
    from ..plots import plot_training_curves

    out = training_args.output_dir
    plot_training_curves(trainer.state.log_history, os.path.join(out, "training_curves.png"), title=card.method)
    repo = _hub_repo_id(trainer, training_args) if training_args.push_to_hub else None
    base = "the lab's SFT policy" if setup.on_lab and setup.model == getattr(setup.lab, "policy_path", None) \
        else f"`{hub_id_or_none(setup.model) or os.path.basename(os.path.normpath(setup.model))}`"
    data = "the lab's prompts" if setup.on_lab else f"`{script_args.dataset_name}`"
    dataset_id = hub_id_or_none(script_args.dataset_name)
    optimised = [name for name, weight in zip(metrics["reward_funcs"], metrics["reward_weights"]) if weight]
    run = RunCard(
        title=(repo or os.path.basename(os.path.abspath(out))).split("/")[-1],
        summary=(f"{card.method} ({'a LoRA adapter on ' if setup.peft_config else ''}{base}), trained on {data} for "
                 f"{metrics['global_step']} steps, rewarded by {', '.join(optimised)}."),
        recipe=card.script,
        command=recipe_command(card.script, script_args.cli_args),
        settings=getattr(script_args, "settings_line", ""),
        tags=card.tags,
        base_model=hub_id_or_none(setup.model),
        datasets=[dataset_id] if dataset_id else [],
        library_name="peft" if setup.peft_config is not None else "transformers",
        hyperparameters={**settings_from(card.hyperparameters, training_args, script_args),
                         **lora_settings(setup.peft_config)},
        metrics=_result_rows(metrics),
        metrics_note=(f"Measured on {metrics['num_eval_prompts']} held-out completions ({metrics['eval_sampling']}), "
                      "before and after training; all numbers are in `metrics.json`, the curves in "
                      "`log_history.jsonl`."),
        plots={"training_curves.png": "Reward and KL on the training batches against the optimizer step",
               OVEROPTIMIZATION_PLOT: "Over-optimisation monitor: proxy and gold rewards and KL, gold maximum "
                                      "marked"},
        usage=load_snippet(repo or out, "peft" if setup.peft_config is not None else "causal_lm",
                           with_critic=os.path.isdir(os.path.join(out, "value_model"))),
    )
    write_model_card(out, run)
    return os.path.join(out, CARD_FILE)


def log_evaluation(trainer: Any, evaluation: dict[str, Any]) -> None:
    """Sends the held-out evaluation's numbers to the trainer's trackers (``report_to``: TensorBoard, Trackio, ...)
    and to ``log_history.jsonl`` as ``eval_<name>`` at the current step (``eval/<name>`` in TensorBoard): the
    evaluation before training lands at step 0, the one after at the last step."""
    logs = {f"eval_{k}": float(v) for k, v in evaluation.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if not logs:
        return
    trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ResultsCallback):
            callback.flush()  # after training no later event would write the record


class _LogAtTrainBegin(TrainerCallback):
    """Logs an evaluation made before training once the trainer's trackers exist: a tracker opened earlier writes
    somewhere else (TensorBoard: ``./runs`` instead of the run's logging directory)."""

    def __init__(self, trainer: Any, evaluation: dict[str, Any]):
        self.trainer, self.evaluation = trainer, evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        log_evaluation(self.trainer, self.evaluation)


def train_and_report(
    trainer: Any,
    setup: RLSetup,
    script_args: RLScriptArguments,
    training_args: Any,
    card: RecipeCard | None = None,
    monitors: dict[str, Any] | None = None,
    extra_metrics: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluates, trains, evaluates again (both evaluations also go to the trackers), saves (policy, and the critic
    for PPO), writes ``metrics.json`` (with ``extra_metrics()`` and what the ``monitors`` found), the training-curve
    plot and the model card (``card``), pushes the folder to the Hub when asked, and prints where everything is.
    Returns the metrics written."""
    accelerator = trainer.accelerator
    max_new = getattr(training_args, "max_completion_length", 32) or 32
    evaluate = accelerator.is_main_process and setup.eval_prompts

    def run_eval(with_reference: bool) -> dict[str, Any]:
        if not evaluate:
            return {}
        model = accelerator.unwrap_model(trainer.model)
        return evaluate_policy(
            model, setup.tokenizer, setup.eval_prompts, setup.eval_rewards, max_new_tokens=max_new,
            sampling=script_args.eval_sampling, reference=_reference_for_eval(trainer) if with_reference else None,
            seed=training_args.seed, num_samples=script_args.num_sample_completions,
        )

    before = run_eval(with_reference=False)
    accelerator.wait_for_everyone()
    # logged once the trackers are set up (their on_train_begin), at step 0 (or the step a resumed run starts from)
    trainer.add_callback(_LogAtTrainBegin(trainer, before))
    train_result = train_or_name_the_checkpoint(trainer, training_args, card.script if card else None,
                                                script_args.cli_args)
    after = run_eval(with_reference=True)
    log_evaluation(trainer, after)
    accelerator.wait_for_everyone()  # the evaluation runs on the main process only
    # no push from save_model: the folder is pushed once, with its card, below
    trainer.save_model(training_args.output_dir, _internal_call=True)

    metrics = _run_metrics(trainer, setup, script_args, train_result, before, after)
    if monitors:
        metrics["monitors"] = monitor_results(monitors)
    if extra_metrics is not None:
        metrics.update(extra_metrics())
    if accelerator.is_main_process:
        write_metrics(training_args.output_dir, metrics)
        print(summary_text(metrics))
        if card is not None:
            write_run_card(trainer, setup, script_args, training_args, card, metrics)
        if training_args.push_to_hub:
            from ..model_card import push_folder

            push_folder(training_args.output_dir, _hub_repo_id(trainer, training_args), token=training_args.hub_token,
                        private=training_args.hub_private_repo, revision=training_args.hub_revision)
        print(outputs_line(training_args.output_dir, card is not None))
    accelerator.wait_for_everyone()
    end_trainer(trainer)
    return metrics


def train_or_name_the_checkpoint(trainer: Any, training_args: Any, script: str | None,
                                 cli_args: list[str] | None) -> Any:
    """``trainer.train()``; stopped by Ctrl-C, it raises :class:`RunInterrupted` naming the last checkpoint and the
    command that resumes from it, so that the user loses at most ``save_steps`` steps and knows how to go on."""
    if training_args.push_to_hub and training_args.hub_strategy == "every_save":  # transformers' default
        # the folder is pushed once, with its card, after training; periodic checkpoints stay local (choose
        # --hub_strategy checkpoint or all_checkpoints to upload them as well)
        trainer.args.hub_strategy = "end"
    try:
        return trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except KeyboardInterrupt:
        hint = resume_hint(training_args.output_dir, trainer.state.global_step, trainer.state.max_steps, script,
                           cli_args)
        if trainer.accelerator.is_main_process and os.path.isdir(training_args.output_dir):
            _write_interrupted_card(training_args.output_dir, script, cli_args, hint)
        raise RunInterrupted(hint) from None


def _write_interrupted_card(output_dir: str, script: str | None, cli_args: list[str] | None, hint: str) -> None:
    """The folder's card says the run was interrupted and how to resume it (TRL writes its generic card with every
    checkpoint, which names no model and no result)."""
    from ..model_card import RunCard, write_model_card

    write_model_card(output_dir, RunCard(
        title=os.path.basename(os.path.abspath(output_dir)), summary=f"An unfinished run: {hint}",
        recipe=script or "a recipe", command=recipe_command(script or "<recipe>", cli_args), library_name=None,
        usage="The last checkpoint holds the policy (and the critic, for PPO) trained so far; resume to finish.",
    ))


def resume_hint(output_dir: str, step: int, max_steps: int, script: str | None, cli_args: list[str] | None) -> str:
    """One line: where an interrupted run stopped and how to resume it from its last checkpoint (if it has one)."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    where = f"interrupted at step {step} of {max_steps}"
    if last is None:
        return f"{where}, before its first checkpoint (see --save_strategy, --save_steps): nothing to resume from."
    if cli_args is None:  # run from Python
        command = f"train(resume_from_checkpoint={last!r})"
    else:  # the same command, its --resume_from_checkpoint (if any) replaced
        kept = _without_flag(cli_args, "--resume_from_checkpoint")
        command = recipe_command(script or "<recipe>", [*kept, "--resume_from_checkpoint", last])
    return f"{where}; resume from its last checkpoint ({os.path.basename(last)}) with: {command}"


def _without_flag(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag VALUE`` and ``flag=VALUE``."""
    kept, i = [], 0
    while i < len(args):
        if args[i] == flag:
            i += 2
            continue
        if not args[i].startswith(flag + "="):
            kept.append(args[i])
        i += 1
    return kept


def _is_testbed(lab: Any) -> bool:
    return bool(getattr(lab, "is_testbed", False))


def _run_metrics(trainer, setup, script_args, train_result, before, after) -> dict[str, Any]:
    train_logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    metrics: dict[str, Any] = {
        "train": {**(train_logs[-1] if train_logs else {}), **train_result.metrics},
        "global_step": trainer.state.global_step,
        "eval_before": {k: v for k, v in before.items() if k != "samples"},
        "eval_after": {k: v for k, v in after.items() if k != "samples"},
        "samples_before": before.get("samples", []),
        "samples_after": after.get("samples", []),
        # where the numbers come from: the offline lab itself, or a testbed around another policy (its directory)
        "on_lab": setup.on_lab and not _is_testbed(setup.lab),
        "testbed": setup.lab.root if _is_testbed(setup.lab) else None,
        "reward_funcs": list(setup.eval_rewards),
        "reward_weights": setup.reward_weights,
        "num_eval_prompts": len(setup.eval_prompts),
        "eval_sampling": script_args.eval_sampling,
    }
    for name in setup.eval_rewards:
        if name in before and name in after:
            metrics[f"{name}_before"], metrics[f"{name}_after"] = before[name], after[name]
    if "kl_to_reference" in after:
        metrics["kl_after"] = after["kl_to_reference"]
        metrics["kl_k3_after"] = after["kl_k3_to_reference"]
    return metrics


def _hub_repo_id(trainer: Any, training_args: Any) -> str:
    """The repository ``Trainer`` created for ``--push_to_hub`` (``--hub_model_id``, or the output folder's name)."""
    return (getattr(trainer, "hub_model_id", None) or training_args.hub_model_id
            or os.path.basename(os.path.abspath(training_args.output_dir)))


def outputs_line(output_dir: str, with_card: bool = True, metrics_file: str = "metrics.json") -> str:
    """The one line a recipe ends with: where its outputs are."""
    card = f"model card {os.path.join(output_dir, 'README.md')}, " if with_card else ""
    return f"outputs: {output_dir} ({card}metrics {os.path.join(output_dir, metrics_file)})"


def finish_experiment(training_args: Any, recipe: str, argv: Sequence[str], **card: Any) -> None:
    """How an experiment's recipe ends: its card (:func:`~hf_rlhf_ext.model_card.write_experiment_card`, with
    ``card``'s summary, tags, table and plots), the upload with ``--push_to_hub``, and the line saying where it all
    is."""
    from ..model_card import push_experiment, write_experiment_card

    out = training_args.output_dir
    write_experiment_card(out, recipe, argv, launcher=launch_command(recipe), **card)
    push_experiment(out, training_args)
    print(outputs_line(out))

"""Reward-model pieces shared by the lab and the reward recipe: train with ``trl.RewardTrainer``, score texts, and
report held-out pairwise accuracy (against the labels and, where the data has gold scores, against the gold order).

Preference data sets here have ``chosen`` / ``rejected`` columns (with an optional ``prompt``), as TRL expects. They
may also carry pre-tokenised ``chosen_ids`` / ``rejected_ids`` (full prompt + reply token ids); TRL then uses those
as they are, which is how the lab keeps an EOS token only where the policy really emitted one (from strings TRL
appends EOS to every reply). Gold columns, when present, are ``chosen_gold`` / ``rejected_gold``.

Mind the last token: a sequence-classification RM reads its score at the last non-pad token. TRL's RewardTrainer
trains string pairs with EOS appended, while TRL's GRPO scores ``prompt + completion`` decoded *without* special
tokens — so the same RM is read at a different position there. ``pairwise_report`` scores pairs exactly as the
RewardTrainer saw them; ``score_texts`` scores texts as given (append ``tokenizer.eos_token`` yourself to match).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .scoring import score_token_ids
from .validation import DataValidationError, require_preference_columns

CHOSEN_GOLD, REJECTED_GOLD = "chosen_gold", "rejected_gold"


def train_reward_model(
    model, tokenizer, train_dataset, eval_dataset=None, args=None, callbacks=None, quiet=False, peft_config=None
):
    """Builds a ``trl.RewardTrainer``, trains it and returns it (the trained model is ``trainer.model``).

    Validates first, so that a wrong column name or an empty split fails before any model work: both data sets need
    ``chosen`` and ``rejected`` (or pre-tokenised ``chosen_ids`` / ``rejected_ids``); the model needs one label.
    Pairs longer than ``args.max_length`` are *dropped* by TRL (not truncated): the number kept is in
    ``trainer.train_dataset``. ``peft_config`` trains a LoRA adapter (TRL wraps the model). ``quiet=True``
    removes the console printer/progress bar (logs still reach callbacks).
    """
    from trl import RewardConfig, RewardTrainer

    for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
        if ds is None:
            if name == "train":
                raise DataValidationError("train_reward_model needs a train_dataset.")
            continue
        if "chosen_ids" in ds.column_names and "rejected_ids" in ds.column_names:
            if len(ds) == 0:
                raise DataValidationError(f"The preference pairs data set ({name}) is empty.")
        else:
            require_preference_columns(ds)
    if getattr(model.config, "num_labels", None) != 1:
        raise ValueError(f"A reward model needs num_labels=1, the model has {model.config.num_labels}.")
    if args is None:
        args = RewardConfig(output_dir="reward_model", report_to="none", bf16=False)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if len(trainer.train_dataset) == 0:
        raise DataValidationError(
            f"Every training pair is longer than max_length={args.max_length} tokens; TRL drops such pairs."
        )
    trainer.train()
    return trainer


def _pair_sequences(dataset, tokenizer, side: str) -> list[list[int]]:
    """Token ids of one side of each pair, as ``trl.RewardTrainer`` builds them: the ``<side>_ids`` column when
    present, else the text ``prompt + <side>`` with the EOS token appended when missing (TRL trains on that form,
    and an RM scores the last token: scoring without the EOS would read a different position)."""
    if f"{side}_ids" in dataset.column_names:
        return [list(x) for x in dataset[f"{side}_ids"]]
    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [""] * len(dataset)
    texts = dataset[side]
    if texts and not isinstance(texts[0], str):
        raise DataValidationError(
            "pairwise_report scores plain-text pairs; apply the chat template first for conversational data."
        )
    eos = tokenizer.eos_token or ""
    full = [c if c.endswith(eos) else c + eos for c in texts]
    return [tokenizer(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, full)]


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def pairwise_report(model, tokenizer, dataset, gold_margin: float = 0.5, batch_size: int = 64) -> dict[str, Any]:
    """Held-out quality of a reward model on preference pairs.

    Returns ``accuracy`` (vs the labels: chosen scored above rejected, ties half), ``mean_margin`` / ``std_margin``
    of r_chosen - r_rejected, ``n_pairs``; with gold columns also ``gold_accuracy`` — agreement with the *gold* order
    on the pairs with |gold_chosen - gold_rejected| >= ``gold_margin`` (labels may be noisy; clearly separated gold
    pairs say what the model really learned) — ``n_gold_pairs``, ``label_gold_agreement`` (how often the labels
    themselves follow gold on those pairs) and ``corr_gold`` (Pearson correlation of reward and gold over all
    replies).
    """
    from .evaluation import load_pairwise_accuracy

    if not ("chosen_ids" in dataset.column_names and "rejected_ids" in dataset.column_names):
        require_preference_columns(dataset)
    if len(dataset) == 0:
        raise DataValidationError("pairwise_report got an empty preference data set.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    r_c = score_token_ids(model, _pair_sequences(dataset, tokenizer, "chosen"), pad, batch_size).tolist()
    r_r = score_token_ids(model, _pair_sequences(dataset, tokenizer, "rejected"), pad, batch_size).tolist()
    metric = load_pairwise_accuracy()
    res = metric.compute(chosen_scores=r_c, rejected_scores=r_r)
    margins = torch.tensor(r_c) - torch.tensor(r_r)
    report: dict[str, Any] = {
        "accuracy": float(res["accuracy"]),
        "mean_margin": float(res["mean_margin"]),
        "std_margin": float(margins.std()) if len(margins) > 1 else 0.0,
        "n_pairs": len(dataset),
    }
    if CHOSEN_GOLD in dataset.column_names and REJECTED_GOLD in dataset.column_names:
        g_c, g_r = dataset[CHOSEN_GOLD], dataset[REJECTED_GOLD]
        sep = [i for i in range(len(g_c)) if abs(g_c[i] - g_r[i]) >= gold_margin]
        report["n_gold_pairs"] = len(sep)
        report["gold_margin"] = gold_margin
        if sep:
            # orient each clearly separated pair by gold: (score of gold-better, score of gold-worse)
            better = [r_c[i] if g_c[i] > g_r[i] else r_r[i] for i in sep]
            worse = [r_r[i] if g_c[i] > g_r[i] else r_c[i] for i in sep]
            report["gold_accuracy"] = float(metric.compute(chosen_scores=better, rejected_scores=worse)["accuracy"])
            report["label_gold_agreement"] = sum(g_c[i] > g_r[i] for i in sep) / len(sep)
        else:
            report["gold_accuracy"] = float("nan")
            report["label_gold_agreement"] = float("nan")
        report["corr_gold"] = _pearson(r_c + r_r, list(g_c) + list(g_r))
    return report


def write_reward_model_card(trainer, metrics: dict[str, Any], card, command: str, base_model: str | None,
                            dataset: str | None, peft_config=None, hub_repo: str | None = None) -> str:
    """Writes the loss/accuracy plot and ``<output_dir>/README.md`` for a reward model trained by ``trainer``, with
    the held-out ``pairwise_report`` in ``metrics["test"]``; ``card`` is the recipe's ``model_card.RecipeCard``.
    Returns the card's path."""
    import os

    from .model_card import (
        CARD_FILE,
        RunCard,
        hub_id_or_none,
        load_snippet,
        lora_settings,
        settings_from,
        write_model_card,
    )
    from .plots import plot_reward_model_curves

    out = trainer.args.output_dir
    plot_reward_model_curves(trainer.state.log_history, os.path.join(out, "training_curves.png"), title=card.method)
    report = metrics["test"]
    rows = [("held-out pairwise accuracy (vs the labels)", report["accuracy"]),
            ("mean margin r_chosen − r_rejected", report["mean_margin"]), ("held-out pairs", report["n_pairs"])]
    if "gold_accuracy" in report:
        rows += [(f"accuracy vs gold on clearly separated pairs (gold gap ≥ {report['gold_margin']:g})",
                  report["gold_accuracy"]), ("clearly separated pairs", report["n_gold_pairs"]),
                 ("how often the labels follow gold on those pairs", report["label_gold_agreement"]),
                 ("correlation of reward and gold (Pearson)", report["corr_gold"])]
    base = hub_id_or_none(base_model)
    data_id = hub_id_or_none(dataset)
    run = RunCard(
        title=(hub_repo or os.path.basename(os.path.abspath(out))).split("/")[-1],
        summary=(f"A {card.method} {'(a LoRA adapter) ' if peft_config is not None else ''}on "
                 f"{'`' + base_model + '`' if base_model else 'the lab-sized GPT-2'}, trained on "
                 f"{metrics['n_train_pairs']} preference pairs of {'`' + dataset + '`' if dataset else 'the lab'}. "
                 "Its score is `logits[:, 0]` at the last non-pad token."),
        recipe=card.script, command=command, tags=card.tags, base_model=base, datasets=[data_id] if data_id else [],
        library_name="peft" if peft_config is not None else "transformers",
        hyperparameters={**settings_from(card.hyperparameters, trainer.args), **lora_settings(peft_config)},
        metrics=rows, metrics_note="On the held-out split, scored as the RewardTrainer saw the pairs; all numbers are "
                                   "in `metrics.json`.",
        plots={"training_curves.png": "Loss and pairwise accuracy on the training batches"},
        usage=load_snippet(hub_repo or out, "reward_peft" if peft_config is not None else "reward"),
    )
    write_model_card(out, run)
    return os.path.join(out, CARD_FILE)

"""Reward model with a Bradley–Terry loss (``trl.RewardTrainer``) and its held-out pairwise accuracy — on the offline
lab's gold-labelled noisy preference pairs by default, on any model and preference data set with flags.

    python recipes/reward.py                                    # the lab: tiny GPT-2 RM on 1000 noisy pairs
    accelerate launch recipes/reward.py --output_dir runs/rm
    python recipes/reward.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/ultrafeedback_binarized \\
        --use_peft --learning_rate 1e-4 --output_dir runs/rm-qwen

The held-out report (``metrics.json``) gives pairwise accuracy against the data set's labels, and — where the data
carries gold scores (``chosen_gold`` / ``rejected_gold``, as the lab's pairs do) — accuracy against the gold ordering of
clearly separated pairs, the correlation with gold, and margin statistics. Also writes ``log_history.jsonl`` and the
model (safetensors) with its tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, RewardConfig, ScriptArguments, get_peft_config

from hf_rlhf_ext.model_card import RecipeCard, push_folder
from hf_rlhf_ext.results import ResultsCallback, write_metrics
from hf_rlhf_ext.run.build import end_trainer, load_lab
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import log_evaluation, outputs_line, recipe_command
from hf_rlhf_ext.run.parsing import apply_cpu_defaults, make_recipe_parser, read_lab_config
from hf_rlhf_ext.validation import require_existing_path

#: The lab run's settings, written once in this YAML file: the parser's defaults on the lab only (elsewhere TRL's);
#: flags and --config override them.
LAB_CONFIG = Path(__file__).parent / "configs" / "reward_lab.yaml"
CARD = RecipeCard(
    script="recipes/reward.py", method="Bradley-Terry reward model (TRL's RewardTrainer)", tags=("reward-model",),
    hyperparameters=("learning_rate", "num_train_epochs", "per_device_train_batch_size", "lr_scheduler_type",
                     "center_rewards_coefficient", "max_length", "seed"),
)


@dataclass
class RewardScriptArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` (``dataset_name``, ``dataset_config``, splits) plus the lab and the report.

    Args:
        lab_dir: a lab directory to use (built there if missing); default: the cached default lab.
        gold_margin: pairs whose gold scores differ by at least this much count as "clearly separated" for the
            gold accuracy.
    """

    lab_dir: str | None = field(default=None, metadata={"help": "Lab directory (default: the cached default lab)."})
    gold_margin: float = field(default=0.5, metadata={"help": "Gold gap of a 'clearly separated' pair."})
    # the command line the recipe was parsed from (set by the recipe parser; shown in the model card)
    cli_args: list[str] | None = field(default=None, init=False, repr=False)


def load_model_and_tokenizer(model_args: ModelConfig, training_args: RewardConfig, lab=None):
    """A sequence classifier with one label: ``--model_name_or_path`` (``trust_remote_code`` from the config, False by
    default), else a fresh lab-sized reward model on the lab's tokenizer (on a testbed: its proxy's architecture)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_args.model_name_or_path:
        require_existing_path(model_args.model_name_or_path, "--model_name_or_path", "model directory")
        kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=1, dtype=model_args.dtype, **kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if lab.is_testbed:  # the proxy as the testbed's build made it (architecture, tokenizer, embedding start)
        from hf_rlhf_ext.lab.testbed import new_testbed_proxy

        pairs = lab.load_preferences()
        longest = max(len(ids) for split in pairs.values() for side in ("chosen_ids", "rejected_ids")
                      for ids in split[side])
        return new_testbed_proxy(lab.root, longest, seed=training_args.seed)
    from hf_rlhf_ext.lab.build import new_reward_model

    tokenizer = lab.load_tokenizer()
    return new_reward_model(lab.config, tokenizer, lab.policy_path), tokenizer


def load_preferences(script_args: RewardScriptArguments, lab=None):
    from hf_rlhf_ext.data import load_dataset_dict
    from hf_rlhf_ext.validation import DataValidationError, require_preference_columns

    require_existing_path(script_args.dataset_name, "--dataset_name", "data file or folder")
    data = load_dataset_dict(script_args.dataset_name, script_args.dataset_config) if script_args.dataset_name \
        else lab.load_preferences()
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in data:
            raise DataValidationError(f"The preference data set has no split {split!r} (it has {list(data)}).")
        require_preference_columns(data[split])
    return data[script_args.dataset_train_split], data[script_args.dataset_test_split]


def main(script_args: RewardScriptArguments, training_args: RewardConfig, model_args: ModelConfig) -> dict:
    from hf_rlhf_ext.reward_modeling import pairwise_report, train_reward_model, write_reward_model_card

    apply_cpu_defaults(training_args)
    on_lab = not script_args.dataset_name
    lab = load_lab(script_args) if on_lab or not model_args.model_name_or_path else None
    train, test = load_preferences(script_args, lab)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, lab)
    trainer = train_reward_model(
        model, tokenizer, train, None, training_args, callbacks=[ResultsCallback(training_args.output_dir)],
        peft_config=get_peft_config(model_args),
    )
    # no push from save_model: the folder is pushed once, with its card, below
    trainer.save_model(training_args.output_dir, _internal_call=True)
    metrics = {"train": trainer.state.log_history[-1], "n_train_pairs": len(trainer.train_dataset), "on_lab": on_lab}
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        metrics["test"] = pairwise_report(model, tokenizer, test, gold_margin=script_args.gold_margin)
        log_evaluation(trainer, metrics["test"])
        write_metrics(training_args.output_dir, metrics)
        report = metrics["test"]
        print(f"held-out pairwise accuracy {report['accuracy']:.3f} on {report['n_pairs']} pairs"
              + (f", vs gold {report['gold_accuracy']:.3f} on {report['n_gold_pairs']} clearly separated pairs"
                 if "gold_accuracy" in report else ""))
        repo = (getattr(trainer, "hub_model_id", None) or training_args.hub_model_id) if training_args.push_to_hub \
            else None
        write_reward_model_card(trainer, metrics, CARD, command=recipe_command(CARD.script, script_args.cli_args),
                                base_model=model_args.model_name_or_path, dataset=script_args.dataset_name,
                                peft_config=get_peft_config(model_args), hub_repo=repo)
        if repo:
            push_folder(training_args.output_dir, repo, token=training_args.hub_token,
                        private=training_args.hub_private_repo, revision=training_args.hub_revision)
        print(outputs_line(training_args.output_dir))
    trainer.accelerator.wait_for_everyone()
    end_trainer(trainer)
    return metrics


def make_parser():
    return make_recipe_parser(
        RewardScriptArguments, RewardConfig, read_lab_config(LAB_CONFIG), lora_learning_rate_multiplier=None
    )


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

"""The one table that says what becomes of every field of TRL's old ``PPOConfig`` (trl ≤ 1.12).

``hf_rlhf_ext.compat.PPOConfig`` reads it to refuse values that cannot keep their meaning, and
``docs/migration.md`` shows it (a test checks that the page's table is :func:`markdown_table`). No torch import here.

How each field is carried (``how``):
* ``same``: the same field, with the same meaning, in ``hf_rlhf_ext.trainers.PPOConfig``.
* ``renamed``: the same meaning under another name (the value is copied across).
* ``converted``: the old meaning is rebuilt from fields that exist now (the conversion is in ``new``).
* ``computed``: set at construction, as the old trainer did; a different value passed in is refused.
* ``script``: read by your script only, as before (the old trainer never read it either).
A field with ``refused_when`` is refused, before training, for those values: the error names the field and ``instead``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["OldField", "OLD_FIELDS", "refusals", "markdown_table"]


@dataclass(frozen=True)
class OldField:
    name: str
    how: str  # same | renamed | converted | computed | script
    new: str  # what carries the meaning now
    refused_when: str = ""  # in words; empty = every value is accepted
    instead: str = ""  # what to use for a refused value
    refuse: Callable[[Any], bool] | None = None  # config -> bool, the same rule as refused_when

    def refusal(self, config: Any) -> str | None:
        """The error message for ``config``, or None when its value keeps its meaning."""
        if self.refuse is None or not self.refuse(config):
            return None
        value = getattr(config, self.name, None)
        if self.how == "computed":  # show the value given, not the one computed since
            value = config._given_computed[self.name]
        return f"PPOConfig.{self.name}={value!r}: {self.refused_when}. Instead: {self.instead}"


def _same(name: str, note: str = "") -> OldField:
    return OldField(name, "same", f"`{name}`" + (f" ({note})" if note else ""))


OLD_FIELDS: tuple[OldField, ...] = (
    OldField("total_episodes", "converted",
             "`max_steps` = ⌈total_episodes / batch_size⌉ × num_mini_batches × num_ppo_epochs (one optimizer step per "
             "mini-batch and epoch); unset: num_train_epochs × len(train_dataset) episodes, as before",
             refused_when="is set together with max_steps", instead="give one of total_episodes and max_steps",
             refuse=lambda c: c.total_episodes is not None and c.max_steps > 0),
    OldField("response_length", "renamed", "`max_completion_length`",
             refused_when="disagrees with max_completion_length", instead="give only response_length",
             refuse=lambda c: c._max_completion_length_given not in (None, c.response_length)),
    OldField("stop_token", "converted",
             "`'eos'`: completions end at the tokenizer's EOS. None (the old default, with stop_token_id None): "
             "completions end where the old trainer's did — at the first EOS when the policy's generation pad is the "
             "tokenizer's pad; else they keep the old tail (filled after the policy's EOS, or response_length sampled "
             "tokens when it names none), scored and trained on (see below)",
             refused_when="is not None or 'eos'", instead="stop_token='eos' (--stop_token eos)",
             refuse=lambda c: c.stop_token not in (None, "eos")),
    OldField("stop_token_id", "converted",
             "the tokenizer's `eos_token_id`: the same as stop_token='eos' (checked when the trainer is built)",
             refused_when="is not the tokenizer's eos_token_id (checked by PPOTrainer), or is set with stop_token",
             instead="stop_token='eos'; to stop at another token set policy.generation_config.eos_token_id (the "
             "policy then stops at it and at the tokenizer's EOS)",
             refuse=lambda c: c.stop_token is not None and c.stop_token_id is not None),
    _same("temperature", "sampling temperature; the log-probs use it too, as before"),
    _same("missing_eos_penalty"),
    OldField("sft_model_path", "script", "read by your script (the trainer takes the loaded `model`)"),
    OldField("reward_model_path", "script",
             "read by your script; the `reward_model` and `value_model` objects it loads are used"),
    OldField("num_sample_generations", "converted",
             "`generate_completions(sampling=True)` on the first eval batch every ⌈updates / "
             "num_sample_generations⌉ updates (an update = one rollout), as before; 0 turns it off"),
    OldField("local_rollout_forward_batch_size", "converted",
             "at its default (64) nothing to do: rollout forward passes are chunked by "
             "`per_device_train_batch_size`",
             refused_when="is not 64: the rollout's no-grad forward passes are chunked by per_device_train_batch_size "
             "and generation runs on the whole rollout",
             instead="drop it; lower per_device_train_batch_size (and raise gradient_accumulation_steps) to save "
             "memory",
             refuse=lambda c: c.local_rollout_forward_batch_size != 64),
    _same("whiten_rewards"),
    _same("kl_coef", "β of the per-token KL in the reward; GRPO's `beta` is derived from it"),
    _same("kl_estimator", "'k1' or 'k3', the same estimators"),
    _same("num_ppo_epochs", "passes over each rollout (GRPO's `num_iterations`)"),
    OldField("num_mini_batches", "converted",
             "`num_mini_batches`; when > 1 the rollout stays per_device_train_batch_size × "
             "gradient_accumulation_steps and each mini-batch is one optimizer step (the per-device batch and "
             "accumulation are re-split)",
             refused_when="does not divide per_device_train_batch_size × gradient_accumulation_steps (as before)",
             instead="a rollout size that num_mini_batches divides",
             refuse=lambda c: c.per_device_train_batch_size * c.gradient_accumulation_steps % c.num_mini_batches != 0),
    _same("cliprange", "policy ratio clip (GRPO's `epsilon`)"),
    _same("cliprange_value"),
    _same("vf_coef"),
    _same("gamma"),
    _same("lam"),
    _same("ds3_gather_for_generation", "GRPOConfig's field"),
    OldField("dataset_num_proc", "converted", "processes that decode tokenised `input_ids` rows to `prompt` text"),
    OldField("exp_name", "converted", "`run_name` = f'{exp_name}__{seed}__{unix time}' when set, as trl 0.x did"),
    OldField("model_adapter_name", "converted", "None: the PEFT adapter is the one `peft_config` creates",
             refused_when="is set: there is one trainable adapter, made from peft_config",
             instead="drop it; pass the base model and peft_config",
             refuse=lambda c: c.model_adapter_name is not None),
    OldField("ref_adapter_name", "converted", "None: the reference is the policy with its adapter disabled",
             refused_when="is set: with PEFT the reference is the policy with its adapter disabled",
             instead="merge the reference adapter into the base model and pass that base with peft_config",
             refuse=lambda c: c.ref_adapter_name is not None),
    OldField("world_size", "computed", "`TrainingArguments.world_size` (number of processes)"),
    OldField("local_batch_size", "computed", "per_device_train_batch_size × gradient_accumulation_steps = the "
             "rollout per process (before any num_mini_batches re-split)",
             refused_when="disagrees with the computed value", instead="set per_device_train_batch_size and "
             "gradient_accumulation_steps", refuse=lambda c: c._computed_mismatch("local_batch_size")),
    OldField("micro_batch_size", "computed", "per_device_train_batch_size × world_size",
             refused_when="disagrees with the computed value", instead="set per_device_train_batch_size",
             refuse=lambda c: c._computed_mismatch("micro_batch_size")),
    OldField("batch_size", "computed", "local_batch_size × world_size = completions per rollout",
             refused_when="disagrees with the computed value", instead="set per_device_train_batch_size and "
             "gradient_accumulation_steps", refuse=lambda c: c._computed_mismatch("batch_size")),
    OldField("local_mini_batch_size", "computed", "local_batch_size / num_mini_batches",
             refused_when="disagrees with the computed value", instead="set num_mini_batches",
             refuse=lambda c: c._computed_mismatch("local_mini_batch_size")),
    OldField("mini_batch_size", "computed", "batch_size / num_mini_batches",
             refused_when="disagrees with the computed value", instead="set num_mini_batches",
             refuse=lambda c: c._computed_mismatch("mini_batch_size")),
    OldField("num_total_batches", "computed", "⌈total_episodes / batch_size⌉ = number of rollouts (set by the "
             "trainer, which knows the data set)",
             refused_when="is set", instead="set total_episodes",
             refuse=lambda c: c._computed_mismatch("num_total_batches")),
    _same("push_to_hub", "TrainingArguments' field; `trainer.push_to_hub(dataset_name=...)` works as before"),
)


def refusals(config: Any, how: str | None = None) -> list[str]:
    """The error messages of every old field (of kind ``how``, or all) whose value in ``config`` cannot keep its
    meaning."""
    return [msg for f in OLD_FIELDS if how in (None, f.how) and (msg := f.refusal(config)) is not None]


def markdown_table() -> str:
    """The table as it appears in docs/migration.md."""
    lines = ["| old field | how | now | refused when (use instead) |", "|---|---|---|---|"]
    for f in OLD_FIELDS:
        refused = f"{f.refused_when} (use: {f.instead})" if f.refused_when else ""
        lines.append(f"| `{f.name}` | {f.how} | {f.new} | {refused} |")
    return "\n".join(lines)

"""``PPOTrainer`` with the old TRL constructor (trl ≤ 1.12): a thin subclass of ``hf_rlhf_ext.trainers.PPOTrainer``.

The old call ``PPOTrainer(args, processing_class, model, ref_model, reward_model, train_dataset, value_model, ...)`` is
turned into our trainer's arguments; the PPO itself (rollouts, KL-shaped rewards, GAE, losses) is the parent's.
What the adapter keeps from the old trainer, and how:

* **Tokenised data sets.** Rows hold ``input_ids``; the policy is prompted with exactly those ids (they are *not*
  decoded and re-tokenised, which could change them: added BOS, other merges). A ``prompt`` column with the decoded
  text is added for the logs and the completion tables.
* **The reward model** scores prompt ids + completion ids as generated (ending at the EOS), with no text round trip,
  at the last non-pad token — what the old trainer scored.
* **The value model** (a sequence classifier) becomes the critic with its body *and* its ``score`` head, so the
  critic starts as that model, as before (its weights are trained in place, as before).
* **The reference**: a given ``ref_model``'s weights are loaded into the trainer's reference; ``None`` means a copy
  of the policy (or, with PEFT, the policy with its adapter disabled), as before.
* **total_episodes** becomes ``max_steps``; ``generate_completions`` and ``num_sample_generations`` print and log
  the old completion tables (``compat.completions``).
* **stop_token=None** (the old default): completions end where the old trainer's did (``compat.stop``) — at the
  first EOS when the policy's generation pad is the tokenizer's pad, else with the old tail after it (fill tokens, or
  ``response_length`` sampled tokens), on the KV-cache sampler; where that sampler is not used, one warning line.
* **The old metric names**: ``episode``, ``eps``, ``lr``, ``policy/entropy_avg`` and ``val/ratio_var`` are added to
  the parent's (which already logs the other old names).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..scoring import score_token_ids
from ..trainers.ppo import PPOTrainer as _PPOTrainer
from ..trainers.value_model import ValueModel
from .completions import SampleGenerationsCallback, completions_table, show_table
from .config import PPOConfig
from .stop import OldStop

__all__ = ["PPOTrainer", "TokenIdRewardModel", "critic_from_value_model"]

logger = logging.getLogger(__name__)


class TokenIdRewardModel:
    """A sequence-classification reward model as a reward function that scores token ids: the prompt's
    ``input_ids`` followed by the completion ids, as generated (the old trainer's reward)."""

    def __init__(self, model: nn.Module, pad_token_id: int, batch_size: int, device: Any):
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_token_id  # the classifier reads the score at the last non-pad token
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_token_id = model.config.pad_token_id
        self.batch_size = batch_size
        name = str(model.config.name_or_path or "").rstrip("/").split("/")[-1]
        self.__name__ = name or "reward_model"  # logged as rewards/<name>/mean

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        return score_token_ids(self.model, sequences, self.pad_token_id, self.batch_size).tolist()

    def __call__(self, prompts, completions, completion_ids, input_ids=None, **kwargs) -> list[float]:
        if input_ids is None:
            raise ValueError("The rows carry no input_ids column: the old PPOTrainer's data sets are tokenised.")
        return self.score(input_ids, completion_ids)


def critic_from_value_model(value_model: nn.Module, share_weights: bool) -> ValueModel:
    """The critic as the old trainer had it: the value model's body and its one-output ``score`` head."""
    score = getattr(value_model, "score", None)
    if not (isinstance(score, nn.Linear) and score.out_features == 1):
        raise ValueError(
            "value_model must be a sequence classifier with one output in a `score` head (e.g. "
            "AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)), as the old "
            f"PPOTrainer required; got {type(value_model).__name__}. Or pass an hf_rlhf_ext.trainers.ValueModel."
        )
    critic = ValueModel.from_model(value_model, share_weights=share_weights)
    head = critic.value_head
    with torch.no_grad():
        head.weight.copy_(score.weight.to(head.weight.dtype))
        head.bias.copy_(score.bias.to(head.bias.dtype) if score.bias is not None else torch.zeros_like(head.bias))
    return critic


def _with_prompt_text(dataset: Any, tokenizer: Any, num_proc: int | None, name: str) -> Any:
    """Adds ``prompt`` (the decoded ``input_ids``, special tokens skipped) to a tokenised data set."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {k: _with_prompt_text(v, tokenizer, num_proc, f"{name}[{k!r}]") for k, v in dataset.items()}
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{name} has no input_ids column (columns: {dataset.column_names}). hf_rlhf_ext.compat.PPOTrainer takes "
            "data sets tokenised to input_ids, as the old PPOTrainer did; for a `prompt` text column use "
            "hf_rlhf_ext.trainers.PPOTrainer."
        )
    if "prompt" in dataset.column_names:
        dataset = dataset.remove_columns("prompt")
    return dataset.map(
        lambda batch: {"prompt": tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)},
        batched=True, num_proc=num_proc, desc=f"Decoding {name} prompts",
    )


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


class PPOTrainer(_PPOTrainer):
    """The old ``PPOTrainer(args, processing_class, model, ref_model, reward_model, train_dataset, value_model,
    data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None)`` on
    :class:`hf_rlhf_ext.trainers.PPOTrainer`. Methods: ``train``, ``save_model`` (policy, plus the critic in
    ``value_model/``), ``generate_completions``, ``push_to_hub``."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class: Any,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward_model: nn.Module,
        train_dataset: Any,
        value_model: nn.Module | None = None,
        data_collator: Any = None,
        eval_dataset: Any = None,
        optimizers: tuple = (None, None),
        callbacks: list | None = None,
        peft_config: Any = None,
    ) -> None:
        self._check_old_arguments(args, processing_class, model, ref_model, reward_model, train_dataset, data_collator)
        if peft_config is not None and ref_model is not None and not _same_weights(ref_model, model):
            raise ValueError(
                "ref_model with peft_config: the reference is the policy with its adapter disabled, and this ref_model "
                "differs from the policy. Pass ref_model=None (as the old script does with PEFT), or merge the "
                "reference into the base model you pass."
            )
        train_dataset = _with_prompt_text(train_dataset, processing_class, args.dataset_num_proc, "train_dataset")
        eval_dataset = _with_prompt_text(eval_dataset, processing_class, args.dataset_num_proc, "eval_dataset")
        self._set_training_length(args, len(train_dataset))
        reward_fn = TokenIdRewardModel(reward_model, processing_class.pad_token_id,
                                       args.per_device_train_batch_size, args.device)
        self._prompt_token_ids: list[list[int]] | None = None
        old_stop = OldStop.of(model.generation_config, processing_class.pad_token_id)  # before GRPO edits it
        super().__init__(
            model=model, reward_funcs=[reward_fn], args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers, peft_config=peft_config,
            value_model=self._critic(value_model, reward_model),
        )
        self.compat_reward_model = reward_fn
        self.stop_token_id = processing_class.eos_token_id
        self.compat_stop: OldStop | None = None  # set when the old default stop_token=None keeps a tail after the EOS
        self._compat_clock: tuple[float, int] | None = None  # (time, global_step) when train() started: for eps
        self.add_callback(_OldMetricsClock(self))
        self._honour_old_stop_default(old_stop)
        if ref_model is not None and self.ref_model is not None:
            self._load_reference(ref_model)
        self._set_up_completion_tables(eval_dataset)

    # -- construction ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_old_arguments(args, processing_class, model, ref_model, reward_model, train_dataset, data_collator):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be an hf_rlhf_ext.compat.PPOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object: pass a copy, or None.")
        if not isinstance(reward_model, nn.Module):
            raise TypeError(f"reward_model must be a model (a sequence classifier), got {type(reward_model).__name__}.")
        if data_collator is not None:
            raise ValueError(
                "data_collator is not supported: PPOTrainer batches the rows itself (prompts are left-padded for "
                "generation). Drop it and put any preprocessing into the data set's input_ids."
            )
        eos = processing_class.eos_token_id
        if args.stop_token_id is not None and args.stop_token_id != eos:
            raise ValueError(
                f"PPOConfig.stop_token_id={args.stop_token_id} is not the tokenizer's eos_token_id ({eos}): PPOTrainer "
                "ends completions at the EOS. Instead: stop_token='eos'; to stop at another token set "
                "policy.generation_config.eos_token_id (the policy then stops at it and at the tokenizer's EOS)."
            )

    @staticmethod
    def _set_training_length(args: PPOConfig, num_rows: int) -> None:
        """total_episodes (default: num_train_epochs × rows, as before) → rollouts and optimizer steps; a max_steps
        given instead (the Trainer's way) is kept and counted in episodes."""
        if args.total_episodes is None and args.max_steps > 0:
            args.num_total_batches = -(-args.max_steps // args.updates_per_rollout)
            args.total_episodes = args.num_total_batches * args.batch_size
            return
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * num_rows)
        args.num_total_batches, args.max_steps = args.max_steps_for(args.total_episodes)

    @staticmethod
    def _critic(value_model: nn.Module | None, reward_model: nn.Module) -> ValueModel | None:
        """The value model as the critic (None: the parent's default, the reward model's body)."""
        if value_model is None or isinstance(value_model, ValueModel):
            return value_model
        # its own weights are trained (as before), unless it is also the reward model, which stays frozen
        return critic_from_value_model(value_model, share_weights=value_model is not reward_model)

    def _honour_old_stop_default(self, stop: OldStop) -> None:
        """stop_token=None and stop_token_id=None: generate as the old trainer did (:class:`OldStop`). When its
        response ended at the first EOS there is nothing to change; when it kept a tail, the KV-cache sampler stops at
        the policy's EOS, fills as ``generate`` did and nothing is cut. Without that sampler (vLLM, FSDP, generate())
        completions end at the first EOS, said in one warning line."""
        if self.args.stop_token is not None or self.args.stop_token_id is not None:
            return
        if not stop.keeps_tail:
            return
        if not self._fast_generation:
            logger.warning(
                "stop_token=None: the old PPOTrainer kept going past the EOS here (%s); this generation path (vLLM, "
                "FSDP or generate()) ends every completion at its first EOS instead. Pass --stop_token eos to "
                "silence this.", stop.describe())
            return
        self.compat_stop = stop
        self.generation_kwargs = {**(self.generation_kwargs or {}), "eos_token_id": list(stop.stop_ids) or None,
                                  "pad_token_id": stop.fill_id}
        self._completion_end_ids = self._eos_ids[:0]  # keep every token, EOS and fill included, as before
        # The sampler records log-prob 0 at fill positions; the policy's own log-probs come from forward passes.
        self.args.logprobs_from_sampling = False

    def _set_up_completion_tables(self, eval_dataset: Any) -> None:
        """The eval prompts for generate_completions, and the num_sample_generations schedule."""
        evals = eval_dataset if not isinstance(eval_dataset, dict) else next(iter(eval_dataset.values()), None)
        self.compat_eval_prompt_ids = [[int(t) for t in r] for r in evals["input_ids"]] if evals is not None else []
        if self.args.num_sample_generations > 0 and self.compat_eval_prompt_ids:
            every = max(1, self.args.num_total_batches // self.args.num_sample_generations)
            self.add_callback(SampleGenerationsCallback(self, every, self.args.updates_per_rollout))

    def _load_reference(self, ref_model: nn.Module) -> None:
        """Loads the given reference's weights into the trainer's reference model (built like the policy)."""
        target = self.accelerator.unwrap_model(self.ref_model)
        try:
            target.load_state_dict(ref_model.state_dict())
        except RuntimeError as err:
            raise ValueError(
                "ref_model does not have the policy's architecture (its weights do not fit a copy of the policy): "
                f"{str(err)[:300]}"
            ) from err

    # -- prompts as token ids ----------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._prompt_token_ids = [[int(t) for t in x["input_ids"]] for x in inputs]
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._prompt_token_ids = None

    def _tokenize_prompts(self, prompts: list):
        """The rows' own input_ids instead of re-tokenising the decoded text."""
        ids = self._prompt_token_ids
        if ids is None or len(ids) != len(prompts):
            raise RuntimeError("compat.PPOTrainer: prompts reached the tokenizer without their input_ids.")
        return ids, None, {}

    # -- the old methods ---------------------------------------------------------------------------------------------
    def generate_completions(self, sampling: bool = False):
        """Completions of the eval set (the first batch only when ``sampling``) at temperature 0.01, scored by the
        reward model: prints the first rows, logs the table; returns it as a ``pandas.DataFrame`` (None without an
        eval set, as before)."""
        if not self.compat_eval_prompt_ids:
            return None
        return show_table(self, completions_table(self, sampling=sampling))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the old names the parent does not log (training logs only), so old dashboards keep their curves."""
        if "loss" in logs:
            logs.update(self._old_metrics(logs))
        super().log(logs, start_time)

    def _old_metrics(self, logs: dict[str, float]) -> dict[str, float | None]:
        """``episode``, ``eps`` (episodes per second since train() began, an int, as before), ``lr`` (the rate the
        last step used: the Trainer reads ``learning_rate`` before the scheduler moves it, as the old trainer did),
        ``policy/entropy_avg`` (the mean token entropy, GRPO's ``entropy``) and ``val/ratio_var`` (the variance of
        the micro-batches' mean ratios since the last log; None with one micro-batch, where the old ``torch.var``
        gave NaN). Read from ``_metrics`` before GRPO averages and clears them."""
        metrics = self._metrics["train"]
        entropy = [e for e in metrics.get("entropy", []) if not math.isnan(e)]
        ratios = [r for r in metrics.get("val/ratio", []) if not math.isnan(r)]
        old = {
            "episode": self._episodes_at(self.state.global_step),
            "lr": logs.get("learning_rate"),
            "policy/entropy_avg": sum(entropy) / len(entropy) if entropy else None,
            "val/ratio_var": statistics.variance(ratios) if len(ratios) > 1 else None,
        }
        if self._compat_clock is not None:
            started, first_step = self._compat_clock
            done = old["episode"] - self._episodes_at(first_step)
            old["eps"] = int(done / max(time.time() - started, 1e-9))
        return old

    def _episodes_at(self, step: int) -> int:
        """Prompts consumed by the rollouts that optimizer step ``step`` has reached (the old ``episode``)."""
        return -(-step // self.args.updates_per_rollout) * self.args.batch_size


class _OldMetricsClock(TrainerCallback):
    """Records when train() began, and at which step (for a resumed run): ``eps`` counts from there."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._compat_clock = (time.time(), state.global_step)
        return control

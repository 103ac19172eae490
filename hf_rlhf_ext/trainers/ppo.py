"""PPO with a value model (critic) on current TRL, as a subclass of ``trl.GRPOTrainer``.

TRL removed its ``PPOTrainer`` in 1.13. This one inherits what GRPO does well — generation (also vLLM), reward
functions and reward models, the reference model (or the adapter-disabled base under PEFT), logging, checkpointing,
``push_to_hub`` — and owns the two steps that make it PPO:

1. **The rollout** (``_generate_and_score_completions``, one method read top to bottom): GRPO's generation (its
   tokenisation, sampler hook and decoding) and its reward functions, then the sequence score (weighted sum of the
   reward functions, minus ``missing_eos_penalty`` when a completion never ended), log π_old and the critic values
   V(s_t), log π_ref, per-token rewards  r_t = −β·KL_t  (+ score at the last completion token)  — the KL-shaped
   reward of Ziegler et al. 2019 / InstructGPT —, and GAE(γ, λ): token advantages (whitened) and returns. GRPO's
   group advantages are never computed. The model passes, and their speed-ups, sit behind one seam,
   :class:`~hf_rlhf_ext.trainers.rollout.RolloutEngine`. Everything one rollout produces is a :class:`Rollout`.
2. **Loss** (``_compute_loss``): the clipped surrogate on the token ratio π_θ/π_old, aggregated as a token mean
   (``loss_type="bnpo"``, as old TRL PPO), plus ``vf_coef`` × the clipped value loss, minus the entropy bonus if set.

``num_ppo_epochs`` maps onto GRPO's ``num_iterations`` (the same rollout is reused for that many passes, the ratio is
exactly 1 on the first) and ``num_mini_batches`` onto ``steps_per_generation``. The maths lives in
``hf_rlhf_ext.objectives``, the critic's lifecycle in ``critic.py``, the rollout's model passes in ``rollout.py``.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from trl import GRPOTrainer

from .._trl_compat import GRPO_MULTIMODAL_INPUTS, check_trl_contract
from ..objectives import (
    aggregate_token_loss,
    clipped_surrogate,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    token_level_rewards,
    whiten,
)
from ..reward_guard import attach_reward_guard
from ..validation import check_trainer_prompts, validate_trainer_inputs
from .critic import (
    CriticSource,
    add_critic_param_groups,
    average_head_gradients,
    build_critic,
    clip_critic_grad_norm,
    load_critic,
    prepare_critic,
    prepare_policy_value_head,
    save_critic,
)
from .kl_control import AdaptiveKLController, FixedKLController, KLControllerState
from .ppo_config import PPOConfig
from .resumable_sampling import ResumableSampling
from .rollout import (
    Forward,
    Rollout,
    RolloutEngine,
    check_sampling_distribution,
    plain_head_logps,
    policy_pass_values,
    use_plain_head,
)
from .value_model import PolicyValueHead, ValueModel, capture_last_hidden_states

__all__ = ["PPOTrainer"]


class PPOTrainer(ResumableSampling, GRPOTrainer):
    """PPO with a critic, GAE and the KL penalty in the reward, on top of ``trl.GRPOTrainer``.

    Takes the arguments of ``GRPOTrainer`` (``model``, ``reward_funcs``, ``args`` (a :class:`PPOConfig`),
    datasets with a ``prompt`` column, ``processing_class``, ``reward_processing_classes``, ``callbacks``,
    ``optimizers``, ``peft_config``) plus ``value_model``: a :class:`ValueModel`, a model (its body is copied) or a
    path; default see ``PPOConfig.value_model_name_or_path``. Tools, environments and custom rollouts are not
    supported (their masks are not contiguous, which GAE needs).

    Saved beside the policy: ``<dir>/value_model`` (:meth:`ValueModel.from_pretrained`) — with
    ``value_head_on_policy``, ``<dir>/value_head.safetensors`` (:meth:`PolicyValueHead.from_pretrained`) —, in
    ``output_dir`` and in every checkpoint; the KL controller rides in each checkpoint's ``trainer_state.json``
    (:class:`KLControllerState`).
    Resuming restores both. ``last_rollout`` is this process's latest :class:`Rollout`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "ppo", "hf-rlhf-ext"]
    _name = "PPO"
    _paper: ClassVar[dict[str, str]] = {  # cited in the model card (GRPO's would otherwise be inherited)
        "title": "Fine-Tuning Language Models from Human Preferences",
        "id": "1909.08593",
        "citation": (
            "@article{ziegler2019finetuning,\n"
            "    title  = {{Fine-Tuning Language Models from Human Preferences}},\n"
            "    author = {Daniel M. Ziegler and Nisan Stiennon and Jeffrey Wu and Tom B. Brown and Alec Radford and "
            "Dario Amodei and Paul Christiano and Geoffrey Irving},\n"
            "    year   = 2019,\n"
            "    eprint = {arXiv:1909.08593},\n"
            "}"
        ),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any = None,
        args: PPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        value_model: ValueModel | PreTrainedModel | str | None = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ):
        check_trl_contract()
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = PPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-PPO")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"PPOTrainer needs a PPOConfig, got {type(args).__name__}")
        validate_trainer_inputs(args, train_dataset, eval_dataset)
        unsupported = [k for k in ("tools", "rollout_func", "environment_factory") if kwargs.get(k)]
        if unsupported:
            raise NotImplementedError(f"PPOTrainer does not support {unsupported} (GAE needs contiguous completions).")
        if optimizers[1] is not None:
            raise ValueError("Pass no scheduler: the critic's parameter groups must exist before the scheduler is "
                             "built.")
        model, critic_source = CriticSource.capture(model, reward_funcs, args, peft_config, value_model,
                                                    quantization_config)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, quantization_config=quantization_config,
                         **kwargs)
        check_trl_contract(self)
        if self._is_vlm:
            raise NotImplementedError("PPOTrainer supports text-only policies (its rollout carries no image inputs).")
        check_sampling_distribution(self._generation_settings())
        if args.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(init_kl_coef=args.kl_coef, target=args.kl_target,
                                               horizon=args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.add_callback(KLControllerState(self.kl_ctl))  # saved in checkpoints, restored on resume
        self._set_up_critic(critic_source, model if isinstance(model, str) else None, peft_config)
        policy = self.accelerator.unwrap_model(self.model)
        self._eos_ids = torch.tensor(self.eos_token_ids, device=self.accelerator.device)
        # The KV-cache sampler cuts each completion after the first of these (empty: completions are kept whole).
        self._completion_end_ids = self._eos_ids
        head = policy.get_output_embeddings()
        self._vocab_size = int(head.weight.shape[0]) if head is not None else 1 << 62
        # The rollout's model passes and their speed-ups: the one seam, chosen here.
        self.engine = RolloutEngine(self, grpo_generate=super()._generate_single_turn)
        self.last_rollout: Rollout | None = None
        check_trainer_prompts(self)
        attach_reward_guard(self)  # NaN/inf rewards stop the run or are dropped (args.nan_rewards)

    @property
    def sampler_check(self):
        """Whether the sampler's log-probs may replace a forward pass (decided on the first rollout)."""
        return self.engine.check

    @property
    def _fast_generation(self) -> bool:
        """Whether the KV-cache sampler draws the rollouts (``fast_generation``, where it draws what generate would)."""
        return self.engine.kv_cache

    def _set_up_critic(self, source: CriticSource, policy_path: str | None, peft_config: Any) -> None:
        """``value_model``: the critic; ``value_model_wrapped``: the module to call in training (DDP, FSDP2)."""
        if self.args.value_head_on_policy:
            policy = self.accelerator.unwrap_model(self.model)
            self.value_model = self.value_model_wrapped = prepare_policy_value_head(
                PolicyValueHead.for_policy(policy), self.accelerator,
                sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled, max_grad_norm=self.args.max_grad_norm)
            return
        self.value_model = build_critic(
            source, peft_config=peft_config, policy_path=policy_path or self.model.config.name_or_path,
            reward_models=list(zip(self.reward_funcs, self.reward_processing_classes)),
            policy_vocab=self._tokenizer.get_vocab(), unwrap=self.accelerator.unwrap_model,
            load_kwargs={"trust_remote_code": self.args.trust_remote_code, "dtype": self.model.dtype},
        )
        fsdp_version = self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None
        self.value_model_wrapped = prepare_critic(self.value_model, self.args, self.accelerator,
                                                  deepspeed=self.is_deepspeed_enabled, fsdp_version=fsdp_version)

    def _generation_settings(self) -> dict[str, Any]:
        """The settings the sampler will use, for :func:`check_sampling_distribution`."""
        if self.use_vllm:
            settings = {k: getattr(self.args, k, None) for k in ("top_k", "top_p", "min_p", "repetition_penalty")}
            settings.update(self.args.generation_kwargs or {})
            return settings
        settings = self.generation_config.to_dict()
        model_defaults = self.accelerator.unwrap_model(self.model).generation_config.to_dict()
        for key, value in model_defaults.items():  # generate() fills unset values from the model's config
            if settings.get(key) is None:
                settings[key] = value
        return settings

    # ------------------------------------------------------------------------------------------------------------------
    # The critic in the Trainer's optimizer, gradient and checkpoint steps (see critic.py for why each is needed)
    # ------------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = self.args.critic_learning_rate if self.args.critic_learning_rate is not None else self.args.learning_rate
        add_critic_param_groups(optimizer, self.value_model, set(self.get_decay_parameter_names(self.value_model)),
                                lr=lr, weight_decay=self.args.weight_decay)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        if self._step % self.current_gradient_accumulation_steps == 0:  # start of an accumulation window
            self.value_model.zero_grad(set_to_none=True)
        return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        grad_norm = super()._clip_grad_norm(model)  # also unscales every group of the shared optimizer under fp16
        if self.args.value_head_on_policy:
            average_head_gradients(self.value_model, self.accelerator)
        critic_norm = clip_critic_grad_norm(self.value_model, self.args.max_grad_norm)
        if critic_norm is not None:
            self._metrics["train"]["val/grad_norm"].append(critic_norm)
        return grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the policy (as GRPO does) and the critic in ``<dir>/value_model``."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        save_critic(self.value_model, output_dir, is_main_process=self.args.should_save)  # on every process

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restores the critic with the policy (the KL controller: :class:`KLControllerState`)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_critic(self.value_model, resume_from_checkpoint)

    # ------------------------------------------------------------------------------------------------------------------
    # The rollout: sample, score, log π_old and V(s_t), log π_ref, per-token rewards, GAE
    # ------------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, Any]:
        """One PPO rollout, top to bottom. The model passes — and their speed-ups — are :class:`RolloutEngine`'s."""
        args, mode = self.args, "train" if self.model.training else "eval"
        rollout = Rollout(mode=mode, step=self.state.global_step, kl_coef=float(self.kl_ctl.value))
        prompts = [x["prompt"] for x in inputs]

        # 1. Sample: GRPO tokenises, samples through _generate_single_turn (the engine), decodes and logs the lengths.
        prompt_ids, completion_ids, _, completions, sampled, *_ = self._generate(prompts)
        batch = self._padded_rollout(prompt_ids, completion_ids)
        T = batch["completion_ids"].size(1)

        # 2. Score: the reward functions on the whole (gathered) batch; this process's rows, weighted and summed, minus
        #    missing_eos_penalty. Completions that no reward function scored are masked out of the losses.
        rollout.rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids)
        mine = rollout.rewards_per_func[self.accelerator.process_index * len(prompts):][: len(prompts)]
        scores = (mine * self.reward_weights.to(mine.device).unsqueeze(0)).nansum(dim=1)
        rollout.has_eos = (torch.isin(batch["completion_ids"], self._eos_ids) & batch["completion_mask"].bool()).any(1)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.has_eos).float()
        scorable = ~torch.isnan(mine).all(dim=1, keepdim=True)
        batch["completion_mask"] = batch["completion_mask"] * scorable.to(batch["completion_mask"].dtype)
        rollout.scores, rollout.mask = scores, batch["completion_mask"].float()
        mask = rollout.mask

        # 3. log π_old and V(s_t) (the engine), then log π_ref (β > 0), on the whole prompt + completion rows.
        forward = Forward(torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                          torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1), T,
                          args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size)
        # GRPO's rule: when the policy moves before the rollout is used up, the ratio needs π_old.
        need_pi_old = args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations) != 0
        self.engine.policy_and_values(rollout, forward, sampled, need_pi_old)
        rollout.values = rollout.values * mask
        rollout.ref_logps = self._reference_logps(forward) if self.beta != 0 else None

        # 4. Per-token rewards: r_t = −β·KL_t, plus the score at the last completion token (Ziegler et al. 2019).
        if rollout.ref_logps is not None:
            rollout.kl = kl_estimate(rollout.logps, rollout.ref_logps, kind=args.kl_estimator) * mask
        else:
            rollout.kl = torch.zeros_like(mask)
        rollout.token_rewards, rollout.non_score_rewards = token_level_rewards(rollout.scores, rollout.kl, mask,
                                                                               rollout.kl_coef)
        if args.whiten_rewards and mask.sum() > 1:
            rollout.token_rewards = self._whiten(rollout.token_rewards, mask, shift_mean=False)

        # 5. GAE(γ, λ) on the critic's values: token advantages (whitened) and the critic's targets.
        advantages, rollout.returns = gae(rollout.token_rewards, rollout.values, mask, gamma=args.gamma, lam=args.lam)
        rollout.advantages = self._whiten(advantages, mask) if mask.sum() > 1 else advantages

        self._log_rollout(rollout, prompts, completions, batch["completion_ids"])
        self.last_rollout = rollout
        batch.update(old_values=rollout.values, returns=rollout.returns, advantages=rollout.advantages)
        if need_pi_old:
            batch["old_per_token_logps"] = rollout.logps
        if rollout.critic_pass is not None:  # the first step backpropagates through it; the row index follows shuffles
            batch["rollout_row"] = torch.arange(len(rollout.values), device=rollout.values.device)
        return batch

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """GRPO's sampling hook, answered by the engine: ``(completion_ids, logps)``, where ``logps`` is a
        :class:`SamplerOutput` (the sampled tokens' log-probs and the value head's reads) when the engine sampled."""
        return self.engine.sample(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _padded_rollout(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict[str, Any]:
        """Prompts left-padded, completions right-padded (as GRPO pads them); with ``mask_truncated_completions`` the
        completions that never ended are masked out; ``num_items_in_batch``: the loss tokens over all processes."""
        from trl.trainer.utils import pad

        def padded(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
            return pad([torch.tensor(row, dtype=torch.long) for row in rows], padding_value=value, padding_side=side,
                       pad_to_multiple_of=self.pad_to_multiple_of).to(self.accelerator.device)

        completion_mask = padded([[1] * len(row) for row in completion_ids], 0, "right")
        if self.mask_truncated_completions:
            ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
            ended = torch.tensor([bool(row) and row[-1] in ends for row in completion_ids],
                                 device=completion_mask.device)
            completion_mask = completion_mask * ended.unsqueeze(1).long()
        return {
            "prompt_ids": padded(prompt_ids, self._tokenizer.pad_token_id, "left"),
            "prompt_mask": padded([[1] * len(row) for row in prompt_ids], 0, "left"),
            "completion_ids": padded(completion_ids, self._tokenizer.pad_token_id, "right"),
            "completion_mask": completion_mask,
            "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
        }

    @torch.no_grad()
    def _reference_logps(self, forward: Forward) -> torch.Tensor:
        """log π_ref of the sampled tokens: the reference model, or under PEFT the policy with its adapter disabled
        (or the initial copy of a re-trained adapter, loaded as "ref"), as GRPO computes them."""
        from trl.trainer.utils import use_adapter

        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:
            model, unwrapped = self.model, self.accelerator.unwrap_model(self.model)
            context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with context:
            return self._get_per_token_logps_and_entropies(model, forward.input_ids, forward.attention_mask,
                                                           forward.completion_length, batch_size=forward.batch_size)[0]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """GRPO's fused, chunked LM head, or the plain one (:func:`plain_head_logps`) where that is faster."""
        batch_size = batch_size or input_ids.size(0)
        low_precision = self.args.bf16 or self.args.fp16 or self.args.cast_lm_head_to_fp32
        if compute_aux_loss or not use_plain_head(model, min(batch_size, input_ids.size(0)), logits_to_keep,
                                                  self._vocab_size, low_precision, extra):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra,
            )
        logps, entropies = plain_head_logps(
            model, input_ids, attention_mask, logits_to_keep, batch_size, self.temperature, compute_entropy,
            entropy_grad=self.args.entropy_coef != 0, autocast=self.accelerator.autocast,
        )
        return logps, entropies, None

    # Batch statistics over every process's tokens, so that two ranks compute what one process holding both halves of
    # the batch computes (on one process: the objectives functions themselves).
    def _mean_var(self, x: torch.Tensor, mask: torch.Tensor,
                  unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        total, n = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
        mean = total / n
        squares = self.accelerator.reduce(((x - mean) ** 2 * mask).sum(), reduction="sum")
        return mean, squares / (n - 1 if unbiased else n)

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return whiten(x, mask, shift_mean=shift_mean)
        mean, var = self._mean_var(x, mask)
        return ((x - mean) * torch.rsqrt(var + 1e-8) + (0 if shift_mean else mean)) * mask

    def _explained_variance(self, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
        if self.accelerator.num_processes == 1:
            return explained_variance(values, returns, mask)
        var_returns = self._mean_var(returns, mask, unbiased=False)[1]
        error = self._mean_var(returns - values, mask, unbiased=False)[1]
        return float(1.0 - error / var_returns) if var_returns.item() > 0 else float("nan")

    def _log_rollout(self, rollout: Rollout, prompts: list, completions: list, completion_ids: torch.Tensor) -> None:
        """GRPO's reward metrics and completions table (with PPO's advantages), old TRL PPO's rollout metrics
        (sequence sums averaged over completions, over all processes); feeds the adaptive KL controller."""
        from accelerate.utils import gather_object
        from trl.trainer.utils import nanstd

        mask, mode, metrics = rollout.mask, rollout.mode, self._metrics[rollout.mode]
        rewards_per_func = rollout.rewards_per_func  # gathered: every process's completions
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows are left out
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        group = self.num_generations if mode == "train" else self.num_generations_eval
        if group > 1:  # no groups (G = 1): the share of zero-std groups would be 1 by construction
            is_std_zero = torch.isclose(nanstd(rewards.view(-1, group), dim=1), torch.zeros(1, device=rewards.device))
            metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())

        num_eos = (torch.isin(completion_ids, self._eos_ids) & mask.bool()).sum(dim=1).float()
        per_seq = torch.stack([rollout.kl.sum(dim=1), rollout.non_score_rewards.sum(dim=1), rollout.scores,
                               (-rollout.logps * mask).sum(dim=1), num_eos,
                               masked_mean(rollout.advantages, mask, dim=1)], dim=1)
        gathered = self.accelerator.gather(per_seq)
        seq_kl, non_score, score, entropy = gathered.mean(dim=0).tolist()[:4]
        if rollout.ref_logps is not None:
            metrics["objective/kl"].append(seq_kl)
            k3 = kl_estimate(rollout.logps, rollout.ref_logps, kind="k3")
            k3_sum, tokens = self.accelerator.reduce(torch.stack([(k3 * mask).sum(), mask.sum()]), reduction="sum")
            metrics["kl"].append(float(k3_sum / tokens.clamp(min=1.0)))  # token mean over all processes
        metrics["objective/entropy"].append(entropy)
        metrics["objective/non_score_reward"].append(non_score)
        metrics["objective/rlhf_reward"].append(non_score + score)
        metrics["objective/scores"].append(score)
        metrics["val/num_eos_tokens"].append(float(gathered[:, 4].sum()))
        metrics["kl_coef"].append(rollout.kl_coef)
        if mask.sum() > 0:
            metrics["val/explained_variance"].append(self._explained_variance(rollout.values, rollout.returns, mask))
        if torch.cuda.is_available() and self.accelerator.device.type == "cuda":
            metrics["memory/peak_mb"].append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            metrics["memory/peak_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

        # The completions table, with PPO's advantages (mean over each completion's tokens).
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(gathered[:, 5].tolist())
        # What reward functions logged through log_extra / log_metric, as GRPO flushes it (sorted: the same order on
        # every process).
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / count)
        self._pending_metrics.clear()
        if mode == "train":
            # Adaptive β sees the mean *sequence* KL of this rollout over all processes (trlx #361: feeding it
            # anything else makes runs diverge exactly when the KL crosses the target).
            self.kl_ctl.update(seq_kl, n_steps=gathered.size(0))

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """PPO's loss on one micro-batch, per completion token t (CleanRL's PPO loop; the KL is in the rewards):

            ratio_t = π_θ(y_t) / π_old(y_t)                        (exactly 1 on the first pass over a rollout)
            L = −agg_t min(ratio_t·A_t, clip(ratio_t, 1 − ε, 1 + ε_high)·A_t)          policy (agg: ``loss_type``)
                + vf_coef · ½·mean_t max((V_t − R_t)², (V_clip,t − R_t)²)               critic
                − entropy_coef · mean_t H_t                                             entropy bonus
        divided by the gradient-accumulation steps (the Trainer does not scale this loss)."""
        mode = "train" if self.model.training else "eval"
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"].float()
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T, head = completion_ids.size(1), self.engine.head
        head_values = [] if head is not None else None  # value_head_on_policy: V read in this same forward
        with capture_last_hidden_states(self.engine.backbone, head_values, lambda hidden: head(hidden, T)):
            logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, T, compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in GRPO_MULTIMODAL_INPUTS},
            )
        old_logps = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
        ratio = torch.exp(log_ratio)
        advantages = inputs["advantages"]
        surrogate = clipped_surrogate(ratio, advantages, self.epsilon_low, self.epsilon_high)
        policy_loss = -aggregate_token_loss(surrogate, mask, self.loss_type, max_length=self.max_completion_length,
                                            num_tokens=self._tokens_per_micro_batch(inputs, mode))
        values = self._values_for_loss(inputs, input_ids, attention_mask, mode, head_values)
        share = self._token_share(mask)
        if self.loss_type == "bnpo":
            policy_loss = policy_loss * share
        value_loss = share * clipped_value_loss(values, inputs["old_values"], inputs["returns"],
                                                self.args.cliprange_value, mask)
        loss = policy_loss + self.args.vf_coef * value_loss
        if self.args.entropy_coef != 0:  # logged as GRPO does: the policy loss alone, and the coefficient
            loss = loss - self.args.entropy_coef * masked_mean(entropies, mask)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss.detach()).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.args.entropy_coef)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
        self._log_loss_stats(mode, mask, log_ratio, advantages, surrogate, entropies, values, inputs, value_loss)
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1)

    def _token_share(self, mask: torch.Tensor) -> torch.Tensor | float:
        """P × this process's tokens / all processes' tokens (1 on one process): a token mean over this process times
        it is its share of the token mean over all processes, once DDP averages the P ranks' gradients."""
        if self.accelerator.num_processes == 1:
            return 1.0
        tokens = self.accelerator.reduce(mask.sum().detach(), reduction="sum")
        return mask.sum().detach() * self.accelerator.num_processes / tokens.clamp(min=1.0)

    def _tokens_per_micro_batch(self, inputs: dict, mode: str) -> torch.Tensor | None:
        """DAPO's denominator: the rollout's loss tokens (over all processes) per process and micro-batch."""
        if self.loss_type != "dapo":
            return None
        per_process = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        return per_process / self.args.steps_per_generation if mode == "train" else per_process

    def _values_for_loss(self, inputs: dict, input_ids, attention_mask, mode: str,
                         head_values: list[torch.Tensor] | None) -> torch.Tensor:
        """V_θ(s_t) with a graph: what the value head read in the policy's forward (``value_head_on_policy``); else
        the rollout's own critic pass on the first step that may reuse it, else a forward of the (wrapped) critic —
        without gradient all-reduce until the micro-batch that steps the optimizer."""
        if head_values is not None:
            return policy_pass_values(head_values, self.engine.backbone)
        T = inputs["completion_ids"].size(1)
        if mode == "train" and "rollout_row" in inputs and self.last_rollout is not None:
            values = self.last_rollout.take_critic_pass(self.state.global_step, inputs["rollout_row"], T)
            if values is not None:
                return values
        critic = self.value_model_wrapped
        sync = contextlib.nullcontext()
        if mode == "train" and not self.accelerator.sync_gradients and hasattr(critic, "no_sync"):
            sync = critic.no_sync()
        with sync, self.accelerator.autocast():
            return critic(input_ids, attention_mask, completion_length=T)

    @torch.no_grad()
    def _log_loss_stats(self, mode, mask, log_ratio, advantages, surrogate, entropies, values, inputs, value_loss):
        """Token means over all processes (old TRL PPO's names, and GRPO's ``entropy`` and ``clip_ratio/*``)."""
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        old_values, returns, c = inputs["old_values"], inputs["returns"], self.args.cliprange_value
        v_clipped = old_values + torch.clamp(values - old_values, -c, c)
        per_token = {
            "policy/approxkl_avg": 0.5 * log_ratio**2,  # approxkl as in old TRL PPO
            "policy/clipfrac_avg": (surrogate < ratio * advantages).float(),  # the clip binds
            "loss/policy_avg": -surrogate,
            "val/clipfrac_avg": ((v_clipped - returns) ** 2 > (values - returns) ** 2).float(),
            "val/ratio": ratio,
            "entropy": entropies,
            "clip_ratio/low_mean": low,
            "clip_ratio/high_mean": high,
            "clip_ratio/region_mean": torch.maximum(low, high),
        }
        sums = torch.stack([(x * mask).sum() for x in per_token.values()] + [mask.sum(), value_loss.detach()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        metrics = self._metrics[mode]
        for name, total in zip(per_token, (sums[:-2] / sums[-2].clamp(min=1.0)).tolist()):
            metrics[name].append(total)
        metrics["loss/value_avg"].append(float(sums[-1]) / self.accelerator.num_processes)
        per_seq = self.accelerator.gather(
            torch.stack([masked_mean(low, mask, dim=1), masked_mean(high, mask, dim=1)], 1))
        metrics["clip_ratio/low_min"].append(float(per_seq[:, 0].min()))
        metrics["clip_ratio/high_max"].append(float(per_seq[:, 1].max()))

"""PPO with a value model (critic) on current TRL, as a subclass of ``trl.GRPOTrainer``.

TRL removed its ``PPOTrainer`` in 1.13. This one inherits what GRPO does well — generation (also vLLM), reward
functions and reward models, the reference model (or the adapter-disabled base under PEFT), logging, checkpointing,
``push_to_hub`` — and owns the two steps that make it PPO:

1. **Scoring** (``_generate_and_score_completions``): after GRPO has generated and scored a rollout, the sequence score
   (weighted sum of the reward functions, minus ``missing_eos_penalty`` when a completion never ended) is turned into
   per-token rewards  r_t = −β·KL_t  (+ score at the last completion token)  — the KL-shaped reward of Ziegler et al.
   2019 / InstructGPT —, the critic values V(s_t) are computed once, and GAE(γ, λ) gives token advantages (whitened)
   and returns. GRPO's group advantages are discarded. Everything one rollout produces is a :class:`Rollout`.
2. **Loss** (``_compute_loss``): the clipped surrogate on the token ratio π_θ/π_old, aggregated as a token mean
   (``loss_type="bnpo"``, as old TRL PPO), plus ``vf_coef`` × the clipped value loss, minus the entropy bonus if set.

``num_ppo_epochs`` maps onto GRPO's ``num_iterations`` (the same rollout is reused for that many passes, the ratio is
exactly 1 on the first) and ``num_mini_batches`` onto ``steps_per_generation``. The maths lives in
``hf_rlhf_ext.objectives``, the critic's lifecycle in ``critic.py``, the fast sampling path in ``rollout.py``.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedModel
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
    critic_values,
    load_critic,
    prepare_critic,
    prepare_policy_value_head,
    save_critic,
)
from .kl_control import AdaptiveKLController, FixedKLController, KLControllerState
from .ppo_config import PPOConfig
from .resumable_sampling import ResumableSampling
from .rollout import (
    Rollout,
    SampledLogProbs,
    SamplerLogpsCheck,
    check_sampling_distribution,
    fast_generation_supported,
    plain_head_logps,
    sample_completions,
    use_plain_head,
)
from .value_model import PolicyValueHead, ValueModel, capture_last_hidden_states, policy_backbone

__all__ = ["PPOTrainer"]


def policy_pass_values(chunks: list[torch.Tensor], backbone: torch.nn.Module) -> torch.Tensor:
    """The values the value head read during the policy's forward pass; an error if that pass never reached the
    policy's body (a model whose forward bypasses it cannot carry a value head on its hidden states)."""
    if not chunks:
        raise RuntimeError(f"value_head_on_policy: the policy's forward pass did not run {type(backbone).__name__}, "
                           "so no hidden states were read; use a separate critic (value_head_on_policy=False).")
    return torch.cat(chunks, dim=0)


class PPOTrainer(ResumableSampling, GRPOTrainer):
    """PPO with a critic, GAE and the KL penalty in the reward, on top of ``trl.GRPOTrainer``.

    Takes the arguments of ``GRPOTrainer`` (``model``, ``reward_funcs``, ``args`` (a :class:`PPOConfig`),
    datasets with a ``prompt`` column, ``processing_class``, ``reward_processing_classes``, ``callbacks``,
    ``optimizers``, ``peft_config``) plus ``value_model``: a :class:`ValueModel`, a model (its body is copied) or a
    path; default see ``PPOConfig.value_model_name_or_path``. Tools, environments and custom rollouts are not
    supported (their masks are not contiguous, which GAE needs).

    Saved beside the policy: ``<dir>/value_model`` (:meth:`ValueModel.from_pretrained`) — with
    ``value_head_on_policy``, ``<dir>/value_head.safetensors`` (:meth:`PolicyValueHead.from_pretrained`) —, in
    ``output_dir`` and in every checkpoint; the KL controller rides in each checkpoint's ``trainer_state.json`` (:class:`KLControllerState`).
    Resuming restores both. ``last_rollout`` is this process's latest :class:`Rollout`.
    """

    _tag_names = ["trl", "ppo", "hf-rlhf-ext"]
    _name = "PPO"
    _paper = {  # cited in the model card (GRPO's would otherwise be inherited)
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
            raise ValueError("Pass no scheduler: the critic's parameter groups must exist before the scheduler is built.")
        model, critic_source = CriticSource.capture(model, reward_funcs, args, peft_config, value_model,
                                                    quantization_config)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, quantization_config=quantization_config,
                         **kwargs)
        check_trl_contract(self)
        check_sampling_distribution(self._generation_settings())
        if args.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(init_kl_coef=args.kl_coef, target=args.kl_target, horizon=args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.add_callback(KLControllerState(self.kl_ctl))  # saved in checkpoints, restored on resume
        self._set_up_critic(critic_source, model if isinstance(model, str) else None, peft_config)
        policy = self.accelerator.unwrap_model(self.model)
        self._eos_ids = torch.tensor(self.eos_token_ids, device=self.accelerator.device)
        # The fast sampler cuts each completion after the first of these (empty: completions are kept whole).
        self._completion_end_ids = self._eos_ids
        head = policy.get_output_embeddings()
        self._vocab_size = int(head.weight.shape[0]) if head is not None else 1 << 62
        # Under FSDP every rank must run the same forward passes: generate() syncs them, the KV-cache sampler does not.
        plain_transformers = not (self.use_vllm or self.use_transformers_continuous_batching or self._is_vlm
                                  or self.is_fsdp_enabled)
        self._fast_generation = args.fast_generation and fast_generation_supported(
            self.generation_kwargs, self.temperature, plain_transformers, policy.config.is_encoder_decoder)
        self.sampler_check = SamplerLogpsCheck()  # may the sampler's log-probs replace a forward pass? (first rollout)
        self.last_rollout: Rollout | None = None
        check_trainer_prompts(self)
        attach_reward_guard(self)  # NaN/inf rewards stop the run or are dropped (args.nan_rewards)

    def _set_up_critic(self, source: CriticSource, policy_path: str | None, peft_config: Any) -> None:
        """``value_model``: the critic; ``value_model_wrapped``: the module to call in training (DDP, FSDP2)."""
        self._value_sink: list[torch.Tensor] | None = None  # armed: the next policy forward also reads V(s_t)
        self._policy_backbone: torch.nn.Module | None = None  # value_head_on_policy: the body the head reads
        if self.args.value_head_on_policy:
            policy = self.accelerator.unwrap_model(self.model)
            self._policy_backbone = policy_backbone(policy)
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
    # Sampling: GRPO's generation, returning the sampled tokens' log-probs
    # ------------------------------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Returns ``(completion_ids, logprobs)`` as GRPO's does; without vLLM ``logprobs`` are the sampled tokens'
        log-probs (GRPO carries them into the batch as ``sampling_per_token_logps``) when ``logprobs_from_sampling``
        asks for them, from the KV-cache sampler (``fast_generation``) or recorded around ``generate``."""
        want_logps = self.args.logprobs_from_sampling and self.sampler_check.passed is not False
        if self._fast_generation and images is None and not multimodal_fields and not has_tool_images:
            completions, logps = self._sample_with_kv_cache(prompt_ids)
            return completions, logps if want_logps else None
        if self.use_vllm or self.use_transformers_continuous_batching or not want_logps:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        recorder = SampledLogProbs(self.temperature)
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        original_generate = unwrapped.generate

        def generate(*a, **kw):  # GRPO calls unwrapped.generate(...): add the recorder to its processors
            processors = LogitsProcessorList([*(kw.pop("logits_processor", None) or []), recorder])
            sequences = original_generate(*a, logits_processor=processors, **kw)
            recorder.finish(sequences)
            return sequences

        unwrapped.generate = generate
        try:
            completions, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            del unwrapped.generate  # back to the class method
        return completions, [row[: len(c)] for row, c in zip(recorder.logps.tolist(), completions)]

    def _sample_with_kv_cache(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """``fast_generation``: GRPO's plain-transformers generation with the KV-cache sampler in place of
        ``model.generate`` (the same draws, see :func:`sample_completions`). With ``value_head_on_policy`` the head
        also reads the sampler's hidden states: V(s_t) of the rollout without another pass (:meth:`_sampler_values`)."""
        from trl.models.utils import unwrap_model_for_generation
        from trl.trainer.utils import pad

        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                        pad_to_multiple_of=self.pad_to_multiple_of).to(self.accelerator.device)
        prompt_mask = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left",
                          pad_to_multiple_of=self.pad_to_multiple_of).to(self.accelerator.device)
        kwargs = self.generation_kwargs or {}
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            self._sampler_values() as sink,
        ):
            completions = sample_completions(
                unwrapped, input_ids, prompt_mask, eos_ids=self._completion_end_ids, temperature=float(self.temperature),
                max_new_tokens=int(kwargs.get("max_new_tokens", self.max_completion_length)),
                pad_token_id=kwargs.get("pad_token_id", self._tokenizer.pad_token_id),
                eos_token_ids=kwargs.get("eos_token_id", self.eos_token_ids),
            )
        if sink and self.last_rollout is not None:
            self.last_rollout.sampler_values = torch.cat(sink, dim=1)  # (B, n): prefill's last position, then steps
        return completions

    def _sampler_values(self) -> capture_last_hidden_states:
        """``value_head_on_policy``: V at the last position of each sampler forward — the prefill's last prompt
        position (the state before completion token 0), then each decoding step's (before token t + 1)."""
        sink = [] if self.args.value_head_on_policy else None
        return capture_last_hidden_states(self._policy_backbone, sink,
                                          lambda hidden: self.value_model(hidden[:, -1:]))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.last_rollout.rewards_per_func = rewards  # GRPO itself keeps only its group advantages
        return rewards

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """GRPO's fused, chunked LM head, or the plain one (:func:`plain_head_logps`) where that is faster. When a
        value sink is armed (``value_head_on_policy``), the same forward pass also gives V(s_t), appended to it."""
        sink, self._value_sink = self._value_sink, None  # armed for one call: never the reference's pass
        if sink is None:
            return self._policy_logps(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                                      compute_aux_loss, **extra)
        with capture_last_hidden_states(self._policy_backbone, sink, lambda h: self.value_model(h, logits_to_keep)):
            return self._policy_logps(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                                      compute_aux_loss, **extra)

    def _policy_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                      compute_aux_loss, **extra):
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

    # ------------------------------------------------------------------------------------------------------------------
    # Scoring a rollout: π_old, the score, the critic's values, rewards and GAE
    # ------------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        rollout = self.last_rollout = Rollout(mode=mode, step=self.state.global_step, kl_coef=float(self.kl_ctl.value))
        sampler_gives_pi_old = self._sampler_gives_pi_old(mode)
        if not sampler_gives_pi_old and self._grpo_runs_old_logps_pass():
            self._arm_value_sink(rollout)  # its first forward is the policy's, before the reference's
        with self._grpo_old_logps_pass(skip=sampler_gives_pi_old):
            batch = super()._generate_and_score_completions(inputs)
        self._value_sink = None
        if self.args.num_generations == 1:  # no groups: GRPO's share of zero-std groups is 1 by construction
            self._metrics[mode].pop("frac_reward_zero_std", None)
        sampled = batch.pop("sampling_per_token_logps", None)  # ours, or vLLM's (not used: see _rollout_logps)
        T = batch["completion_ids"].size(1)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        forward = (input_ids, attention_mask, T,
                   self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size)

        self._rollout_logps(batch, rollout, None if self.use_vllm else sampled, sampler_gives_pi_old, forward)
        self._score(batch, rollout)
        self._critic_pass(batch, rollout, forward)
        self._rewards_and_advantages(batch, rollout)
        self._log_rollout(rollout, batch["completion_ids"])
        return batch

    def _sampler_gives_pi_old(self, mode: str) -> bool:
        """Whether π_old for several PPO epochs comes from the sampler instead of GRPO's extra forward pass. In full
        precision the two agree up to float rounding (≈1e-6), as in a bare PPO loop; under bf16/fp16 they differ by
        ~1e-2, which would show as clipping on the first pass, so GRPO's forward is kept there."""
        return (
            mode == "train" and self.num_iterations > 1 and self.sampler_check.passed is not False
            and self.args.logprobs_from_sampling and not self.use_vllm
            and not self.use_transformers_continuous_batching and not (self.args.bf16 or self.args.fp16)
            and self.args.gradient_accumulation_steps % self.args.steps_per_generation == 0
        )

    def _grpo_runs_old_logps_pass(self) -> bool:
        """GRPO's own rule (``_generate_and_score_completions``) for computing π_old with a forward pass."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) != 0

    def _arm_value_sink(self, rollout: Rollout) -> None:
        """``value_head_on_policy``: the next policy forward pass also reads the rollout's values."""
        if self.args.value_head_on_policy:
            self._value_sink = rollout.policy_pass_values = []

    @contextlib.contextmanager
    def _grpo_old_logps_pass(self, skip: bool):
        """GRPO runs its π_old forward pass whenever a rollout serves several passes, a decision it takes from
        ``num_iterations`` alone; when the sampler gives π_old, GRPO sees ``num_iterations = 1`` for that call."""
        num_iterations = self.num_iterations
        if skip:
            self.num_iterations = 1
        try:
            yield
        finally:
            self.num_iterations = num_iterations

    @torch.no_grad()
    def _forward_logps(self, input_ids, attention_mask, T: int, batch_size: int,
                       rollout: Rollout | None = None) -> torch.Tensor:
        if rollout is not None:
            self._arm_value_sink(rollout)
        return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, T, batch_size=batch_size)[0]

    def _rollout_logps(self, batch: dict, rollout: Rollout, sampled: torch.Tensor | None, sampler_gives_pi_old: bool,
                       forward: tuple) -> None:
        """log π_old of the sampled tokens (for the KL penalty, and as π_old when ``sampler_gives_pi_old``): GRPO's
        forward pass if it ran one, else the sampler's (checked once against a forward pass), else one forward."""
        if sampled is not None and self.sampler_check.passed is None:
            exact = self._forward_logps(*forward, rollout=rollout)
            if not self.sampler_check.verify(sampled, exact, batch["completion_mask"],
                                             lambda d: self.accelerator.gather(d).max()):
                sampled = exact
            self._metrics["train"]["sampling/logp_max_diff"].append(self.sampler_check.max_diff)
        if sampler_gives_pi_old:
            batch["old_per_token_logps"] = sampled if sampled is not None else self._forward_logps(*forward, rollout)
        rollout.logps = batch.get("old_per_token_logps")
        if rollout.logps is None:
            rollout.logps = sampled if sampled is not None else self._forward_logps(*forward, rollout)
        rollout.ref_logps = batch.get("ref_per_token_logps")

    def _score(self, batch: dict, rollout: Rollout) -> None:
        """The sequence score: weighted sum of the reward functions (this process's slice of the gathered rewards),
        minus ``missing_eos_penalty``. Completions no reward function scored are masked out of the losses."""
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        B, rank = completion_ids.size(0), self.accelerator.process_index
        rewards_per_func = rollout.rewards_per_func[rank * B : (rank + 1) * B]
        scores = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        rollout.has_eos = (torch.isin(completion_ids, self._eos_ids) & completion_mask.bool()).any(dim=1)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~rollout.has_eos).float()
        if not bool(scorable.all()):
            batch["completion_mask"] = completion_mask * scorable.unsqueeze(1).to(completion_mask.dtype)
        rollout.scores, rollout.mask = scores, batch["completion_mask"].float()

    def _critic_pass(self, batch: dict, rollout: Rollout, forward: tuple) -> None:
        """V(s_t) at rollout time. When the first optimizer step's micro-batch is this whole rollout, the pass keeps
        its graph (``rollout.critic_pass``) and that step backpropagates through it: one critic forward less."""
        input_ids, attention_mask, T, batch_size = forward
        if self.args.value_head_on_policy:
            values = self._policy_head_values(rollout, forward)
        elif self._can_reuse_critic_pass(rollout, batch_size):
            with torch.enable_grad(), self.accelerator.autocast():
                rollout.critic_pass = self.value_model(input_ids, attention_mask, completion_length=T)
            values = rollout.critic_pass.detach()
            batch["rollout_row"] = torch.arange(len(values), device=values.device)  # follows GRPO's shuffle
        else:
            with self.accelerator.autocast():
                values = critic_values(self.value_model, input_ids, attention_mask, T, batch_size)
        rollout.values = batch["old_values"] = values * rollout.mask

    @torch.no_grad()
    def _policy_head_values(self, rollout: Rollout, forward: tuple) -> torch.Tensor:
        """``value_head_on_policy``: the values read during the forward pass that computed log π_old; when the
        sampler gave π_old (no such pass), those read while sampling (KV cache: equal up to float rounding); else a
        pass of the policy's body alone (no LM head)."""
        input_ids, attention_mask, T, batch_size = forward
        if rollout.policy_pass_values is not None:
            return policy_pass_values(rollout.policy_pass_values, self._policy_backbone)
        sampled = rollout.sampler_values
        if sampled is not None and sampled.size(0) == input_ids.size(0) and sampled.size(1) >= T:
            return sampled[:, :T]
        chunks = []
        for i in range(0, input_ids.size(0), batch_size):
            with self.accelerator.autocast():
                out = self._policy_backbone(input_ids=input_ids[i : i + batch_size],
                                            attention_mask=attention_mask[i : i + batch_size], use_cache=False)
            chunks.append(self.value_model(out.last_hidden_state, T))
        return torch.cat(chunks, dim=0)

    def _can_reuse_critic_pass(self, rollout: Rollout, batch_size: int) -> bool:
        """Holds when the first step's micro-batch is the whole rollout (one mini-batch, no gradient accumulation), on
        one process (a DDP or FSDP critic must be called by the step that backpropagates), with no dropout (the same
        values) and every completion scorable (the loss then sees the same attention mask)."""
        return (
            rollout.mode == "train" and self.args.steps_per_generation == 1 and rollout.mask.size(0) == batch_size
            and self.accelerator.num_processes == 1 and self.args.disable_dropout
            and bool(rollout.mask.any(dim=1).all())
        )

    def _rewards_and_advantages(self, batch: dict, rollout: Rollout) -> None:
        """r_t = −β·KL_t plus the score at the last completion token (Ziegler et al. 2019; InstructGPT), then GAE."""
        args, mask = self.args, rollout.mask
        if rollout.ref_logps is not None:
            rollout.kl = kl_estimate(rollout.logps, rollout.ref_logps, kind=args.kl_estimator) * mask
        else:
            rollout.kl = torch.zeros_like(mask)
        rollout.token_rewards, rollout.non_score_rewards = token_level_rewards(rollout.scores, rollout.kl, mask,
                                                                               rollout.kl_coef)
        if args.whiten_rewards and mask.sum() > 1:
            rollout.token_rewards = self._whiten(rollout.token_rewards, mask, shift_mean=False)
        advantages, rollout.returns = gae(rollout.token_rewards, rollout.values, mask, gamma=args.gamma, lam=args.lam)
        rollout.advantages = self._whiten(advantages, mask) if mask.sum() > 1 else advantages
        batch["advantages"], batch["returns"] = rollout.advantages, rollout.returns  # (B, T) token advantages

    # Batch statistics over every process's tokens, so that two ranks compute what one process holding both halves of
    # the batch computes (on one process: the objectives functions themselves).
    def _mean_var(self, x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _log_rollout(self, rollout: Rollout, completion_ids: torch.Tensor) -> None:
        """Old TRL PPO's rollout metrics (sequence sums averaged over completions, over all processes); feeds the
        adaptive KL controller."""
        mask = rollout.mask
        num_eos = (torch.isin(completion_ids, self._eos_ids) & mask.bool()).sum(dim=1).float()
        per_seq = torch.stack([rollout.kl.sum(dim=1), rollout.non_score_rewards.sum(dim=1), rollout.scores,
                               (-rollout.logps * mask).sum(dim=1), num_eos,
                               masked_mean(rollout.advantages, mask, dim=1)], dim=1)
        gathered = self.accelerator.gather(per_seq)
        seq_kl, non_score, score, entropy = gathered.mean(dim=0).tolist()[:4]
        metrics = self._metrics[rollout.mode]
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
        # The completions table: PPO's advantages (mean over each completion's tokens), not GRPO's unused ones.
        table = self._logs["advantages"]
        for _ in range(min(len(table), gathered.size(0))):
            table.pop()
        table.extend(gathered[:, 5].tolist())
        if rollout.mode == "train":
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
        head_values = self._value_sink = [] if self.args.value_head_on_policy else None  # V from this same forward
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
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
            return policy_pass_values(head_values, self._policy_backbone)
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
        per_seq = self.accelerator.gather(torch.stack([masked_mean(low, mask, dim=1), masked_mean(high, mask, dim=1)], 1))
        metrics["clip_ratio/low_min"].append(float(per_seq[:, 0].min()))
        metrics["clip_ratio/high_max"].append(float(per_seq[:, 1].max()))

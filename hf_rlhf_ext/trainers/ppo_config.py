"""Configuration of :class:`~hf_rlhf_ext.trainers.ppo.PPOTrainer`: ``trl.GRPOConfig`` plus PPO's own fields, and the
mapping of PPO's names onto the GRPO fields that implement them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from ..reward_guard_config import NanRewardsArguments

__all__ = ["PPOConfig"]


@dataclass
class PPOConfig(NanRewardsArguments, GRPOConfig):
    r"""
    Configuration of :class:`PPOTrainer`: every field of ``trl.GRPOConfig`` plus the PPO-specific ones below.
    Defaults follow the last TRL PPO (trl 1.12 ``PPOConfig``) where they make sense.

    Parameters that control the KL penalty (in the reward, not in the loss):
        kl_coef (`float`, *optional*, defaults to `0.05`):
            β of the per-token reward r_t = −β·KL_t. Copied into GRPO's ``beta`` so that GRPO builds and runs the
            reference model (with PEFT: the adapter-disabled base); PPO's loss has no β·k3 term (the KL is in the
            reward). Set ``kl_coef`` rather than ``beta``.
        kl_estimator (`Literal["k1", "k3"]`, *optional*, defaults to `"k1"`):
            Per-token KL estimator in the reward (Schulman, "Approximating KL divergence"): k1 = log π − log π_ref
            (unbiased, can be negative), k3 = eˣ − 1 − x (unbiased, ≥ 0, lower variance).
        kl_target (`float` or `None`, *optional*, defaults to `None`):
            If set, β adapts towards this sequence-level KL (nats) with ``AdaptiveKLController`` (Ziegler et al.
            2019); ``kl_coef`` is then the initial β. `None` keeps β fixed.
        kl_horizon (`float`, *optional*, defaults to `10000`):
            Horizon of the adaptive controller, in completions.

    Parameters that control the reward:
        missing_eos_penalty (`float` or `None`, *optional*, defaults to `None`):
            Subtracted from the score of every completion that has no EOS token (hit the length limit).
        whiten_rewards (`bool`, *optional*, defaults to `False`):
            Whiten the per-token rewards (without shifting their mean) before GAE.

    Parameters that control GAE and the losses:
        gamma (`float`, *optional*, defaults to `1.0`): discount factor.
        lam (`float`, *optional*, defaults to `0.95`): GAE λ.
        cliprange (`float`, *optional*, defaults to `0.2`): policy ratio clip ε (copied into GRPO's ``epsilon``).
        cliprange_value (`float`, *optional*, defaults to `0.2`): value clip around the rollout-time values.
        vf_coef (`float`, *optional*, defaults to `0.1`): weight of the value loss.
        num_ppo_epochs (`int`, *optional*, defaults to `4`):
            Passes over each rollout (copied into GRPO's ``num_iterations``).
        num_mini_batches (`int`, *optional*, defaults to `1`):
            Optimizer steps per pass over a rollout. The rollout is ``per_device_train_batch_size ×
            gradient_accumulation_steps × num_mini_batches`` completions per process (sets ``steps_per_generation``
            unless ``steps_per_generation`` or ``generation_batch_size`` is given).

    Parameters that control the critic:
        value_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Checkpoint whose transformer body initialises the critic (a fresh zero head is added). Default: the reward
            model when one is given (and shares the policy's tokenizer), else the policy.
        critic_shares_base (`bool`, *optional*, defaults to `False`):
            With a PEFT ``peft_config``: the critic is its own LoRA adapter (same config) plus value head on the
            policy's frozen base, whose weights are shared, not copied (memory ≈ policy + two adapters).
        value_head_on_policy (`bool`, *optional*, defaults to `False`):
            No critic body: a zero-initialised linear value head reads the policy's own last hidden states, in the
            same forward pass as the policy's log-probs (the shared-trunk actor-critic of TRL's first PPO). The value
            loss then also trains the policy's weights (or its LoRA adapter); memory is close to GRPO's. Saved beside
            the policy as ``value_head.safetensors`` (:class:`PolicyValueHead`). One process or DDP (not
            DeepSpeed/FSDP).
        critic_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's parameter groups (default: ``learning_rate``); the schedule is shared.
            With ``value_head_on_policy``: the head's learning rate.
        logprobs_from_sampling (`bool`, *optional*, defaults to `True`):
            Take the rollout's per-token log-probs (for the KL penalty; with several PPO epochs in full precision
            also as π_old) from the logits seen while sampling instead of one more forward pass (≈ 6% of a step).
            They differ from a full forward by float rounding only; under bf16/fp16 π_old still comes from GRPO's
            forward pass. Set `False` to recompute everything with forward passes.

    > [!NOTE]
    > Defaults that differ from ``GRPOConfig``: ``num_generations=1`` (PPO needs no groups; ``GRPOConfig`` rejects
    > values < 2, which is worked around in ``__post_init__``), ``loss_type="bnpo"``, ``temperature=0.7``,
    > ``learning_rate=3e-6``, ``disable_dropout=True`` (dropout noise alone moves the ratio),
    > ``vllm_importance_sampling_correction=False``, and ``bf16`` / ``gradient_checkpointing`` default to `True` on
    > CUDA and `False` without it. ``beta``, ``epsilon`` and ``num_iterations`` are derived from ``kl_coef``,
    > ``cliprange`` and ``num_ppo_epochs``. GRPO loss settings that PPO's loss does not implement are refused:
    > ``delta``, ``off_policy_mask_threshold``, ``top_entropy_quantile`` < 1, ``use_adaptive_entropy`` and vLLM
    > importance-sampling correction (``entropy_coef``, ``epsilon_high`` and the ``loss_type`` aggregations work).
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    num_generations: int | None = field(
        default=1, metadata={"help": "Completions per prompt. PPO needs no groups: 1 (distinct prompts) by default."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    loss_type: str = field(default="bnpo", metadata={"help": "Policy loss aggregation; 'bnpo' = token mean."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in policy, reference and critic."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Gradient checkpointing; default True on CUDA, False on CPU."}
    )

    kl_coef: float = field(default=0.05, metadata={"help": "β of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator in the reward: 'k1' or 'k3'."})
    kl_target: float | None = field(
        default=None, metadata={"help": "Target sequence KL for adaptive β (None = fixed)."})
    kl_horizon: float = field(default=10000, metadata={"help": "Horizon (completions) of the adaptive KL controller."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of completions without EOS."}
    )
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per pass over a rollout."})
    value_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint for the critic's body (default: reward model, else policy)."}
    )
    critic_shares_base: bool = field(
        default=False, metadata={"help": "With PEFT: critic = own LoRA adapter + head on the policy's shared base."}
    )
    value_head_on_policy: bool = field(
        default=False, metadata={"help": "Critic = a value head on the policy's own last hidden states (no body)."}
    )
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Critic learning rate."})
    logprobs_from_sampling: bool = field(
        default=True, metadata={"help": "Rollout log-probs from the sampling logits (saves one forward pass)."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=False, metadata={"help": "GRPO's vLLM importance-sampling correction: not implemented by PPO's loss."}
    )
    fast_generation: bool = field(
        default=True,
        metadata={"help": "Without vLLM: a KV-cache sampling loop instead of model.generate (same draws)."}
    )

    def __post_init__(self):
        cuda = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None and not cuda:
            self.bf16 = False  # TRL's default (bf16=True) fails or crawls on CPU
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = cuda
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        for name in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise ValueError("num_ppo_epochs and num_mini_batches must be >= 1")
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_coef <= 0):
            raise ValueError("kl_target needs kl_target > 0 and an initial kl_coef > 0 (β = 0 cannot adapt)")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError("missing_eos_penalty is subtracted from the score; give a positive value")
        if self.loss_type not in ("bnpo", "grpo", "dr_grpo", "dapo"):
            raise ValueError(f"PPOTrainer supports the clipped losses bnpo/grpo/dr_grpo/dapo, got {self.loss_type!r}")
        if self.importance_sampling_level != "token":
            raise ValueError("PPO uses token-level ratios; importance_sampling_level must be 'token'")
        self._refuse_grpo_only_loss_settings()
        self._check_critic_placement()

        # PPO names -> the GRPO fields that implement them. A GRPO name set to something else is a conflict.
        for grpo_name, grpo_default, ppo_name in (
            ("beta", 0.0, "kl_coef"), ("epsilon", 0.2, "cliprange"), ("num_iterations", 1, "num_ppo_epochs")
        ):
            given, wanted = getattr(self, grpo_name), getattr(self, ppo_name)
            if given != grpo_default and given != wanted:
                raise ValueError(f"Set {ppo_name} (={wanted}), not {grpo_name} (={given}): PPOConfig derives "
                                 f"{grpo_name}.")
            setattr(self, grpo_name, wanted)
        if self.generation_batch_size is None and self.steps_per_generation is None:
            self.steps_per_generation = self.num_mini_batches * self.gradient_accumulation_steps

        # GRPOConfig rejects num_generations < 2 (it needs groups for its advantages; PPO does not, and the trainer
        # itself handles 1). Run its checks with a stand-in that divides the generation batch, then put 1 back.
        requested = self.num_generations
        if requested is not None and requested < 1:
            raise ValueError(f"num_generations must be >= 1, got {requested}")
        if requested == 1:
            if self.num_generations_eval is None:
                self.num_generations_eval = 1
            # per-process rollout size: divides the generation batch whatever the number of processes
            stand_in = self.generation_batch_size or self.per_device_train_batch_size * self.steps_per_generation
            if stand_in < 2:
                raise ValueError(
                    "PPO needs at least 2 completions per rollout and process (advantages are whitened over them): "
                    "raise per_device_train_batch_size, gradient_accumulation_steps or num_mini_batches."
                )
            self.num_generations = stand_in
        try:
            super().__post_init__()
        finally:
            if requested == 1:
                self.num_generations = 1

    def _check_critic_placement(self) -> None:
        """One critic placement at a time: a value head on the policy has no body to share or load."""
        if self.value_head_on_policy and (self.critic_shares_base or self.value_model_name_or_path):
            raise ValueError("value_head_on_policy=True puts the critic on the policy itself: drop critic_shares_base "
                             "and value_model_name_or_path (or keep them and set value_head_on_policy=False).")

    def _refuse_grpo_only_loss_settings(self) -> None:
        """PPO's loss is its own (``PPOTrainer._compute_loss``): GRPO loss settings it does not implement would be
        silently ignored, so they are refused."""
        given = {
            "delta": self.delta is not None,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "use_adaptive_entropy": bool(self.use_adaptive_entropy),
            "vllm_importance_sampling_correction": bool(self.use_vllm and self.vllm_importance_sampling_correction),
        }
        refused = [name for name, is_set in given.items() if is_set]
        if refused:
            raise ValueError(
                f"PPOConfig does not support the GRPO loss settings {refused}: PPO's loss (clipped surrogate on the "
                "token ratio + clipped value loss + optional fixed entropy bonus) does not implement them. Remove "
                "them (use entropy_coef for a fixed entropy bonus; leave top_entropy_quantile at 1.0 and "
                "vllm_importance_sampling_correction at False)."
            )

"""PPO with a value model (critic) on current TRL, as a subclass of ``trl.GRPOTrainer``.

TRL removed its ``PPOTrainer`` in 1.13. This one inherits everything GRPO already does well — generation (also vLLM),
reward functions and reward models, the reference model (or the adapter-disabled base under PEFT), the clipped policy
loss, logging, checkpointing, ``push_to_hub`` — and replaces only two steps:

1. **Scoring** (``_generate_and_score_completions``): after GRPO has generated and scored a rollout, the sequence score
   (weighted sum of the reward functions, minus ``missing_eos_penalty`` when a completion never ended) is turned into
   per-token rewards  r_t = −β·KL_t  (+ score at the last completion token)  — the KL-shaped reward of Ziegler et al.
   2019 / InstructGPT —, the critic values V(s_t) are computed once, and GAE(γ, λ) gives token advantages (whitened)
   and returns. GRPO's group advantages are discarded.
2. **Loss** (``_compute_loss``): GRPO's clipped policy loss (``loss_type="bnpo"``: a token mean, as old TRL PPO) with
   GRPO's own β·k3 term switched off (the KL is already in the reward), plus ``vf_coef`` × the clipped value loss.

``num_ppo_epochs`` maps onto GRPO's ``num_iterations`` (the same rollout is reused for that many passes, the ratio is
exactly 1 on the first) and ``num_mini_batches`` onto ``steps_per_generation``. The maths lives in
``hf_rlhf_ext.objectives``; this module only wires it into the trainer.

Traps handled here (each one failed *silently* in a prototype): the critic's parameters are added to the optimizer in
``create_optimizer`` (transformers 5 never calls ``create_optimizer_and_scheduler``), its gradients are zeroed and
clipped here (the Trainer only touches the policy), it is saved in every checkpoint and restored on resume (otherwise
it restarts from its initial weights while the optimizer state is restored), under DDP the *wrapped* critic is called
(otherwise its gradients are never all-reduced), and generation settings that change the sampling distribution are
refused (they make the KL estimate meaningless — see ``_check_sampling_distribution``).

Speed, with the same results: without vLLM the rollout is sampled by a KV-cache loop that draws exactly what
``generate`` draws and keeps the sampled tokens' log-probs (``fast_generation``); the rollout's critic pass is reused,
with its graph, by the first optimizer step when that step's micro-batch is the whole rollout (one critic forward less
per rollout); and in full precision, when the logits are small, the policy's log-probs come from the plain LM head
instead of GRPO's chunked one (``PLAIN_LOGITS_MAX_ELEMENTS``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import resource
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import disable_dropout_in_model

from ..objectives import clipped_surrogate, clipped_value_loss, explained_variance, gae, kl_estimate, masked_mean, whiten
from ..reward_guard import NanRewardsArguments, attach_reward_guard
from ..sampling import forward_kwargs, sample_with_kv_cache
from ..validation import check_trainer_prompts, validate_trainer_inputs
from .kl_control import AdaptiveKLController, FixedKLController
from .value_model import ValueModel, _base_transformer, share_weights_copy

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"
SAMPLING_LOGPS_TOLERANCE = 1e-3  # max |log π_sampler − log π_forward| accepted for the logprobs_from_sampling shortcut
PPO_STATE_FILE = "ppo_state.json"
# Above this many logits per forward chunk (rows × (T+1) × vocab) the policy's log-probs use GRPO's fused LM head.
PLAIN_LOGITS_MAX_ELEMENTS = 1 << 24
_CRITIC_VALUES_KEY = "_ppo_critic_values"  # rollout critic values with their graph, consumed by the first step

__all__ = ["PPOConfig", "PPOTrainer", "token_level_rewards", "VALUE_MODEL_DIR", "PPO_STATE_FILE"]


@dataclass
class PPOConfig(NanRewardsArguments, GRPOConfig):
    r"""
    Configuration of :class:`PPOTrainer`: every field of ``trl.GRPOConfig`` plus the PPO-specific ones below.
    Defaults follow the last TRL PPO (trl 1.12 ``PPOConfig``) where they make sense.

    Parameters that control the KL penalty (in the reward, not in the loss):
        kl_coef (`float`, *optional*, defaults to `0.05`):
            β of the per-token reward r_t = −β·KL_t. Copied into GRPO's ``beta`` so that GRPO builds and runs the
            reference model (with PEFT: the adapter-disabled base); GRPO's own β·k3 loss term is switched off.
            Set ``kl_coef`` rather than ``beta``.
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
        critic_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's parameter groups (default: ``learning_rate``); the schedule is shared.
        logprobs_from_sampling (`bool`, *optional*, defaults to `True`):
            Take the rollout's per-token log-probs (for the KL penalty; with several PPO epochs in full precision
            also as π_old) from the logits seen while sampling instead of one more forward pass (≈ 6% of a step).
            They differ from a full forward by float rounding only; under bf16/fp16 π_old still comes from GRPO's
            forward pass. Set `False` to recompute everything with forward passes.

    > [!NOTE]
    > Defaults that differ from ``GRPOConfig``: ``num_generations=1`` (PPO needs no groups; ``GRPOConfig`` rejects
    > values < 2, which is worked around in ``__post_init__``), ``loss_type="bnpo"``, ``temperature=0.7``,
    > ``learning_rate=3e-6``, ``disable_dropout=True`` (dropout noise alone moves the ratio), and ``bf16`` /
    > ``gradient_checkpointing`` default to `True` on CUDA and `False` without it. ``beta``, ``epsilon`` and
    > ``num_iterations`` are derived from ``kl_coef``, ``cliprange`` and ``num_ppo_epochs``.
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
    kl_target: float | None = field(default=None, metadata={"help": "Target sequence KL for adaptive β (None = fixed)."})
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
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Critic learning rate."})
    logprobs_from_sampling: bool = field(
        default=True, metadata={"help": "Rollout log-probs from the sampling logits (saves one forward pass)."}
    )
    fast_generation: bool = field(
        default=True, metadata={"help": "Without vLLM: a KV-cache sampling loop instead of model.generate (same draws)."}
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

        # PPO names -> the GRPO fields that implement them. A GRPO name set to something else is a conflict.
        for grpo_name, grpo_default, ppo_name in (
            ("beta", 0.0, "kl_coef"), ("epsilon", 0.2, "cliprange"), ("num_iterations", 1, "num_ppo_epochs")
        ):
            given, wanted = getattr(self, grpo_name), getattr(self, ppo_name)
            if given != grpo_default and given != wanted:
                raise ValueError(f"Set {ppo_name} (={wanted}), not {grpo_name} (={given}): PPOConfig derives {grpo_name}.")
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


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF-PPO: r_t = −β·KL_t on every completion token, plus the sequence score on the last
    valid token (Ziegler et al. 2019, InstructGPT). Returns ``(rewards, non_score_rewards)``, both (B, T), 0 on padding.

    The score lands on the last token of the completion (its EOS when it has one): the only state that has seen the
    whole reply. A completion with no valid token gets no score.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    lengths = mask.sum(dim=1)
    last = (lengths.long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += torch.where(lengths > 0, scores.to(rewards.dtype), torch.zeros_like(lengths))
    return rewards, non_score


class _SampledLogProbs(LogitsProcessor):
    """Records log π(y_t) of each sampled token from the logits the sampler saw (no extra forward pass).

    Custom processors run before transformers' temperature warper, so it divides by the temperature itself, exactly
    as the policy's log-probs are computed in training. Keeps only one step of (B, V) log-probs in memory.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._prev: torch.Tensor | None = None
        self._out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._out.append(self._prev.gather(-1, input_ids[:, -1:]))  # the token sampled at the previous step
        self._prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        if self._prev is not None:
            self._out.append(self._prev.gather(-1, sequences[:, -1:]))
            self._prev = None
        return torch.cat(self._out, dim=1) if self._out else sequences.new_zeros((sequences.size(0), 0), dtype=torch.float)


def _changes_distribution(name: str, value: Any) -> bool:
    """Whether a generation setting makes the sampling distribution differ from softmax(logits / temperature)."""
    if value is None:
        return False
    if name in ("top_k", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_new_tokens", "min_length"):
        return int(value) > 0
    if name in ("top_p", "typical_p"):
        return float(value) < 1.0
    if name in ("min_p", "epsilon_cutoff", "eta_cutoff"):
        return float(value) > 0.0
    if name in ("repetition_penalty", "encoder_repetition_penalty", "guidance_scale", "num_beams"):
        return float(value) != 1.0
    if name == "do_sample":
        return value is False
    if name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias"):
        return len(value) > 0
    return True  # top_h, forced_bos_token_id, forced_eos_token_id, exponential_decay_length_penalty, watermarking


_SAMPLING_SETTINGS = (
    "do_sample", "num_beams", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale",
    "watermarking_config",
)


class PPOTrainer(GRPOTrainer):
    """PPO with a critic, GAE and the KL penalty in the reward, on top of ``trl.GRPOTrainer``.

    Takes the arguments of ``GRPOTrainer`` (``model``, ``reward_funcs``, ``args`` (a :class:`PPOConfig`),
    datasets with a ``prompt`` column, ``processing_class``, ``reward_processing_classes``, ``callbacks``,
    ``optimizers``, ``peft_config``) plus ``value_model``: a :class:`ValueModel`, a model (its body is copied) or a
    path; default see ``PPOConfig.value_model_name_or_path``. Tools, environments and custom rollouts are not
    supported (their masks are not contiguous, which GAE needs).

    Saved beside the policy: ``<dir>/value_model`` (:meth:`ValueModel.from_pretrained`) and ``<dir>/ppo_state.json``
    (KL controller), in ``output_dir`` and in every checkpoint; resuming restores both.
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
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-PPO")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"PPOTrainer needs a PPOConfig, got {type(args).__name__}")
        validate_trainer_inputs(args, train_dataset, eval_dataset)
        unsupported = [k for k in ("tools", "rollout_func", "environment_factory") if kwargs.get(k)]
        if unsupported:
            raise NotImplementedError(f"PPOTrainer does not support {unsupported} (GAE needs contiguous completions).")
        if optimizers[1] is not None:
            raise ValueError("Pass no scheduler: the critic's parameter groups must exist before the scheduler is built.")

        shared_body = None
        if args.critic_shares_base:
            if peft_config is None:
                raise ValueError("critic_shares_base=True needs a peft_config (the critic is a LoRA adapter on the base).")
            if value_model is not None or args.value_model_name_or_path:
                raise ValueError("critic_shares_base=True builds the critic from the policy's base; drop value_model.")
            if isinstance(model, str):
                model = self._load_policy(model, args, quantization_config)
            # Copy the body's modules *before* GRPO injects the policy's adapter; the weight tensors stay shared.
            shared_body = share_weights_copy(_base_transformer(model))
        policy_body_copy = None
        if value_model is None and not args.value_model_name_or_path and shared_body is None:
            if not isinstance(model, str) and not _has_reward_model(reward_funcs):
                policy_body_copy = copy.deepcopy(_base_transformer(model))  # before PEFT changes the policy

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            quantization_config=quantization_config,
            **kwargs,
        )
        self._check_sampling_distribution()
        if args.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(init_kl_coef=args.kl_coef, target=args.kl_target, horizon=args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)

        self.value_model = self._build_critic(value_model, shared_body, policy_body_copy, peft_config, model)
        if args.disable_dropout:
            disable_dropout_in_model(self.value_model)
        if args.gradient_checkpointing and hasattr(self.value_model.backbone, "gradient_checkpointing_enable"):
            self.value_model.backbone.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
            if self.value_model.is_peft:
                self.value_model.backbone.enable_input_require_grads()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("PPOTrainer's critic is not yet supported with DeepSpeed or FSDP; use DDP.")
        # Under DDP this wraps the critic: calling the *wrapped* module is what all-reduces its gradients.
        self.value_model_wrapped = self.accelerator.prepare_model(self.value_model)
        self._eos_ids = torch.tensor(self.eos_token_ids, device=self.accelerator.device)
        self._rollout_rewards: torch.Tensor | None = None
        self._sampling_logps: torch.Tensor | None = None
        self._last_policy_logps: torch.Tensor | None = None
        self._last_rollout: dict[str, Any] = {}
        self._sampling_logps_ok: bool | None = None  # checked against a forward pass on the first rollout
        self._critic_values_step: int | None = None  # step whose rollout critic pass kept its graph for the loss
        self._fast_generation = args.fast_generation and self._fast_generation_supported()
        check_trainer_prompts(self)
        attach_reward_guard(self)  # NaN/inf rewards stop the run or are dropped (args.nan_rewards)

    # ------------------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_policy(path: str, args: PPOConfig, quantization_config: Any) -> PreTrainedModel:
        """Loads the policy as GRPOTrainer would (needed when the critic must share its base before PEFT wraps it)."""
        from trl.trainer.utils import create_model_from_path

        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return create_model_from_path(path, **kwargs)

    def _build_critic(self, value_model, shared_body, policy_body_copy, peft_config, model_arg) -> ValueModel:
        args = self.args
        load_kwargs = {"trust_remote_code": args.trust_remote_code, "dtype": self.model.dtype}
        if isinstance(value_model, ValueModel):
            return value_model
        if isinstance(value_model, nn.Module):
            return ValueModel.from_model(value_model)
        path = value_model if isinstance(value_model, str) else args.value_model_name_or_path
        if path:
            return ValueModel.from_backbone_path(path, **load_kwargs)
        if shared_body is not None:
            from peft import get_peft_model

            critic_cfg = copy.deepcopy(peft_config)
            critic_cfg.task_type = "FEATURE_EXTRACTION"
            critic_cfg.modules_to_save = None
            return ValueModel(get_peft_model(shared_body, critic_cfg))
        # Default: the first reward model that reads the policy's tokens, as old TRL PPO did; else the policy.
        policy_vocab = self._tokenizer.get_vocab()
        for func, rm_tok in zip(self.reward_funcs, self.reward_processing_classes):
            if not isinstance(func, PreTrainedModel):  # a reward function wrapping a model (rewards.RewardModelFunction)
                func, rm_tok = getattr(func, "model", None), getattr(func, "tokenizer", None)
            if isinstance(func, PreTrainedModel) and rm_tok is not None and rm_tok.get_vocab() == policy_vocab:
                rm_path = func.config._name_or_path
                if rm_path and os.path.isdir(rm_path):
                    return ValueModel.from_backbone_path(rm_path, **load_kwargs)
                return ValueModel.from_model(self.accelerator.unwrap_model(func))
        if policy_body_copy is not None:
            return ValueModel(policy_body_copy)
        policy_path = model_arg if isinstance(model_arg, str) else self.model.config._name_or_path
        if not policy_path:
            raise ValueError("Cannot build a critic: give value_model or value_model_name_or_path.")
        return ValueModel.from_backbone_path(policy_path, **load_kwargs)

    def _check_sampling_distribution(self) -> None:
        """Refuses generation settings under which samples do not come from softmax(logits / temperature).

        The KL penalty and the ratio are computed from the policy's own log-probs. With a logits processor in the
        sampler (``min_new_tokens`` banning EOS, top-k/p, repetition penalty, ...) the tokens come from another
        distribution, and E[k1] is no longer KL(π‖π_ref): it can go negative and turn into a *reward* (a prototype's
        policy put its mass on the banned EOS, KL reached −84 and the score collapsed). Hence an error, not a warning.
        """
        if self.use_vllm:
            settings = {k: getattr(self.args, k, None) for k in ("top_k", "top_p", "min_p", "repetition_penalty")}
            settings.update(self.args.generation_kwargs or {})
        else:
            settings = self.generation_config.to_dict()
            model_defaults = self.accelerator.unwrap_model(self.model).generation_config.to_dict()
            for key, value in model_defaults.items():  # generate() fills unset values from the model's config
                if settings.get(key) is None:
                    settings[key] = value
        bad = {k: settings[k] for k in _SAMPLING_SETTINGS if _changes_distribution(k, settings.get(k))}
        if bad:
            raise ValueError(
                f"PPOTrainer refuses generation settings that change the sampling distribution: {bad}. The KL penalty "
                "and the PPO ratio use the policy's own (temperature-scaled) log-probabilities; tokens drawn from "
                "another distribution bias the KL estimate (it can turn negative and become a reward: with "
                "min_new_tokens banning EOS, the policy learns to put its mass on EOS). Use top_k=0, top_p=1.0, "
                "min_p=None, repetition_penalty=1.0 and no min_new_tokens/min_length/bad_words_ids/suppress_tokens "
                "(check the model's generation_config.json too). For completions of a fixed length, pass "
                "generation_kwargs={'eos_token_id': None} instead of min_new_tokens."
            )

    # Generation settings the KV-cache sampler reproduces; anything else in generation_kwargs goes through generate().
    _FAST_GENERATION_KEYS = frozenset({
        "max_new_tokens", "do_sample", "pad_token_id", "bos_token_id", "eos_token_id", "temperature", "top_p", "top_k",
        "min_p", "repetition_penalty", "cache_implementation", "disable_compile", "use_cache",
    })

    def _fast_generation_supported(self) -> bool:
        """Whether ``_sample_with_kv_cache`` draws exactly what ``generate`` would (checked once, at construction).
        The distribution-changing settings are already refused by ``_check_sampling_distribution``."""
        kwargs = self.generation_kwargs or {}
        return (
            not self.use_vllm and not self.use_transformers_continuous_batching and not self._is_vlm
            and set(kwargs) <= self._FAST_GENERATION_KEYS and kwargs.get("cache_implementation") is None
            and kwargs.get("do_sample", True) is True and kwargs.get("use_cache", True) is not False
            and self.temperature is not None and self.temperature > 0
            and not self.accelerator.unwrap_model(self.model).config.is_encoder_decoder
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Optimizer, gradients, checkpoints
    # ------------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Adds the critic's trainable parameters as extra groups of the policy's optimizer.

        Hooked here because transformers 5 calls ``create_optimizer`` (not ``create_optimizer_and_scheduler``), and
        before the scheduler is built so that the scheduler drives the critic's learning rate too.
        """
        optimizer = super().create_optimizer(model)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        decay = set(self.get_decay_parameter_names(self.value_model))
        lr = self.args.critic_learning_rate if self.args.critic_learning_rate is not None else self.args.learning_rate
        named = [(n, p) for n, p in self.value_model.named_parameters() if p.requires_grad and id(p) not in present]
        for weight_decay, params in (
            (self.args.weight_decay, [p for n, p in named if n in decay]),
            (0.0, [p for n, p in named if n not in decay]),
        ):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay, "lr": lr})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        # The Trainer zeroes only the policy's gradients; clear the critic's at the start of each accumulation window.
        if self._step % self.current_gradient_accumulation_steps == 0:
            self.value_model.zero_grad(set_to_none=True)
        return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        grad_norm = super()._clip_grad_norm(model)  # also unscales every group of the shared optimizer under fp16
        params = [p for p in self.value_model.parameters() if p.grad is not None]
        if params:
            critic_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            self._metrics["train"]["val/grad_norm"].append(float(critic_norm))
        return grad_norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the policy (as GRPO does), the critic in ``<dir>/value_model`` and the KL controller state."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.value_model.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR))
            with open(os.path.join(output_dir, PPO_STATE_FILE), "w") as f:
                json.dump({"kl_controller": self.kl_ctl.state_dict(), "kl_controller_class": type(self.kl_ctl).__name__}, f)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restores the critic and the KL controller with the policy. Without this the critic silently restarts from
        its initial weights while the shared optimizer state (moments for the critic included) is restored."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        critic_dir = os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR)
        if not os.path.isdir(critic_dir):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {VALUE_MODEL_DIR}/: not a PPOTrainer checkpoint")
        self.value_model.load_weights_from(critic_dir)
        state_file = os.path.join(resume_from_checkpoint, PPO_STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as f:
                self.kl_ctl.load_state_dict(json.load(f)["kl_controller"])

    # ------------------------------------------------------------------------------------------------------------------
    # Rollout: generation (old log-probs for free), rewards, values, GAE
    # ------------------------------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._fast_generation and images is None and not multimodal_fields and not has_tool_images:
            return self._fast_generate_single_turn(prompt_ids)
        if (self.use_vllm or self.use_transformers_continuous_batching or not self.args.logprobs_from_sampling
                or self._sampling_logps_ok is False):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        recorder = _SampledLogProbs(self.temperature)
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        original_generate = unwrapped.generate

        def generate(*a, **kw):  # GRPO calls unwrapped.generate(...): add the recorder to its processors
            processors = LogitsProcessorList([*(kw.pop("logits_processor", None) or []), recorder])
            sequences = original_generate(*a, logits_processor=processors, **kw)
            self._sampling_logps = recorder.finish(sequences)
            return sequences

        unwrapped.generate = generate
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            del unwrapped.generate  # back to the class method

    def _fast_generate_single_turn(self, prompt_ids):
        """``fast_generation``: GRPO's plain-transformers generation path with ``_sample_with_kv_cache`` in place of
        ``model.generate``. Returns the completions as GRPO does (cut after the first EOS) and keeps the sampled
        tokens' log-probs in ``self._sampling_logps`` when ``logprobs_from_sampling`` asks for them."""
        from trl.models.utils import unwrap_model_for_generation
        from trl.trainer.utils import pad

        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                        pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        prompt_mask = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left",
                          pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            completion_ids, logps = self._sample_with_kv_cache(unwrapped, input_ids, prompt_mask)

        # As GRPO: everything after the first EOS (any of the trainer's EOS ids) is dropped.
        is_eos = torch.isin(completion_ids, self._eos_ids)
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.size(1)).tolist()
        rows = completion_ids.tolist()
        if self.args.logprobs_from_sampling and self._sampling_logps_ok is not False:
            self._sampling_logps = logps
        return [row[:n] for row, n in zip(rows, lengths)], None

    def _sample_with_kv_cache(self, model, input_ids, prompt_mask):
        """:func:`hf_rlhf_ext.sampling.sample_with_kv_cache` with the trainer's generation settings: draws exactly
        what GRPO's ``generate`` call would. Returns (tokens (B, n), log π(token) (B, n), float32)."""
        kwargs = self.generation_kwargs or {}
        return sample_with_kv_cache(
            model, input_ids, prompt_mask,
            max_new_tokens=int(kwargs.get("max_new_tokens", self.max_completion_length)),
            temperature=float(self.temperature),
            pad_token_id=kwargs.get("pad_token_id", self._tokenizer.pad_token_id),
            eos_token_ids=kwargs.get("eos_token_id", self.eos_token_ids),
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rollout_rewards = rewards  # gathered (B_global, n_funcs); GRPO keeps only group advantages
        return rewards

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        logps, entropies, aux = self._per_token_logps(model, *args, **kwargs)
        self._last_policy_logps = logps.detach()  # the last call is the loss's: read there for the ratio statistics
        return logps, entropies, aux

    def _per_token_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                         compute_entropy=False, compute_aux_loss=False, **extra):
        """Per-token log-probs (and entropies) of the completion tokens: GRPO's fused, chunked LM head, or — for a
        text-only batch in full precision whose logits are small (``PLAIN_LOGITS_MAX_ELEMENTS`` per chunk) — the
        plain LM head: log_softmax(logits / T). The fused head exists to avoid materialising the (B, T, V) logits;
        below that size it only costs time (≈ 1/3 of a small policy's forward + backward). Same maths; the values
        differ by float rounding (≈ 1e-7); like the fused head, padded positions get 0."""
        batch_size = batch_size or input_ids.size(0)
        plain = (
            not compute_aux_loss and all(v is None for v in extra.values())
            and not (self.args.bf16 or self.args.fp16 or getattr(self.args, "cast_lm_head_to_fp32", False))
            and min(batch_size, input_ids.size(0)) * (logits_to_keep + 1) * self._vocab_size() <= PLAIN_LOGITS_MAX_ELEMENTS
            and next(model.parameters()).dtype == torch.float32
        )
        if not plain:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra,
            )
        keep = {"logits_to_keep": logits_to_keep + 1} if "logits_to_keep" in forward_kwargs(model) else {}
        entropy_grad = torch.is_grad_enabled() and bool(getattr(self, "_entropy_bonus_enabled", False))
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, att = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=att, use_cache=False, **keep).logits
            logits = logits[:, -logits_to_keep - 1 : -1].float() / self.temperature
            logp_all = torch.log_softmax(logits, dim=-1)
            padding = att[:, -logits_to_keep:] == 0
            logps = logp_all.gather(-1, ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
            all_logps.append(logps.masked_fill(padding, 0.0))
            if compute_entropy:
                with torch.set_grad_enabled(entropy_grad):
                    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
                all_entropies.append(entropy.masked_fill(padding, 0.0))
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return torch.cat(all_logps, dim=0), entropies, None

    def _vocab_size(self) -> int:
        size = getattr(self, "_vocab_size_cache", None)
        if size is None:
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            size = int(head.weight.shape[0]) if head is not None else 1 << 62
            self._vocab_size_cache = size
        return size

    @torch.no_grad()
    def _verify_sampling_logps(self, input_ids, attention_mask, completion_mask, T: int, batch_size: int) -> None:
        """Checks once that the sampler's log-probs equal those of the forward pass used for π and π_ref.

        They can differ beyond rounding: under bf16, or with left-padded prompts on a model with absolute position
        embeddings (GPT-2), where ``generate`` derives positions from the attention mask and the trainer's forward
        pass does not. A KL between the two conventions is biased (≈ 0.3 nats per completion at step 0 on the lab),
        so on a mismatch the rollout log-probs come from forward passes from then on.
        """
        forward, _, _ = self._per_token_logps(
            self.model, input_ids, attention_mask, T, batch_size=batch_size
        )
        mask = completion_mask.bool()
        diff = (forward - self._sampling_logps).abs().masked_fill(~mask, 0.0).max().reshape(1)
        diff = float(self.accelerator.gather(diff).max())  # the same decision on every process
        self._sampling_logps_ok = diff <= SAMPLING_LOGPS_TOLERANCE
        self._metrics["train"]["sampling/logp_max_diff"].append(diff)
        if not self._sampling_logps_ok:
            logger.warning(
                "The sampler's log-probs differ from the forward pass by up to %.3g (bf16, or left padding with "
                "absolute position embeddings): taking the rollout log-probs from forward passes instead.", diff
            )
            self._sampling_logps = forward

    @torch.no_grad()
    def _critic_values(self, input_ids, attention_mask, completion_length: int, batch_size: int) -> torch.Tensor:
        chunks = []
        with self.accelerator.autocast():
            for start in range(0, input_ids.size(0), batch_size):
                chunks.append(
                    self.value_model(
                        input_ids[start : start + batch_size],
                        attention_mask[start : start + batch_size],
                        completion_length=completion_length,
                    )
                )
        return torch.cat(chunks, dim=0)

    def _can_reuse_critic_forward(self, mode: str, B: int, batch_size: int, completion_mask: torch.Tensor) -> bool:
        """Whether the rollout's critic values can serve as the first training step's values (one critic forward
        less per rollout). Holds when that step's micro-batch is this whole rollout (one mini-batch, no gradient
        accumulation), on one process (a DDP critic must be called by the step that backpropagates), with no
        dropout (the same values) and every completion scorable (the loss then sees the same attention mask)."""
        return (
            mode == "train" and self.args.steps_per_generation == 1 and B == batch_size
            and self.value_model_wrapped is self.value_model and self.args.disable_dropout
            and bool(completion_mask.any(dim=1).all())
        )

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._rollout_rewards, self._sampling_logps = None, None
        # Several PPO epochs need π_old; GRPO gets it with one more forward pass. In full precision the sampler's
        # log-probs equal that forward up to float rounding (≈1e-6), so take them instead (as a bare PPO loop does):
        # GRPO only looks at num_iterations to decide on that pass. Under bf16/fp16 the difference is ~1e-2 and
        # would show as clipping on the first pass, so GRPO's forward is kept there.
        skip_old_forward = (
            mode == "train" and self.num_iterations > 1 and self._sampling_logps_ok is not False
            and self.args.logprobs_from_sampling and not self.use_vllm
            and not self.use_transformers_continuous_batching and not (self.args.bf16 or self.args.fp16)
            and self.args.gradient_accumulation_steps % self.args.steps_per_generation == 0
        )
        num_iterations = self.num_iterations
        if skip_old_forward:
            self.num_iterations = 1
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self.num_iterations = num_iterations
        args, device = self.args, self.accelerator.device

        prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        B, T = completion_ids.shape
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size

        if self._sampling_logps is not None:
            sampled = self._sampling_logps.to(device)[:, :T]
            # completions may be padded beyond the generated length (pad_to_multiple_of)
            self._sampling_logps = torch.nn.functional.pad(sampled, (0, T - sampled.size(1)))
            if self._sampling_logps_ok is None:  # on a mismatch this replaces them with the forward pass's
                self._verify_sampling_logps(input_ids, attention_mask, completion_mask, T, batch_size)
        if skip_old_forward:
            if self._sampling_logps is not None:
                out["old_per_token_logps"] = self._sampling_logps
            else:  # the check just failed: π_old from a forward pass, as GRPO would have done
                with torch.no_grad():
                    out["old_per_token_logps"], _, _ = self._per_token_logps(
                        self.model, input_ids, attention_mask, T, batch_size=batch_size
                    )

        # Sequence score: weighted sum of the reward functions (this process's slice of the gathered rewards).
        rewards_per_func = self._rollout_rewards
        rank = self.accelerator.process_index
        rewards_per_func = rewards_per_func[rank * B : (rank + 1) * B]
        scores = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        has_eos = (torch.isin(completion_ids, self._eos_ids) & completion_mask.bool()).any(dim=1)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
        if not bool(scorable.all()):  # every reward function returned None: no signal, drop from the losses
            completion_mask = completion_mask * scorable.unsqueeze(1).to(completion_mask.dtype)
            out["completion_mask"] = completion_mask
        mask = completion_mask.float()

        # Per-token log-probs of the rollout policy (π_old): from GRPO, from the sampler, or one forward pass.
        old_logps = out.get("old_per_token_logps")
        if old_logps is not None:
            rollout_logps = old_logps
        elif self._sampling_logps is not None:
            rollout_logps = self._sampling_logps
        else:
            with torch.no_grad():
                rollout_logps, _, _ = self._per_token_logps(
                    self.model, input_ids, attention_mask, T, batch_size=batch_size
                )
        ref_logps = out.get("ref_per_token_logps")
        if self._can_reuse_critic_forward(mode, B, batch_size, completion_mask):
            # The next training step sees exactly this batch (shuffled) with these critic weights: run the rollout's
            # critic pass with autograd on and let _compute_loss backpropagate through it instead of a second pass.
            with torch.enable_grad(), self.accelerator.autocast():
                values = self.value_model(input_ids, attention_mask, completion_length=T)
            out[_CRITIC_VALUES_KEY] = values  # permuted with the other rows by GRPO's shuffle (graph kept)
            self._critic_values_step = self.state.global_step
            old_values = values.detach() * mask
        else:
            old_values = self._critic_values(input_ids, attention_mask, T, batch_size) * mask  # one critic pass

        # r_t = −β·KL_t, plus the score at the last completion token (Ziegler et al. 2019; InstructGPT).
        beta = float(self.kl_ctl.value)
        if ref_logps is not None:
            kl = kl_estimate(rollout_logps, ref_logps, kind=args.kl_estimator) * mask
        else:
            kl = torch.zeros_like(mask)
        token_rewards, non_score_rewards = token_level_rewards(scores, kl, mask, beta)
        if args.whiten_rewards and mask.sum() > 1:
            token_rewards = whiten(token_rewards, mask, shift_mean=False)
        advantages, returns = gae(token_rewards, old_values, mask, gamma=args.gamma, lam=args.lam)
        if mask.sum() > 1:
            advantages = whiten(advantages, mask)
        out["advantages"] = advantages  # (B, T): GRPO's _compute_loss accepts token advantages
        out["old_values"] = old_values
        out["returns"] = returns
        # This process's rollout, for inspection (tests, callbacks); replaced at every rollout.
        self._last_rollout = {"scores": scores, "kl": kl, "token_rewards": token_rewards, "mask": mask,
                              "values": old_values, "returns": returns, "advantages": advantages,
                              "logps": rollout_logps, "ref_logps": ref_logps, "kl_coef": beta}

        self._log_rollout(mode, B, mask, kl, non_score_rewards, scores, rollout_logps, ref_logps, has_eos,
                          completion_ids, advantages, old_values, returns, beta)
        return out

    def _log_rollout(self, mode, B, mask, kl, non_score_rewards, scores, rollout_logps, ref_logps, has_eos,
                     completion_ids, advantages, old_values, returns, beta) -> None:
        """Old TRL PPO's rollout metrics (sequence sums averaged over completions, over all processes)."""
        num_eos = (torch.isin(completion_ids, self._eos_ids) & mask.bool()).sum(dim=1).float()
        per_seq = torch.stack(
            [
                kl.sum(dim=1),
                non_score_rewards.sum(dim=1),
                scores,
                (-rollout_logps * mask).sum(dim=1),
                num_eos,
                masked_mean(advantages, mask, dim=1),
            ],
            dim=1,
        )
        gathered = self.accelerator.gather(per_seq)
        means = gathered.mean(dim=0).tolist()
        seq_kl, non_score, score, entropy = means[0], means[1], means[2], means[3]
        metrics = self._metrics[mode]
        if ref_logps is not None:
            metrics["objective/kl"].append(seq_kl)
            k3 = kl_estimate(rollout_logps, ref_logps, kind="k3")
            metrics["kl"].append(float(self.accelerator.gather(masked_mean(k3, mask).reshape(1)).mean()))
        metrics["objective/entropy"].append(entropy)
        metrics["objective/non_score_reward"].append(non_score)
        metrics["objective/rlhf_reward"].append(non_score + score)
        metrics["objective/scores"].append(score)
        metrics["val/num_eos_tokens"].append(float(gathered[:, 4].sum()))
        metrics["kl_coef"].append(beta)
        if mask.sum() > 0:
            metrics["val/explained_variance"].append(explained_variance(old_values, returns, mask))
        if torch.cuda.is_available() and self.accelerator.device.type == "cuda":
            metrics["memory/peak_mb"].append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            metrics["memory/peak_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

        # The completions table: PPO's advantages (mean over each completion's tokens), not GRPO's unused ones.
        table = self._logs["advantages"]
        for _ in range(min(len(table), gathered.size(0))):
            table.pop()
        table.extend(gathered[:, 5].tolist())

        if mode == "train":
            # Adaptive β sees the mean *sequence* KL of this rollout over all processes (trlx #361: feeding it
            # anything else makes runs diverge exactly when the KL crosses the target).
            self.kl_ctl.update(seq_kl, n_steps=gathered.size(0))

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        beta, self.beta = self.beta, 0.0  # the KL is in the reward: keep GRPO from adding β·k3 to the loss
        try:
            policy_loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        T = completion_ids.size(1)
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask.float()

        critic = self.value_model_wrapped
        sync = contextlib.nullcontext()
        if mode == "train" and not self.accelerator.sync_gradients and hasattr(critic, "no_sync"):
            sync = critic.no_sync()  # accumulate locally; all-reduce on the micro-batch that steps the optimizer
        values = inputs.pop(_CRITIC_VALUES_KEY, None)
        if values is not None and (mode != "train" or self._critic_values_step != self.state.global_step
                                   or values.shape != completion_ids.shape):
            values = None  # a later step on the same rollout: the critic has moved since
        self._critic_values_step = None
        if values is None:
            with sync, self.accelerator.autocast():
                values = critic(input_ids, attention_mask, completion_length=T)
        old_values, returns = inputs["old_values"], inputs["returns"]
        vf_loss = clipped_value_loss(values, old_values, returns, self.args.cliprange_value, mask)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = policy_loss + self.args.vf_coef * vf_loss / normalizer

        with torch.no_grad():
            logps = self._last_policy_logps
            old = inputs.get("old_per_token_logps")
            old = logps if old is None else old
            log_ratio = logps - old
            ratio = torch.exp(log_ratio)
            advantages = inputs["advantages"]
            surrogate = clipped_surrogate(ratio, advantages, self.epsilon_low, self.epsilon_high)
            v_clipped = old_values + torch.clamp(values - old_values, -self.args.cliprange_value, self.args.cliprange_value)
            stats = torch.stack(
                [
                    0.5 * masked_mean(log_ratio**2, mask),  # approxkl as in old TRL PPO
                    masked_mean((surrogate < ratio * advantages).float(), mask),  # the clip binds
                    -masked_mean(surrogate, mask),
                    vf_loss.detach(),
                    masked_mean(((v_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask),
                    masked_mean(ratio, mask),
                ]
            )
            stats = self.accelerator.gather(stats.unsqueeze(0)).mean(dim=0).tolist()
        metrics = self._metrics[mode]
        for name, value in zip(
            ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
             "val/ratio"),
            stats,
        ):
            metrics[name].append(value)
        return loss


def _has_reward_model(reward_funcs: Any) -> bool:
    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    return any(isinstance(f, (str, nn.Module)) or isinstance(getattr(f, "model", None), nn.Module)
               for f in funcs if f is not None)

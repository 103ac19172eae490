"""The critic's lifecycle in PPOTrainer: where its body comes from, how it trains, how it is saved and restored.

``ValueModel`` (``value_model.py``) is the network; this module is what a trainer does with it. Each function fixes a
trap that failed *silently* in a prototype:

* the critic's parameters must join the policy's optimizer in ``create_optimizer`` (transformers 5 never calls
  ``create_optimizer_and_scheduler``) and before the scheduler is built, or the critic never trains;
* the Trainer zeroes and clips the policy's gradients only, so the critic's are zeroed and clipped here;
* checkpoints must hold the critic and resuming must restore it, or it restarts from its initial weights while the
  shared optimizer state (its moments included) is restored;
* under DDP the *wrapped* critic must be called, or its gradients are never all-reduced.

With ``value_head_on_policy`` the critic is a :class:`PolicyValueHead` on the policy's hidden states: it has no body to
build or wrap, joins the optimizer and is clipped like any critic, and is saved beside the policy. Under DDP its
gradients are averaged over the processes by :func:`average_head_gradients`; DeepSpeed and FSDP are refused.

Scaling out: DDP wraps the critic like the policy; under FSDP2 :func:`shard_critic` shards it with ``fully_shard``
(its checkpoint is gathered on every rank and written by the main one); DeepSpeed and FSDP1 are refused.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .value_model import PolicyValueHead, ValueModel, _base_transformer, share_weights_copy

VALUE_MODEL_DIR = "value_model"

__all__ = ["VALUE_MODEL_DIR", "CriticSource", "build_critic", "prepare_critic", "prepare_policy_value_head",
           "average_head_gradients", "shard_critic", "add_critic_param_groups", "clip_critic_grad_norm", "save_critic",
           "load_critic", "critic_values"]


@dataclass
class CriticSource:
    """Where the critic's body comes from, captured *before* GRPO wraps the policy in its PEFT adapter.

    Exactly one of the fields is used, in this order: ``value_model`` (a ValueModel, a model or a path),
    ``shared_body`` (``critic_shares_base``: the policy's base with shared weight tensors), ``policy_body_copy`` (a
    copy of an instantiated policy's body when no reward model can serve); else :func:`build_critic` falls back to
    the reward model's or the policy's checkpoint.
    """

    value_model: ValueModel | PreTrainedModel | str | None = None
    shared_body: nn.Module | None = None
    policy_body_copy: nn.Module | None = None

    @classmethod
    def capture(cls, model: Any, reward_funcs: Any, args: Any, peft_config: Any, value_model: Any,
                quantization_config: Any) -> tuple[Any, "CriticSource"]:
        """Returns ``(model, source)``; ``model`` is loaded here when the critic must share its base."""
        path = value_model if value_model is not None else args.value_model_name_or_path
        if args.value_head_on_policy:
            if path:
                raise ValueError("value_head_on_policy=True reads the policy's own hidden states; drop value_model.")
            return model, cls()  # nothing to capture: the head is built on the policy GRPO loads
        if args.critic_shares_base:
            if peft_config is None:
                raise ValueError("critic_shares_base=True needs a peft_config (the critic is a LoRA adapter on the "
                                 "base).")
            if path:
                raise ValueError("critic_shares_base=True builds the critic from the policy's base; drop value_model.")
            if isinstance(model, str):
                model = load_policy(model, args, quantization_config)
            # Copy the body's modules before GRPO injects the policy's adapter; the weight tensors stay shared.
            return model, cls(shared_body=share_weights_copy(_base_transformer(model)))
        if path:
            return model, cls(value_model=path)
        if not isinstance(model, str) and not has_reward_model(reward_funcs):
            return model, cls(policy_body_copy=copy.deepcopy(_base_transformer(model)))  # before PEFT changes it
        return model, cls()


def load_policy(path: str, args: Any, quantization_config: Any) -> PreTrainedModel:
    """Loads the policy as GRPOTrainer would (needed when the critic must share its base before PEFT wraps it)."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(path, **kwargs)


def has_reward_model(reward_funcs: Any) -> bool:
    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    return any(isinstance(f, (str, nn.Module)) or isinstance(getattr(f, "model", None), nn.Module)
               for f in funcs if f is not None)


def build_critic(source: CriticSource, *, peft_config: Any, policy_path: str | None, reward_models: list[tuple],
                 policy_vocab: dict, load_kwargs: dict, unwrap: Any) -> ValueModel:
    """The critic: from ``source``; else the first reward model that reads the policy's tokens (as old TRL PPO
    did); else the policy's checkpoint. ``reward_models`` holds ``(model_or_func, tokenizer)`` pairs."""
    if isinstance(source.value_model, ValueModel):
        return source.value_model
    if isinstance(source.value_model, nn.Module):
        return ValueModel.from_model(source.value_model)
    if isinstance(source.value_model, str):
        return ValueModel.from_backbone_path(source.value_model, **load_kwargs)
    if source.shared_body is not None:
        from peft import get_peft_model

        critic_cfg = copy.deepcopy(peft_config)
        critic_cfg.task_type = "FEATURE_EXTRACTION"
        critic_cfg.modules_to_save = None
        return ValueModel(get_peft_model(source.shared_body, critic_cfg))
    for func, rm_tok in reward_models:
        if not isinstance(func, PreTrainedModel):  # a reward function wrapping a model (rewards.RewardModelFunction)
            func, rm_tok = getattr(func, "model", None), getattr(func, "tokenizer", None)
        if isinstance(func, PreTrainedModel) and rm_tok is not None and rm_tok.get_vocab() == policy_vocab:
            rm_path = func.config.name_or_path
            if rm_path and os.path.isdir(rm_path):
                return ValueModel.from_backbone_path(rm_path, **load_kwargs)
            return ValueModel.from_model(unwrap(func))
    if source.policy_body_copy is not None:
        return ValueModel(source.policy_body_copy)
    if not policy_path:
        raise ValueError("Cannot build a critic: give value_model or value_model_name_or_path.")
    return ValueModel.from_backbone_path(policy_path, **load_kwargs)


def prepare_critic(critic: ValueModel, args: Any, accelerator: Any, *, deepspeed: bool = False,
                   fsdp_version: int | None = None) -> nn.Module:
    """Applies the trainer's settings to the critic and returns the module to call in training: DDP-wrapped when
    the policy is (calling the *wrapped* module is what all-reduces its gradients), sharded in place under FSDP2."""
    from trl.trainer.utils import disable_dropout_in_model

    if deepspeed:
        raise NotImplementedError(
            "PPOTrainer's critic is not supported under DeepSpeed: ZeRO-3 would have to partition the policy and the "
            "critic as one module, and the critic's parameter groups live outside DeepSpeed's engine. Use FSDP2 "
            "(an accelerate FSDP config with fsdp_version: 2) or DDP."
        )
    if fsdp_version is not None and fsdp_version != 2:
        raise NotImplementedError("PPOTrainer's critic needs FSDP2: set fsdp_version: 2 in the accelerate FSDP config.")
    if args.disable_dropout:
        disable_dropout_in_model(critic)
    if args.gradient_checkpointing and hasattr(critic.backbone, "gradient_checkpointing_enable"):
        critic.backbone.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)
        if critic.is_peft:
            critic.backbone.enable_input_require_grads()
    if fsdp_version == 2:
        return shard_critic(critic)  # over all ranks (FSDP2 without other parallelism)
    return accelerator.prepare_model(critic)


def prepare_policy_value_head(head: PolicyValueHead, accelerator: Any, *, sharded: bool,
                              max_grad_norm: float) -> PolicyValueHead:
    """Puts the head on the policy's device. Under DeepSpeed or FSDP (``sharded``) the policy's body is partitioned
    and read through the engine's own forward, which this head's hook does not cover: refused. Under DDP the head's
    gradients are averaged in the Trainer's clipping step, which runs only with ``max_grad_norm > 0``."""
    if sharded:
        raise NotImplementedError(
            "value_head_on_policy=True is supported on one process and under DDP, not under DeepSpeed or FSDP. "
            "Use critic_shares_base=True with a peft_config, or a separate critic, there."
        )
    if accelerator.num_processes > 1 and not max_grad_norm > 0:
        raise ValueError("value_head_on_policy=True on several processes averages the head's gradients in the "
                         "gradient-clipping step: set max_grad_norm > 0 (e.g. 1.0).")
    return head.to(accelerator.device)


def average_head_gradients(head: PolicyValueHead, accelerator: Any) -> None:
    """DDP averages the policy's gradients over the processes; the head lives outside the wrapped policy, so its
    gradients are averaged here, once per optimizer step (before clipping), the same way."""
    if accelerator.num_processes == 1:
        return
    for p in head.parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # every process joins the collective
        p.grad = accelerator.reduce(grad, reduction="mean")


def shard_critic(critic: ValueModel, mesh: Any = None) -> ValueModel:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): shards each transformer block of the critic's backbone (the
    entries of its ``ModuleList``s), then the whole critic, as accelerate shards the policy. In place: the critic
    itself becomes the module to call; its parameters become DTensors, so build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mesh is None else {"mesh": mesh}
    for blocks in [m for m in critic.backbone.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(critic, **kwargs)
    return critic


def is_sharded(critic: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(critic, FSDPModule)


def add_critic_param_groups(optimizer: torch.optim.Optimizer, critic: ValueModel, decay_names: set[str],
                            lr: float, weight_decay: float) -> None:
    """Adds the critic's trainable parameters (not already there) as extra groups of the policy's optimizer, so that
    one scheduler drives both learning rates."""
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad and id(p) not in present]
    for decay, params in ((weight_decay, [p for n, p in named if n in decay_names]),
                          (0.0, [p for n, p in named if n not in decay_names])):
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": decay, "lr": lr})


def clip_critic_grad_norm(critic: ValueModel, max_norm: float) -> float | None:
    """Clips the critic's gradients (the Trainer clips the policy's only); returns their norm, None without any."""
    params = [p for p in critic.parameters() if p.grad is not None]
    if not params:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


def save_critic(critic: ValueModel | PolicyValueHead, output_dir: str, is_main_process: bool = True) -> None:
    """Writes ``<output_dir>/value_model`` (a value head on the policy: ``<output_dir>/value_head.safetensors``, beside
    the policy). Call it on every process: under FSDP2 the full weights are gathered (a collective) before the main
    process writes them."""
    if isinstance(critic, PolicyValueHead):
        critic.save_pretrained(output_dir, is_main_process=is_main_process)
        return
    state = None
    if is_sharded(critic):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(critic, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main_process:
        critic.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR), state_dict=state)


def load_critic(critic: ValueModel | PolicyValueHead, checkpoint: str) -> None:
    """Restores the critic's weights in place from a checkpoint written by :func:`save_critic`."""
    if isinstance(critic, PolicyValueHead):
        critic.load_weights_from(checkpoint)
        return
    critic_dir = os.path.join(checkpoint, VALUE_MODEL_DIR)
    if not os.path.isdir(critic_dir):
        raise FileNotFoundError(f"{checkpoint} has no {VALUE_MODEL_DIR}/: not a PPOTrainer checkpoint")
    if is_sharded(critic):
        if critic.is_peft:
            raise NotImplementedError("Resuming a LoRA critic under FSDP2 is not supported yet; resume under DDP.")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(critic, ValueModel.read_full_weights(critic_dir),
                             options=StateDictOptions(full_state_dict=True))
        return
    critic.load_weights_from(critic_dir)


@torch.no_grad()
def critic_values(critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                  batch_size: int) -> torch.Tensor:
    """V(s_t) of every completion token, (B, T), in chunks of ``batch_size`` rows, without a graph."""
    chunks = [critic(input_ids[i : i + batch_size], attention_mask[i : i + batch_size],
                     completion_length=completion_length) for i in range(0, input_ids.size(0), batch_size)]
    return torch.cat(chunks, dim=0)

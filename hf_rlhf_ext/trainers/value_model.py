"""The critic of PPO: a transformer backbone with a zero-initialised scalar head that gives one value per token.

Why a separate module (and not ``AutoModelForSequenceClassification`` as in old TRL PPO): a sequence classifier
scores only the last token, while GAE needs V(s_t) for every completion token; and the head must start at exactly 0 so
that the first advantages are the plain (whitened) rewards instead of noise from a random head.

The critic can be
* a full backbone (``AutoModel``) loaded from a path — the reward model's or the policy's, as old TRL did;
* a LoRA adapter on a *frozen copy that shares its weight tensors with the policy's base* (``critic_shares_base``):
  the critic then costs only its adapter and head in memory.

``save_pretrained`` writes the backbone (or its adapter) with ``safetensors`` plus ``value_head.safetensors`` and
``value_head_config.json``; ``ValueModel.from_pretrained`` reads them back.

:class:`PolicyValueHead` is the other placement (``PPOConfig.value_head_on_policy``): no critic body at all, only a
linear head on the *policy's own* last hidden states, read by a forward hook (:func:`capture_last_hidden_states`)
during the policy's forward pass — the shared-trunk actor-critic of TRL's first PPO
(``AutoModelForCausalLMWithValueHead``). It costs one (hidden → 1) layer in memory and no extra forward pass.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head_config.json"
# A LoRA critic's adapter goes one level deeper: transformers' PEFT resume treats any `<checkpoint>/<dir>/adapter_*`
# as an extra adapter *of the policy* and would load the critic's adapter into it.
ADAPTER_SUBDIR = "adapter"


def _base_transformer(model: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` / ``*ForSequenceClassification`` (its ``base_model``)."""
    base = getattr(model, "base_model", model)
    return base if base is not None else model


def _hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(text_config, name, None):
            return int(getattr(text_config, name))
    raise ValueError(f"Cannot find the hidden size of {type(backbone).__name__} in its config.")


def share_weights_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose modules are new objects but whose parameters and buffers are the *same* tensors.

    Adapters injected into the copy (e.g. by ``peft.get_peft_model``) do not touch the original, while the (frozen)
    base weights are stored once. Used for a critic that shares the policy's base model.
    """
    memo: dict[int, Any] = {id(p): p for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


class ValueModel(nn.Module):
    """Backbone + linear value head; ``forward`` returns one value per position, shape (B, L) (float32).

    Args:
        backbone: a transformer body returning ``last_hidden_state`` (an ``AutoModel``, or a ``peft.PeftModel`` around
            one).
        head_dtype: dtype of the head (float32 by default, whatever the backbone's dtype: values are regression
            targets and bf16 rounding would show in the value loss).
    """

    def __init__(self, backbone: nn.Module, head_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(_hidden_size(backbone), 1, dtype=head_dtype)
        # Zero init: V ≡ 0 at the start, so the first GAE advantages are the (discounted) rewards themselves.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_backbone_path(cls, path: str, **model_kwargs: Any) -> "ValueModel":
        """A fresh critic (zero head) on the body of any checkpoint at ``path`` (causal LM, reward model, plain)."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, **model_kwargs))

    @classmethod
    def from_model(cls, model: nn.Module, share_weights: bool = False) -> "ValueModel":
        """A fresh critic on the body of an instantiated model (deep copy; or weight-sharing copy, see
        :func:`share_weights_copy`)."""
        body = _base_transformer(model)
        return cls(share_weights_copy(body) if share_weights else copy.deepcopy(body))

    @property
    def config(self):
        return self.backbone.config

    @property
    def is_peft(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_length: int | None = None,
    ) -> torch.Tensor:
        """Values per position, (B, L); with ``completion_length = T`` only V(s_t) for the T completion tokens,
        (B, T): the value at the position that *predicts* completion token t (the state before emitting it)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        if completion_length is not None:
            hidden = hidden[:, -completion_length - 1 : -1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # -- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, is_main_process: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Writes the backbone (full weights, or only the adapter for a LoRA critic) and the head, as safetensors.
        ``state_dict``: this module's full weights when its own are sharded (FSDP2), keys as in ``state_dict()``."""
        from safetensors.torch import save_file

        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        backbone_dir = os.path.join(save_directory, ADAPTER_SUBDIR) if self.is_peft else save_directory
        head_state = self.value_head.state_dict()
        backbone_kwargs = {}
        if state_dict is not None:
            head_state = {k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")}
            backbone_kwargs["state_dict"] = {k[len("backbone."):]: v for k, v in state_dict.items()
                                             if k.startswith("backbone.")}
        self.backbone.save_pretrained(backbone_dir, safe_serialization=True, **backbone_kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
        save_file(state, os.path.join(save_directory, HEAD_WEIGHTS))
        meta = {
            "hidden_size": self.value_head.in_features,
            "head_dtype": str(self.value_head.weight.dtype).replace("torch.", ""),
            "backbone_class": type(self.backbone).__name__,
            "peft": self.is_peft,
        }
        with open(os.path.join(save_directory, HEAD_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, base_model_name_or_path: str | None = None,
                        **model_kwargs: Any) -> "ValueModel":
        """Loads a critic written by :meth:`save_pretrained`. A LoRA critic needs its base model, read from the
        adapter's ``base_model_name_or_path`` unless given."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        if not os.path.isfile(os.path.join(path, HEAD_WEIGHTS)):
            raise FileNotFoundError(f"{path} holds no {HEAD_WEIGHTS}: not a directory written by "
                                    "ValueModel.save_pretrained")
        with open(os.path.join(path, HEAD_CONFIG)) as f:
            meta = json.load(f)
        if meta.get("peft"):
            from peft import PeftConfig, PeftModel

            adapter_dir = os.path.join(path, ADAPTER_SUBDIR)
            base_path = base_model_name_or_path or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
            if not base_path:
                raise ValueError(f"The LoRA critic in {path} does not name its base model; pass "
                                 "base_model_name_or_path.")
            backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path, **model_kwargs), adapter_dir)
        else:
            backbone = AutoModel.from_pretrained(path, **model_kwargs)
        model = cls(backbone, head_dtype=getattr(torch, meta.get("head_dtype", "float32")))
        model.value_head.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS)))
        return model

    def load_weights_from(self, path: str) -> None:
        """Loads saved weights *in place* (parameters keep their identity, so an optimizer that holds them stays
        valid): used to resume a run from a checkpoint."""
        from safetensors.torch import load_file

        head = load_file(os.path.join(path, HEAD_WEIGHTS))
        if self.is_peft:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            weights = load_peft_weights(os.path.join(path, ADAPTER_SUBDIR), device="cpu")
            result = set_peft_model_state_dict(self.backbone, weights)
            bad = [k for k in result.unexpected_keys if "lora" in k]
            if bad:
                raise RuntimeError(f"LoRA critic checkpoint {path} does not match the critic: unexpected {bad[:5]}")
        else:
            missing, unexpected = self.backbone.load_state_dict(_backbone_weights(path), strict=False)
            tied = set(getattr(self.backbone, "all_tied_weights_keys", None) or ())  # transformers' tied copies
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise RuntimeError(
                    f"Critic checkpoint {path} does not match the critic: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        with torch.no_grad():
            for k, v in head.items():
                self.value_head.state_dict()[k].copy_(v)

    @staticmethod
    def read_full_weights(path: str) -> dict[str, torch.Tensor]:
        """The weights of a full (not LoRA) critic saved in ``path``, keyed as this module's ``state_dict()``."""
        from safetensors.torch import load_file

        state = {f"backbone.{k}": v for k, v in _backbone_weights(path).items()}
        state.update({f"value_head.{k}": v for k, v in load_file(os.path.join(path, HEAD_WEIGHTS)).items()})
        return state


def _backbone_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") and name != HEAD_WEIGHTS:
            state.update(load_file(os.path.join(path, name)))
    return state


class PolicyValueHead(nn.Module):
    """A zero-initialised linear value head on the policy's own last hidden states (``value_head_on_policy``).

    ``forward(hidden, completion_length=T)`` maps the policy's last hidden states (B, L, H) — the backbone's
    ``last_hidden_state``, equal to ``policy(..., output_hidden_states=True).hidden_states[-1]`` — to V(s_t) for the T
    completion tokens, (B, T) float32, at the same positions as :meth:`ValueModel.forward`. Saved beside the policy
    as ``value_head.safetensors`` + ``value_head_config.json`` (``"on_policy": true``)."""

    def __init__(self, hidden_size: int, head_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.value_head = nn.Linear(hidden_size, 1, dtype=head_dtype)
        nn.init.zeros_(self.value_head.weight)  # V ≡ 0 at the start, as ValueModel
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def for_policy(cls, policy: nn.Module) -> "PolicyValueHead":
        return cls(_hidden_size(policy_backbone(policy)))

    def forward(self, hidden: torch.Tensor, completion_length: int | None = None) -> torch.Tensor:
        if completion_length is not None:
            hidden = hidden[:, -completion_length - 1 : -1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(state, os.path.join(save_directory, HEAD_WEIGHTS))
        meta = {"hidden_size": self.value_head.in_features, "on_policy": True,
                "head_dtype": str(self.value_head.weight.dtype).replace("torch.", "")}
        with open(os.path.join(save_directory, HEAD_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "PolicyValueHead":
        """Reads a head written by :meth:`save_pretrained` (in a PPO output directory, beside the policy)."""
        with open(_head_file(path, HEAD_CONFIG)) as f:
            meta = json.load(f)
        if not meta.get("on_policy"):
            raise ValueError(f"{path} holds a ValueModel's head (a critic with its own body): use "
                             "ValueModel.from_pretrained")
        head = cls(int(meta["hidden_size"]), head_dtype=getattr(torch, meta.get("head_dtype", "float32")))
        head.load_weights_from(path)
        return head

    def load_weights_from(self, path: str) -> None:
        """In place (the optimizer keeps holding the same parameters): used to resume from a checkpoint."""
        from safetensors.torch import load_file

        weights = load_file(_head_file(path, HEAD_WEIGHTS))
        with torch.no_grad():
            for k, v in self.value_head.state_dict().items():
                v.copy_(weights[k])


def _head_file(path: str, name: str) -> str:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} holds no {name}: not written by a PPOTrainer with value_head_on_policy=True")
    return file


def policy_backbone(policy: nn.Module) -> nn.Module:
    """The transformer body of a (possibly PEFT-wrapped) causal LM: the module whose output is the last hidden
    states that the LM head reads."""
    if hasattr(policy, "get_base_model"):  # peft.PeftModel: its base_model is the LoRA tuner, not the body
        policy = policy.get_base_model()
    return _base_transformer(policy)


class capture_last_hidden_states:  # noqa: N801 (a context manager, used like a function)
    """Within the block, every forward of ``backbone`` appends ``read(last hidden states)`` (with its graph) to
    ``sink``; ``sink=None`` captures nothing. A forward hook, so the policy's own forward pass — GRPO's fused LM head
    or the plain one, chunked or not — provides the hidden states without a second pass or ``output_hidden_states``,
    and only what ``read`` returns (the values) outlives the pass."""

    def __init__(self, backbone: nn.Module, sink: list[torch.Tensor] | None, read: Any = None):
        self.backbone, self.sink, self.read, self.handle = backbone, sink, read or (lambda hidden: hidden), None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self.sink.append(self.read(hidden if hidden is not None else output[0]))

    def __enter__(self) -> list[torch.Tensor] | None:
        if self.sink is not None:
            self.handle = self.backbone.register_forward_hook(self._hook)
        return self.sink

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()

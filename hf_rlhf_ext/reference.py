"""The reference policy π_ref of a trainer, found one way for every caller (callbacks, recipes, best-of-N).

In order of preference: (1) a PEFT policy → the same model with its adapters disabled (or TRL's "ref" adapter when one
is loaded), no extra memory; (2) the trainer's own ``ref_model`` (TRL loads one when β > 0); (3) a frozen copy of the
policy taken at train begin, only when the caller allows it, since it doubles the policy's memory (at β = 0 with full
fine-tuning there is no other).

Callers that hold no trainer name their reference directly: a module, or ``"disable_adapter"`` for the PEFT policy
itself; :func:`reference_model` turns any of these into the module that computes log π_ref.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Union

from torch import nn

__all__ = ["DISABLE_ADAPTER", "ReferencePolicy", "Reference", "reference_kind", "reference_model", "resolve_reference"]

DISABLE_ADAPTER = "disable_adapter"  # π_ref is the PEFT policy with its adapters disabled


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def reference_kind(trainer: Any, allow_copy: bool) -> str | None:
    """``"peft_adapter_disabled"``, ``"trainer_ref_model"``, ``"frozen_copy"`` (only with ``allow_copy``), or None
    when the trainer has no reference without a copy and a copy is not allowed."""
    if _is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        return "peft_adapter_disabled"
    if getattr(trainer, "ref_model", None) is not None:
        return "trainer_ref_model"
    return "frozen_copy" if allow_copy else None


def _check_copyable(trainer: Any, who: str) -> None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise ValueError(
            f"{who}: a frozen copy of a ZeRO-3-partitioned policy cannot be made; train with LoRA (the "
            "reference is then the adapter disabled) or with beta > 0 (TRL's reference model is reused)."
        )


class ReferencePolicy:
    """π_ref of ``trainer`` (see the module docstring for the order of preference); ``kind`` says which one.

    Raises ``ValueError`` naming the fixes when the trainer has none and ``allow_copy`` is False.
    """

    def __init__(self, trainer: Any, allow_copy: bool, who: str) -> None:
        self.trainer = trainer
        kind = reference_kind(trainer, allow_copy)
        if kind is None:
            raise ValueError(
                f"{who} needs a reference policy, and this trainer has none: the policy is not a PEFT model (whose "
                "reference would be the adapter disabled) and the trainer has no ref_model (TRL creates one only when "
                "beta > 0). Pass allow_reference_copy=True to keep a frozen copy of the initial policy, made at train "
                "begin (it costs one more copy of the model's weights in memory), or train with LoRA (--use_peft)."
            )
        if kind == "frozen_copy":
            _check_copyable(trainer, who)
        self.kind = kind
        self._copy: nn.Module | None = None

    def snapshot(self) -> None:
        """Takes the frozen copy (kind "frozen_copy" only); called at train begin, before the first update."""
        if self.kind != "frozen_copy" or self._copy is not None:
            return
        ref = copy.deepcopy(self.trainer.accelerator.unwrap_model(self.trainer.model))
        if "forward" in vars(ref):
            # TRL (and accelerate's mixed precision) replace ``model.forward`` on the instance by a wrapper closing over
            # the original *bound* forward; a deep copy keeps that closure, so the "frozen" copy would run the live
            # policy's weights and measure KL ≈ 0. Dropping the instance attribute restores the class's forward.
            del ref.forward
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self._copy = ref

    @contextlib.contextmanager
    def model(self, policy: nn.Module) -> Iterator[nn.Module]:
        """Yields the module that computes π_ref log-probs; ``policy`` is the unwrapped policy used for sampling."""
        if self.kind == "peft_adapter_disabled":
            with _adapters_off(policy):
                yield policy
        elif self.kind == "trainer_ref_model":
            yield self.trainer.ref_model
        else:
            if self._copy is None:
                self.snapshot()
            yield self._copy


Reference = Union[ReferencePolicy, nn.Module, str]


def resolve_reference(trainer: Any, allow_copy: bool = False, who: str = "") -> ReferencePolicy | None:
    """The trainer's π_ref, or None when it has none (no PEFT policy, no ``ref_model``, no copy allowed)."""
    if reference_kind(trainer, allow_copy) is None:
        return None
    return ReferencePolicy(trainer, allow_copy=allow_copy, who=who or type(trainer).__name__)


@contextlib.contextmanager
def _adapters_off(policy: nn.Module) -> Iterator[None]:
    """The PEFT policy as π_ref: TRL's "ref" adapter when one is loaded, else every adapter disabled."""
    from trl.trainer.utils import use_adapter

    adapter = "ref" if "ref" in getattr(policy, "peft_config", {}) else None
    with use_adapter(policy, adapter_name=adapter):
        yield


@contextlib.contextmanager
def reference_model(policy: nn.Module, reference: Reference) -> Iterator[nn.Module]:
    """The module that computes log π_ref for samples of ``policy``: ``reference`` is a :class:`ReferencePolicy`,
    ``"disable_adapter"`` (the PEFT ``policy`` with its adapters disabled) or a module."""
    if isinstance(reference, ReferencePolicy):
        with reference.model(policy) as module:
            yield module
    elif isinstance(reference, str):
        if reference != DISABLE_ADAPTER:
            raise ValueError(f"reference={reference!r}: give a model, or {DISABLE_ADAPTER!r} for a PEFT policy.")
        if not hasattr(policy, "disable_adapter"):
            raise ValueError(f"reference={DISABLE_ADAPTER!r} needs a PEFT policy; got {type(policy).__name__}.")
        with _adapters_off(policy):
            yield policy
    else:
        yield reference

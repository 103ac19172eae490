"""Drop-in ``TrainerCallback``s for TRL's ``GRPOTrainer`` and ``RLOOTrainer`` (and their subclasses): see reward
hacking coming, know the KL even when β = 0, and trust the group advantages.

    from hf_rlhf_ext.callbacks import OveroptimizationCallback, KLToReferenceCallback, GroupAdvantageCheckCallback
    trainer.add_callback(KLToReferenceCallback(trainer, eval_prompts, every_n_steps=10))

Names are resolved lazily so that importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> sub-module that defines it
_EXPORTS: dict[str, str] = {
    "OveroptimizationCallback": "overoptimization",
    "OveroptimizationFindings": "overoptimization",
    "KLToReferenceCallback": "kl_reference",
    "measure_sequence_kl": "kl_reference",
    "GroupAdvantageCheckCallback": "group_advantage",
    "GroupAdvantageViolation": "group_advantage",
    "expected_advantages": "group_advantage",
    "GradientVarianceCallback": "grad_variance",
    "GradVarianceMeasurement": "grad_variance",
    "measure_gradient_variance": "grad_variance",
    "UnsupportedTrainerError": "_trainer_access",
    "HeldOutSampler": "_trainer_access",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)

"""Drop-in ``TrainerCallback``s for TRL's ``GRPOTrainer`` and ``RLOOTrainer`` (and their subclasses): see reward
hacking coming, know the KL even when β = 0, and trust the group advantages.

    from hf_rlhf_ext.callbacks import OveroptimizationCallback, KLToReferenceCallback, GroupAdvantageCheckCallback
    trainer.add_callback(KLToReferenceCallback(trainer, eval_prompts, every_n_steps=10))

Names are resolved lazily so that importing this package stays cheap.
"""

from __future__ import annotations

from .._lazy import lazy_exports

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
    "AdaptiveKLCallback": "adaptive_kl",
    "GradVarianceMeasurement": "grad_variance",
    "measure_gradient_variance": "grad_variance",
    "UnsupportedTrainerError": "_trainer_access",
    "HeldOutSampler": "_trainer_access",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)

"""Trainers and training-time controllers built on TRL (PPO with a critic, KL control, ...).

Names are resolved lazily so that importing this package does not import transformers/trl until a name is used.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> sub-module that defines it
_EXPORTS: dict[str, str] = {
    "FixedKLController": "kl_control",
    "AdaptiveKLController": "kl_control",
}

# PPO with a critic
_EXPORTS.update({"PPOConfig": "ppo_config", "PPOTrainer": "ppo", "ValueModel": "value_model", "Rollout": "rollout"})

# REINFORCE with and without a baseline
_EXPORTS.update({"ReinforceConfig": "reinforce", "ReinforceTrainer": "reinforce", "RunningMeanBaseline": "reinforce"})


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)

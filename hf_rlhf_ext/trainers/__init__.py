"""Trainers and training-time controllers built on TRL (PPO with a critic, KL control, ...).

Names are resolved lazily so that importing this package does not import transformers/trl until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> sub-module that defines it
_EXPORTS: dict[str, str] = {
    "FixedKLController": "kl_control",
    "AdaptiveKLController": "kl_control",
    "AdaptiveKLCallback": "kl_control",
}

# PPO with a critic
_EXPORTS.update({"PPOConfig": "ppo", "PPOTrainer": "ppo", "ValueModel": "value_model"})

# REINFORCE with and without a baseline
_EXPORTS.update({"ReinforceConfig": "reinforce", "ReinforceTrainer": "reinforce", "RunningMeanBaseline": "reinforce"})


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)

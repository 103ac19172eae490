"""Old TRL PPO scripts (trl ≤ 1.12) on current TRL: change only the import line.

    from hf_rlhf_ext.compat import PPOConfig, PPOTrainer   # was: from trl.experimental.ppo import ...

``PPOConfig`` takes the old fields, ``PPOTrainer`` the old constructor and methods; both sit on
``hf_rlhf_ext.trainers.PPOTrainer``. ``OLD_FIELDS`` is the table of what every old field becomes (docs/migration.md).
Names are resolved lazily, so importing the package does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "PPOConfig": "config",
    "PPOTrainer": "trainer",
    "OLD_FIELDS": "fields",
    "OldField": "fields",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)

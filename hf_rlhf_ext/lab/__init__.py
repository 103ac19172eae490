"""The offline lab world: a synthetic customer-support task with a programmatic gold reward, a tiny SFT policy and a
proxy reward model trained on noisy gold-labelled pairs — small enough for CPU tests, rich enough for reward
over-optimisation to emerge for real.

    from hf_rlhf_ext.lab import LabConfig, build_lab, gold_reward
    lab = build_lab()   # the shipped lab, copied to the cache on first use (build_lab(force=True) retrains)
    policy, rm = lab.load_policy(), lab.load_reward_model()

``gold_reward`` is importable without torch (``hf_rlhf_ext.lab.task``).
"""

from __future__ import annotations

from .build import Lab, build_lab, default_lab_dir, lab_home, open_lab
from .config import LabConfig
from .task import GOLD_MAX, GOLD_MIN, gold_range, gold_reward
from .testbed_settings import LAB_DIR_ENV

__all__ = [
    "GOLD_MAX", "GOLD_MIN", "LAB_DIR_ENV", "Lab", "LabConfig", "build_lab", "default_lab_dir", "gold_range",
    "gold_reward",
    "lab_home", "open_lab",
]  # fmt: skip

"""A testbed's settings as the recipes' parser reads them, before any model or data set is loaded: where a lab
directory is named (``$HF_RLHF_EXT_LAB_DIR``), the file a testbed's settings are written to, and the recipe defaults
they give (``recipe_defaults``). Nothing here imports more than the standard library, so the parser stays light."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["DEFAULT_RM_LR", "LAB_DIR_ENV", "TESTBED_FILE", "recipe_defaults", "saved_settings"]

#: The lab directory every recipe, reward function and ``lab build`` use when none is given.
LAB_DIR_ENV = "HF_RLHF_EXT_LAB_DIR"
#: Present in a testbed (``lab/testbed.py``: a lab directory built around a model and a gold judge of one's own).
TESTBED_FILE = "testbed.json"
#: The proxy's learning rate by kind when none is given: from scratch (as the lab's RM), a pretrained body, LoRA.
DEFAULT_RM_LR = {"scratch": 1e-3, "full": 2e-5, "lora": 2e-4}


def saved_settings(root: str | None) -> dict[str, Any] | None:
    """Every setting of the testbed in ``root`` (its ``testbed.json``), or None when ``root`` holds no testbed."""
    path = os.path.join(root, TESTBED_FILE) if root else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["config"]


def rm_kind(settings: dict[str, Any]) -> str:
    """How the proxy was made: ``scratch`` (a small GPT-2), ``full`` (a pretrained body) or ``lora``."""
    if not settings.get("reward_model_base"):
        return "scratch"
    return "lora" if settings.get("reward_model_lora_r") else "full"


def recipe_defaults(root: str, trains_reward_model: bool) -> dict[str, Any] | None:
    """A recipe's defaults on the testbed in ``root`` (None: no testbed there): the build settings that mean the same
    to the recipe, nothing else (the lab's YAML settings were sized for the lab's tiny policy). A policy recipe
    samples as the pairs were sampled (the proxy saw replies of that length and temperature); the reward recipe
    trains on the proxy's schedule. Keys the recipe's parser lacks are dropped by the caller."""
    settings = saved_settings(root)
    if settings is None:
        return None
    if trains_reward_model:
        return {"num_train_epochs": settings["rm_epochs"], "per_device_train_batch_size": settings["rm_batch_size"],
                "learning_rate": settings["rm_lr"] or DEFAULT_RM_LR[rm_kind(settings)], "lr_scheduler_type": "cosine",
                "center_rewards_coefficient": settings["rm_center_coef"], "seed": settings["seed"],
                "disable_dropout": not settings.get("rm_dropout"),  # older testbeds: no dropout
                "gold_margin": settings["gold_margin"]}
    return {"max_completion_length": settings["max_new_tokens"], "max_new_tokens": settings["max_new_tokens"],
            "temperature": settings["temperature"]}

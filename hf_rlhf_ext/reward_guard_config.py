"""The ``nan_rewards`` setting of our trainer configs: what a NaN/inf reward does to a run (``reward_guard`` acts on
it). Apart from the guard, so that a trainer config needs only this and validation, not the guard and the reward
adapters it wraps."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .validation import ConfigValidationError

NAN_REWARDS_MODES = ("error", "drop")

__all__ = ["NAN_REWARDS_MODES", "NanRewardsArguments", "GuardedGRPOConfig", "check_nan_rewards_mode"]


@dataclass
class NanRewardsArguments:
    """The ``nan_rewards`` setting, mixed into our trainer configs (and usable with any ``GRPOConfig`` subclass)."""

    nan_rewards: str = field(
        default="error",
        metadata={
            "help": "A NaN/inf reward: 'error' stops the run (the inputs saved under <output_dir>/reward_faults); "
            "'drop' leaves the sample out of learning and counts it (reward_guard/dropped).",
            "choices": list(NAN_REWARDS_MODES),
        },
    )

    def __post_init__(self) -> None:
        check_nan_rewards_mode(self.nan_rewards)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class GuardedGRPOConfig(NanRewardsArguments, GRPOConfig):
    """``trl.GRPOConfig`` plus ``nan_rewards``, for a vanilla ``GRPOTrainer`` script (``--nan_rewards drop``) whose
    trainer gets :func:`attach_reward_guard`."""


def check_nan_rewards_mode(mode: str) -> None:
    if mode not in NAN_REWARDS_MODES:
        raise ConfigValidationError(f"nan_rewards must be one of {list(NAN_REWARDS_MODES)}, got {mode!r}.")

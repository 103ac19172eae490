"""KL coefficient controllers (fixed and adaptive); ``callbacks.adaptive_kl`` drives TRL's ``beta`` with them.

RLHF keeps the policy near its reference with a KL penalty β·KL(π ‖ π_ref). A fixed β needs retuning for every task;
Ziegler et al. 2019 (arXiv 1909.08593, §2.2) instead adapt β to hold the observed KL near a target:

    e_t     = clip((KL_t − KL_target) / KL_target, −0.2, 0.2)      proportional error, clipped
    β_{t+1} = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon      n_steps = episodes since the last update

KL above target → e > 0 → β grows (pull harder towards the reference); below target → β shrinks. The clip bounds
the change per update; the horizon (10,000 episodes in the paper) sets how fast β can move. The defaults
(β₀ = 0.2, target 6.0, horizon 10,000) are those of TRL's old PPO, where the KL was a *per-sequence* sum.

TRL 1.x has no adaptive controller (huggingface/trl #4532). ``AdaptiveKLCallback`` adds one to an unmodified
``GRPOTrainer`` / ``RLOOTrainer`` by reading the logged KL and deriving ``trainer.beta`` from the controller. A known
way to get this
wrong (trlx PR #361): feeding the controller a different KL than the one the target refers to, which made runs
diverge exactly when the KL crossed the target. The callback therefore records every input it feeds the controller
(``AdaptiveKLCallback.updates``) and the tests assert on it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..persisted_state import TRAINER_STATE_NAME, StateHolderCallback

logger = logging.getLogger(__name__)

__all__ = [
    "FixedKLController", "AdaptiveKLController", "KLController", "KLControllerState", "KL_STATE_FILE",
]

#: the file of a checkpoint directory that holds the controller state (transformers' TrainerState, as a stateful
#: callback)
KL_STATE_FILE = TRAINER_STATE_NAME

# Ziegler et al. 2019: the proportional error is clipped to ±0.2
_ERROR_CLIP = 0.2


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class FixedKLController:
    """A constant KL coefficient; the same interface as :class:`AdaptiveKLController` so trainers need not care."""

    def __init__(self, kl_coef: float) -> None:
        kl_coef = _check_finite("kl_coef", kl_coef)
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value: float = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Ignores its inputs (a fixed β does not react to the KL) and returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != "fixed":
            raise ValueError(f"not a FixedKLController state: {state!r}")
        self.__init__(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (see the module docstring for the update rule).

    Args:
        init_kl_coef: β₀ (≥ 0).
        target: the KL to hold (> 0), in the units of the KL you feed :meth:`update` — per sequence in Ziegler et al.
            and old TRL PPO (default 6.0 nats), per token if you feed TRL's logged ``kl``.
        horizon: episodes over which β can change by at most the clip (> 0); 10,000 in the paper.
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000) -> None:
        init_kl_coef = _check_finite("init_kl_coef", init_kl_coef)
        target = _check_finite("target", target)
        horizon = _check_finite("horizon", horizon)
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0 (the error is relative to it), got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.init_kl_coef = init_kl_coef
        self.target = target
        self.horizon = horizon
        self.value: float = init_kl_coef
        self.num_updates = 0
        self.last_kl: float | None = None  # the KL fed at the last update, kept for logging and checkpoint checks
        self.last_error: float | None = None

    def update(self, current_kl: float, n_steps: int) -> float:
        """One controller step from the KL observed over the last ``n_steps`` episodes; returns the new β."""
        current_kl = _check_finite("current_kl", current_kl)
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        # e = clip((KL − target) / target, −0.2, 0.2)
        error = min(max((current_kl - self.target) / self.target, -_ERROR_CLIP), _ERROR_CLIP)
        # β ← β · (1 + e · n_steps / horizon)
        multiplier = 1.0 + error * n_steps / self.horizon
        if multiplier <= 0:
            raise ValueError(
                f"n_steps / horizon = {n_steps / self.horizon:.3g} is so large that the update would make the KL "
                "coefficient non-positive; use a horizon much longer than the episodes between two updates"
            )
        self.value *= multiplier
        self.num_updates += 1
        self.last_kl = current_kl
        self.last_error = error
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": "adaptive",
            "value": self.value,
            "init_kl_coef": self.init_kl_coef,
            "target": self.target,
            "horizon": self.horizon,
            "num_updates": self.num_updates,
            "last_kl": self.last_kl,
            "last_error": self.last_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != "adaptive":
            raise ValueError(f"not an AdaptiveKLController state: {state!r}")
        self.__init__(state["init_kl_coef"], state["target"], state["horizon"])  # re-validates
        value = _check_finite("value", state["value"])
        if value < 0:
            raise ValueError(f"state value must be >= 0, got {value}")
        self.value = value
        self.num_updates = int(state.get("num_updates", 0))
        self.last_kl = state.get("last_kl")
        self.last_error = state.get("last_error")

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:.6g}, target={self.target}, horizon={self.horizon})"


KLController = FixedKLController | AdaptiveKLController


class KLControllerState(StateHolderCallback):
    """Carries a trainer's own KL controller (e.g. ``PPOTrainer.kl_ctl``) in its checkpoints (``trainer_state.json``)
    and restores it on resume."""

"""``--monitor``: our callbacks (``hf_rlhf_ext.callbacks``) attached to a recipe's trainer from the command line or
its YAML file; under ``auto`` the cheap ones that apply."""

from __future__ import annotations

import logging
from typing import Any

from ..validation import InputError
from .spec import RLScriptArguments, RLSetup, parse_monitors

logger = logging.getLogger(__name__)


def _uses_trl_group_advantages(trainer: Any) -> bool:
    """GRPO/RLOO computing TRL's own group advantages (PPO and REINFORCE compute theirs: nothing to check)."""
    from trl import GRPOTrainer, RLOOTrainer

    return any(type(trainer)._generate_and_score_completions is base._generate_and_score_completions
               for base in (GRPOTrainer, RLOOTrainer))


def _monitor(name: str, trainer: Any, setup: RLSetup, script_args: RLScriptArguments) -> Any:
    """One callback, built with the recipe's settings; raises ValueError when it does not apply to this run."""
    from ..callbacks.grad_variance import GradientVarianceCallback
    from ..callbacks.group_advantage import GroupAdvantageCheckCallback
    from ..callbacks.kl_reference import KLToReferenceCallback
    from ..callbacks.overoptimization import OveroptimizationCallback

    every = script_args.monitor_every_n_steps
    if name == "overoptimization":
        return OveroptimizationCallback(
            trainer, mode="logs", every_n_steps=every, save_peak=script_args.monitor_save_peak,
            min_delta=script_args.monitor_min_delta,
            stop_on_overoptimization=script_args.monitor_stop_on_overoptimization,
            forecast=script_args.monitor_forecast, stop_at_forecast=script_args.monitor_stop_at_forecast,
        )
    if name == "kl":
        if not setup.eval_prompts:
            raise ValueError("the KL monitor samples held-out prompts, and this run has none (num_eval_prompts 0)")
        return KLToReferenceCallback(trainer, setup.eval_prompts, every_n_steps=every,
                                     num_samples=script_args.monitor_num_samples)
    if name == "advantages":
        if not _uses_trl_group_advantages(trainer):
            raise ValueError(f"{type(trainer).__name__} does not compute TRL's group advantages")
        return GroupAdvantageCheckCallback(trainer, every_n_steps=every)
    return GradientVarianceCallback(trainer, every_n_steps=every)


# what --monitor auto attaches where it applies: each costs little next to a training step (see the README)
AUTO_MONITORS = ("overoptimization", "kl", "advantages")


def add_monitors(trainer: Any, setup: RLSetup, script_args: RLScriptArguments) -> dict[str, Any]:
    """Attaches the ``--monitor`` callbacks to ``trainer`` and returns them by name. A named monitor that does not
    apply to the run is an error; under "auto" it is left out (with an info line saying why)."""
    requested = parse_monitors(script_args.monitor)
    attached: dict[str, Any] = {}
    for name in AUTO_MONITORS if requested is None else requested:
        try:
            attached[name] = _monitor(name, trainer, setup, script_args)
        except (ValueError, TypeError) as err:  # TypeError: a trainer the callback cannot read
            if requested is not None:
                raise InputError(f"--monitor {name}: {err}") from err
            logger.info("--monitor auto: %s left out (%s).", name, err)
            continue
        # ahead of the trackers' callbacks: what a monitor adds to a step's logs reaches them at that step
        trainer.callback_handler.callbacks.insert(len(attached) - 1, attached[name])
    return attached


def monitor_results(monitors: dict[str, Any]) -> dict[str, Any]:
    """What the monitors concluded, for ``metrics.json``."""
    out: dict[str, Any] = {}
    if "overoptimization" in monitors:
        out["overoptimization"] = monitors["overoptimization"].findings().to_dict()
    if "kl" in monitors:
        out["kl"] = monitors["kl"].history
    if "advantages" in monitors:
        cb = monitors["advantages"]
        out["advantages"] = {"checked_batches": len(cb.history), "violations": cb.violations}
    if "grad_variance" in monitors:
        out["grad_variance"] = monitors["grad_variance"].summary()
    return out

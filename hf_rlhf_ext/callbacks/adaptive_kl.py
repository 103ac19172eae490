"""``AdaptiveKLCallback``: drives a TRL trainer's ``beta`` with a KL controller (``trainers.kl_control``), from the KL
the trainer logs.

TRL 1.x has no adaptive controller (huggingface/trl #4532); this callback adds one to an unmodified ``GRPOTrainer`` /
``RLOOTrainer``. A known way to get this wrong (trlx PR #361): feeding the controller a different KL than the one the
target refers to, which made runs diverge exactly when the KL crossed the target. The callback therefore records every
input it feeds the controller (:attr:`AdaptiveKLCallback.updates`) and the tests assert on it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..persisted_state import PersistedState, read_checkpoint_state
from ..trainers.kl_control import AdaptiveKLController, FixedKLController, KLController

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveKLCallback", "load_kl_state"]


def load_kl_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """The :class:`AdaptiveKLCallback` state saved in a checkpoint directory (``None`` when there is none)."""
    return read_checkpoint_state(checkpoint_dir, AdaptiveKLCallback.__name__)


def _owns_kl_controller(trainer: Any) -> bool:
    """Whether the trainer has its own KL controller in ``kl_ctl`` (our PPO: β·KL is part of the per-token reward,
    not the loss), told by what it holds rather than by its class, so that this module needs no trainer."""
    return isinstance(getattr(trainer, "kl_ctl", None), (FixedKLController, AdaptiveKLController))


class AdaptiveKLCallback(TrainerCallback, PersistedState):
    """Drives a TRL trainer's ``beta`` with a KL controller, from the KL the trainer logs.

    Usage::

        trainer = GRPOTrainer(..., args=GRPOConfig(beta=0.04, ...))      # beta > 0: TRL builds the reference
        AdaptiveKLCallback.attach(trainer, AdaptiveKLController(0.04, target=0.05, horizon=10_000))
        # (or trainer.add_callback(AdaptiveKLCallback(trainer, controller)): then callbacks registered earlier,
        #  e.g. ResultsCallback, see the logs before kl_coef is added; state.log_history is completed either way)

    Which KL: at each ``on_log`` the controller receives ``logs[kl_key]``. For ``GRPOTrainer`` ``kl`` is the
    token-mean of the k3 estimator eˣ − 1 − x (x = log π_ref − log π) over the completion tokens of the micro-batches
    since the last log, averaged over them; for ``RLOOTrainer`` it is the token-mean of k1 = log π − log π_ref. Both
    are *per token*, so choose ``target`` per token (Ziegler's 6 nats is a per-sequence KL), or pass
    ``sequence_level=True`` to feed ``kl × completions/mean_length`` (total KL / number of completions, i.e. the mean
    per-sequence KL, up to the two being averaged over slightly different micro-batches). TRL logs ``kl`` only when
    ``beta != 0``: with β = 0 there is no reference model and nothing to control, so training refuses to start.

    ``n_steps`` (episodes since the last update) = optimizer steps since the last update × completions per optimizer
    step, where completions per step = ``per_device_train_batch_size × gradient_accumulation_steps × world_size /
    num_iterations`` (each generated completion counted once even when it is trained on ``num_iterations`` times);
    override with ``samples_per_step``.

    The controller is the only source of β: ``trainer.beta`` is written in one place (:meth:`_set_beta`), at the
    start of training and after each update. Our ``PPOTrainer`` has its own controller (β·KL in the per-token reward,
    ``PPOConfig(kl_coef, kl_target, kl_horizon)``) and is refused.
    Logs gain ``kl_coef`` (the β in effect while the logged KL was measured), ``kl_coef_next`` (the β from now on),
    ``kl_target`` (adaptive controller only) and ``kl_controller_input`` (the exact value fed to the controller).
    The controller state is saved in each checkpoint's ``trainer_state.json`` (a stateful callback) and restored
    when training resumes from it.
    """

    def __init__(
        self,
        trainer: Any,
        controller: KLController,
        kl_key: str = "kl",
        *,
        sequence_level: bool = False,
        length_key: str = "completions/mean_length",
        samples_per_step: float | None = None,
    ) -> None:
        if not hasattr(trainer, "beta"):
            raise TypeError(
                f"AdaptiveKLCallback needs a trainer with a `beta` KL coefficient (trl.GRPOTrainer, trl.RLOOTrainer or "
                f"a subclass); {type(trainer).__name__} has none"
            )
        if _owns_kl_controller(trainer):
            raise TypeError(
                f"AdaptiveKLCallback drives the `beta` of GRPO-style losses; {type(trainer).__name__} puts β·KL in the "
                "per-token reward and owns its KL controller, which this callback would not reach. Use "
                "PPOConfig(kl_coef=<initial β>, kl_target=<per-sequence KL>, kl_horizon=<completions>) instead."
            )
        if not hasattr(trainer, "args"):
            raise TypeError(f"AdaptiveKLCallback needs a transformers Trainer; {type(trainer).__name__} has no `args`")
        for method in ("update", "state_dict", "load_state_dict"):
            if not callable(getattr(controller, method, None)) or not hasattr(controller, "value"):
                raise TypeError(f"controller must provide .value and .{method}(); got {type(controller).__name__}")
        if samples_per_step is not None and samples_per_step <= 0:
            raise ValueError(f"samples_per_step must be > 0, got {samples_per_step}")
        self.trainer = trainer
        self.controller = controller
        self.kl_key = kl_key
        self.sequence_level = sequence_level
        self.length_key = length_key
        self._samples_per_step = samples_per_step
        self._last_update_step = 0
        self._global_step = 0
        self._warned_missing = False
        #: one record per controller update: step, kl_logged, kl_input, n_steps, beta_before, beta_after
        self.updates: list[dict[str, float]] = []

    @classmethod
    def attach(cls, trainer: Any, controller: KLController, **kwargs: Any) -> "AdaptiveKLCallback":
        """Creates the callback and registers it *first* in ``trainer.callback_handler``.

        Callbacks run in registration order and ``trainer.add_callback`` appends, so callbacks that write or print
        the logs (``ResultsCallback``, the console printer) would otherwise run before ``kl_coef``/``kl_target`` are
        added to them. Returns the callback.
        """
        callback = cls(trainer, controller, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def samples_per_step(self) -> float:
        """Completions generated per optimizer step (see the class docstring)."""
        if self._samples_per_step is not None:
            return float(self._samples_per_step)
        args = self.trainer.args
        world_size = getattr(args, "world_size", 1) or 1
        num_iterations = getattr(self.trainer, "num_iterations", None) or getattr(args, "num_iterations", 1) or 1
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size / num_iterations

    def _set_beta(self, value: float) -> None:
        """GRPO's β, derived from the controller: the one place that writes ``trainer.beta``."""
        self.trainer.beta = float(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self._global_step,
            "last_update_step": self._last_update_step,
            "beta": float(self.trainer.beta),
            "kl_key": self.kl_key,
            "sequence_level": self.sequence_level,
            "controller": self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self._last_update_step = int(state["last_update_step"])

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """Loads the controller state saved in the checkpoint training resumed from."""
        callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", None)
        if self.restore(args, state, callbacks):
            logger.info("AdaptiveKLCallback: restored %r from the checkpoint", self.controller)
            return
        logger.warning(
            "AdaptiveKLCallback: training resumes at step %d but the checkpoint's trainer_state.json holds no "
            "AdaptiveKLCallback state; the controller continues from its current value %.6g",
            state.global_step,
            self.controller.value,
        )
        self._last_update_step = state.global_step

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        beta = getattr(self.trainer, "beta", None)
        if beta is None:
            raise TypeError(f"AdaptiveKLCallback: {type(self.trainer).__name__} has no `beta` KL coefficient")
        if beta == 0:
            raise ValueError(
                "AdaptiveKLCallback: the trainer's beta is 0, so TRL built no reference model and logs no KL; there "
                "is nothing to control. Set beta > 0 in the config (e.g. GRPOConfig(beta=0.04)); the controller's "
                "value replaces it when training starts."
            )
        if state.global_step > 0:  # the Trainer has loaded trainer_state.json from the checkpoint it resumes from
            self._restore(args, state)
        else:
            self.restore(args, state)  # checks the settings; nothing to load at step 0
            self._last_update_step = 0
        self._global_step = state.global_step
        if self.controller.value <= 0:
            raise ValueError(
                f"AdaptiveKLCallback: the controller's KL coefficient is {self.controller.value}; a non-positive beta "
                "would switch off the reference model and the KL it controls"
            )
        self._set_beta(self.controller.value)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._global_step = state.global_step  # a checkpoint of this step saves state_dict() right after

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        self._global_step = state.global_step
        if not logs or self.kl_key not in logs:
            if logs and "loss" in logs and not self._warned_missing:
                logger.warning("AdaptiveKLCallback: no %r in the training logs; beta is not being adapted", self.kl_key)
                self._warned_missing = True
            return
        kl_logged = logs[self.kl_key]
        if kl_logged is None or not math.isfinite(float(kl_logged)):
            return  # TRL logs None when every value in the window was NaN
        kl_input = float(kl_logged)
        if self.sequence_level:
            length = logs.get(self.length_key)
            if length is None:
                raise KeyError(
                    f"AdaptiveKLCallback(sequence_level=True) needs {self.length_key!r} in the logs to turn the "
                    "per-token KL into a per-sequence KL"
                )
            kl_input *= float(length)

        beta_before = float(self.trainer.beta)
        n_steps = (state.global_step - self._last_update_step) * self.samples_per_step
        if n_steps > 0:
            beta_after = float(self.controller.update(kl_input, n_steps))
            self._last_update_step = state.global_step
            self._set_beta(beta_after)
            self.updates.append(
                {
                    "step": state.global_step,
                    "kl_logged": float(kl_logged),
                    "kl_input": kl_input,
                    "n_steps": n_steps,
                    "beta_before": beta_before,
                    "beta_after": beta_after,
                }
            )
        extra = {"kl_coef": beta_before, "kl_coef_next": float(self.trainer.beta), "kl_controller_input": kl_input}
        if hasattr(self.controller, "target"):
            extra["kl_target"] = float(self.controller.target)
        logs.update(extra)
        # the Trainer appended a copy of `logs` to log_history before calling us: keep the history complete too
        if state.log_history and state.log_history[-1].get(self.kl_key) == kl_logged:
            state.log_history[-1].update(extra)

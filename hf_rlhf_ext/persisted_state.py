"""Small trainer state that survives a resume, carried by transformers' stateful callbacks.

What shapes the rest of a run besides weights, optimizers and RNG (the KL controller, the REINFORCE running-mean
baseline, the monitors' best-so-far) is a handful of numbers. ``transformers`` already has a home for those: every
callback that is an ``ExportableState`` has its ``state()`` written into the checkpoint's ``trainer_state.json``
(``TrainerState.stateful_callbacks``, keyed by class name), and ``Trainer.train(resume_from_checkpoint=...)`` loads
that file back into ``state`` before ``on_train_begin``.

transformers' own restore (``restore_callback_states_from_checkpoint=True``) rebuilds each callback from JSON
arguments, which cannot carry the trainer our callbacks hold; so each :class:`PersistedState` restores itself in
place at ``on_train_begin`` from ``state.stateful_callbacks``, and refuses that flag with a clear message.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

__all__ = ["PersistedState", "StateHolderCallback", "saved_state", "read_checkpoint_state", "TRAINER_STATE_NAME"]

TRAINER_STATE_NAME = "trainer_state.json"  # where transformers writes TrainerState in a checkpoint directory
_KEY = "saved"  # the attribute under which our state is stored in the callback's entry


def saved_state(stateful_callbacks: dict[str, Any], name: str, index: int = 0, count: int = 1) -> dict | None:
    """The state saved for the ``index``-th of ``count`` callbacks of class ``name``, or None.

    With several callbacks of one class, ``Trainer._save_checkpoint`` appends their states at every save, so the
    latest states are the last ``count`` entries of the list."""
    entry = (stateful_callbacks or {}).get(name)
    if entry is None:
        return None
    entries = entry if isinstance(entry, list) else [entry]
    latest = entries[-count:] if len(entries) >= count else entries
    if index >= len(latest):
        return None
    return latest[index].get("attributes", {}).get(_KEY)


def read_checkpoint_state(checkpoint_dir: str, name: str) -> dict | None:
    """The state a callback of class ``name`` saved in ``<checkpoint_dir>/trainer_state.json`` (None if absent)."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return saved_state(json.load(f).get("stateful_callbacks", {}), name)


class PersistedState(ExportableState):
    """Mixin for a ``TrainerCallback`` whose ``state_dict()`` must survive a resume.

    Subclasses implement ``state_dict()`` (JSON-serialisable) and ``load_state_dict(state)``, and call
    :meth:`restore` from their ``on_train_begin``.
    """

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {_KEY: self.state_dict()}}

    def restore(self, args: Any, state: Any, callbacks: list[Any] | None = None) -> bool:
        """Loads the state saved in the checkpoint training resumed from (``state`` as the Trainer loaded it).

        ``callbacks``: the trainer's callback list, to tell apart several callbacks of this class. Returns whether a
        saved state was loaded (never at a fresh start)."""
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                f"{type(self).__name__} restores its own state on resume; restore_callback_states_from_checkpoint=True "
                "would make transformers rebuild it without the trainer it needs. Leave "
                "restore_callback_states_from_checkpoint=False (the default): the state is restored all the same."
            )
        if getattr(state, "global_step", 0) == 0:
            return False
        same = [cb for cb in (callbacks or [self]) if type(cb) is type(self)] or [self]
        index = next((i for i, cb in enumerate(same) if cb is self), 0)
        saved = saved_state(getattr(state, "stateful_callbacks", None), type(self).__name__, index, len(same))
        if saved is None:
            return False
        self.load_state_dict(saved)
        return True


class StateHolderCallback(TrainerCallback, PersistedState):
    """Persists an object's ``state_dict()`` for a trainer (e.g. a KL controller, a running-mean baseline).

    Subclass it once per kind of state (the class name is the key in ``trainer_state.json``) and register it with
    ``trainer.add_callback(Holder(obj))`` in the trainer's ``__init__``."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(args, state)

"""Clear errors for bad input, raised before any training starts (a wrong column name should not cost a minute of
model loading and then fail deep inside a trainer)."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence


class DataValidationError(ValueError):
    """A data set or reward function does not have the shape a trainer needs."""


def _splits(dataset) -> dict[str, Any]:
    """A DatasetDict's splits by name, or a single Dataset as one split."""
    from datasets import DatasetDict

    if isinstance(dataset, (DatasetDict, dict)):
        return dict(dataset.items())
    return {"dataset": dataset}


def require_columns(dataset, columns: Sequence[str], purpose: str) -> None:
    """Raises ``DataValidationError`` when a split is empty or lacks one of ``columns``.

    ``purpose`` names what the data is for ("preference pairs", "prompts") so the message says what to fix.
    """
    for name, split in _splits(dataset).items():
        if len(split) == 0:
            raise DataValidationError(f"The {purpose} data set (split '{name}') is empty.")
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DataValidationError(
                f"The {purpose} data set (split '{name}') has no column(s) {missing}; it needs {list(columns)} "
                f"and has {split.column_names}."
            )


def require_preference_columns(dataset) -> None:
    require_columns(dataset, ["chosen", "rejected"], "preference pairs")


def require_prompt_column(dataset) -> None:
    require_columns(dataset, ["prompt"], "prompts")


def check_rewards(rewards: Iterable[Any], expected: int, name: str) -> list[Any]:
    """Checks one reward function's output: one value per completion, each a finite number or None (= ignored)."""
    if rewards is None or isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
        raise DataValidationError(f"Reward function '{name}' returned {type(rewards).__name__}, not a list of floats.")
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    if len(values) != expected:
        raise DataValidationError(
            f"Reward function '{name}' returned {len(values)} values for {expected} completions."
        )
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise DataValidationError(f"Reward function '{name}' returned a non-number ({v!r}) at index {i}.") from None
        if not math.isfinite(fv):
            raise DataValidationError(f"Reward function '{name}' returned {fv} at index {i} (rewards must be finite).")
    return values


def validated_reward_func(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a TRL reward function so that NaN, inf or a wrong number of values raise a clear error.

    The wrapper keeps ``__name__`` (TRL names the ``rewards/<name>/mean`` metric after it).
    """
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def wrapper(prompts=None, completions=None, **kwargs):
        rewards = func(prompts=prompts, completions=completions, **kwargs)
        return check_rewards(rewards, len(completions), name)

    return wrapper

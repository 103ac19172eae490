"""Faults in reward functions during training: stop with the evidence, or drop the samples and count them.

A reward function that returns NaN or inf would otherwise train silently (TRL treats NaN like "no opinion", and a run
whose every reward is NaN ends with loss 0 and exit code 0). :class:`RewardGuard` wraps the reward functions of any
TRL ``GRPOTrainer`` (ours subclass it) and, for each generation batch:

- calls every function once and checks its output (one number or None per completion);
- a function that raises, or returns the wrong number of values or non-numbers: stops the run with
  :class:`RewardFunctionError`, the batch's inputs and the traceback saved to ``<output_dir>/reward_faults/``;
- NaN / inf with ``nan_rewards="error"`` (default): stops with :class:`NonFiniteRewardError` naming the function,
  the offending rows saved there;
- NaN / inf with ``nan_rewards="drop"``: the whole sample becomes unscorable (None from *every* function), which
  TRL and our trainers never learn from: ``PPOTrainer`` masks it out of the loss, ``GRPOTrainer`` and
  ``ReinforceTrainer`` leave it out of the baselines and give it advantage 0 (its tokens still count in the loss's
  token normalisation and in the β·KL term). Counted in ``reward_guard/dropped``;
- counts empty completions (``reward_guard/empty_completions``) and groups of one prompt whose rewards are all equal
  (``reward_guard/zero_std_groups``: no learning signal there), logged through TRL's ``log_metric``.

Under several processes each one scores its own share; the processes agree on a fault before raising, so that none
waits forever in the next collective. Reward *models* given to a trainer as modules are scored through
:class:`~hf_rlhf_ext.rewards.RewardModelFunction` once guarded (prompt and completion tokenised separately with the
reward model's own tokenizer, no EOS appended), since a module's logits never pass through a function TRL calls.

    trainer = GRPOTrainer(model, reward_funcs=[my_reward], args=config, train_dataset=prompts)
    attach_reward_guard(trainer, nan_rewards="drop")     # our PPOTrainer / ReinforceTrainer do this themselves
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .reward_guard_config import check_nan_rewards_mode
from .validation import DataValidationError, reward_values

logger = logging.getLogger(__name__)

FAULTS_DIR = "reward_faults"

__all__ = [
    "FAULTS_DIR",
    "NonFiniteRewardError",
    "RewardFault",
    "RewardFunctionError",
    "RewardGuard",
    "attach_reward_guard",
    "guard_reward_funcs",
]


class RewardFault(RuntimeError):
    """A reward function failed during training; ``path`` is the JSON file holding the inputs (None on a process
    that had no faulty row itself)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class RewardFunctionError(RewardFault):
    """A reward function raised, or returned something other than one number (or None) per completion."""


class NonFiniteRewardError(RewardFault):
    """A reward function returned NaN or inf (``nan_rewards="error"``)."""


def _callable_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


@dataclass
class _Batch:
    """The scores of one batch, served to each function's proxy in turn."""

    prompts: Any
    completions: Any
    columns: list[list[float | None]]
    served: set = field(default_factory=set)


class RewardGuard:
    """Checks and, on a fault, stops or drops — for a list of TRL reward functions (see the module docstring).

    Args:
        funcs: TRL-signature reward functions (``f(prompts=, completions=, **kwargs) -> list``).
        output_dir: where ``reward_faults/`` is written.
        nan_rewards: ``"error"`` or ``"drop"``.
        names: the metric names (default: each function's ``__name__``).

    ``reward_funcs`` are the proxies to hand to the trainer, one per function and with its name; the first proxy a
    trainer calls for a batch scores the batch with every function (so a NaN in any function drops the sample from
    all of them), the others return their column. ``counts`` holds the run's totals.
    """

    def __init__(
        self, funcs: Sequence[Callable], output_dir: str, nan_rewards: str = "error", names: Sequence[str] | None = None
    ) -> None:
        check_nan_rewards_mode(nan_rewards)
        self.funcs = list(funcs)
        self.names = list(names) if names is not None else [_callable_name(f) for f in self.funcs]
        self.output_dir = output_dir
        self.nan_rewards = nan_rewards
        self.counts: Counter = Counter()
        self._batch: _Batch | None = None
        self.reward_funcs = [self._proxy(i) for i in range(len(self.funcs))]

    def _proxy(self, index: int) -> Callable:
        def guarded(prompts=None, completions=None, **kwargs):
            batch = self._batch
            if batch is None or batch.prompts is not prompts or batch.completions is not completions or \
                    index in batch.served:
                batch = self._batch = self.score(prompts, completions, **kwargs)
            batch.served.add(index)
            return list(batch.columns[index])

        guarded.__name__ = guarded.__qualname__ = self.names[index]
        guarded.__wrapped__ = self.funcs[index]  # type: ignore[attr-defined]
        guarded.reward_guard = self  # type: ignore[attr-defined]
        return guarded

    # -- one batch -----------------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> _Batch:
        """Every function's values for one batch, checked; raises a :class:`RewardFault` or drops, as configured."""
        in_trainer = "log_metric" in kwargs  # TRL's scoring step: every process scores its share at the same time
        step = getattr(kwargs.get("trainer_state"), "global_step", None)
        columns: list[list[float | None]] = []
        failure = None
        for func, name in zip(self.funcs, self.names):
            raw = getattr(func, "unchecked_rewards", func)  # our adapters: the values before their own NaN check
            try:
                columns.append(reward_values(raw(prompts=prompts, completions=completions, **kwargs),
                                             len(completions), name))
            except Exception as exc:  # noqa: BLE001 - any failure of user code stops the run with its inputs saved
                failure = (name, exc, traceback.format_exc())
                break
        bad = {} if failure else _non_finite(columns, self.names)
        fault_here = failure is not None or (bool(bad) and self.nan_rewards == "error")
        if _any_process(fault_here, in_trainer):
            self._raise(failure, bad, columns, prompts, completions, kwargs, step)
        dropped = sorted({i for rows in bad.values() for i in rows})
        for column in columns:
            for i in dropped:
                column[i] = None
        self._record(prompts, completions, kwargs, columns, len(dropped), bad, in_trainer)
        return _Batch(prompts, completions, columns)

    def _raise(self, failure, bad, columns, prompts, completions, kwargs, step) -> None:
        if failure is not None:
            name, exc, trace = failure
            path = self._save("error", step, prompts, completions, kwargs, range(len(completions)),
                              {"reward_function": name, "error": repr(exc), "traceback": trace})
            problem = str(exc).rstrip(".") if isinstance(exc, DataValidationError) else \
                f"Reward function '{name}' raised {type(exc).__name__}: {exc}"
            raise RewardFunctionError(
                f"{problem} (step {step}). The batch's {len(completions)} inputs and the traceback are saved in "
                f"{path}. Fix the function: it must return one float (or None) per completion.", path
            ) from exc
        if bad and self.nan_rewards == "error":
            rows = sorted({i for r in bad.values() for i in r})
            values = {n: [_json_number(columns[self.names.index(n)][i]) for i in rows] for n in bad}
            path = self._save("non_finite", step, prompts, completions, kwargs, rows,
                              {"reward_functions": {n: r for n, r in bad.items()}, "values": values})
            name, first = next(iter(bad.items()))
            raise NonFiniteRewardError(
                f"Reward function '{name}' returned {columns[self.names.index(name)][first[0]]} for "
                f"{len(first)} of {len(completions)} completions at step {step} (first: prompt "
                f"{_short(prompts[first[0]])} -> completion {_short(completions[first[0]])}); all functions with "
                f"non-finite values: {sorted(bad)}. The offending inputs are saved in {path}. Fix the function, or "
                "set nan_rewards='drop' to leave such samples out of learning (counted as reward_guard/dropped).",
                path,
            )
        raise RewardFault(
            f"A reward function failed on another process at step {step}; its inputs are saved under "
            f"{os.path.join(self.output_dir, FAULTS_DIR)}."
        )

    def _save(self, kind, step, prompts, completions, kwargs, rows, info) -> str:
        folder = os.path.join(self.output_dir, FAULTS_DIR)
        os.makedirs(folder, exist_ok=True)
        rank = _process_index()
        path = os.path.join(folder, f"step-{step}-{kind}" + (f"-rank{rank}" if rank else "") + ".json")
        columns = {k: v for k, v in kwargs.items()
                   if isinstance(v, (list, tuple)) and len(v) == len(completions)}
        record = {
            "problem": kind, "step": step, "nan_rewards": self.nan_rewards, **info,
            "rows": [{"index": i, "prompt": prompts[i], "completion": completions[i],
                      **{k: v[i] for k, v in columns.items()}} for i in rows],
        }
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=repr)
        return path

    def _record(self, prompts, completions, kwargs, columns, num_dropped: int, bad, collective: bool) -> None:
        """Counts drops, empty completions and zero-std groups over all processes; logs them through TRL's
        ``log_metric``."""
        empty = sum(1 for c in completions if not _completion_text(c).strip())
        zero_std = _zero_std_groups(prompts, columns)
        num_dropped, empty, zero_std = (int(v) for v in _sum_over_processes([num_dropped, empty, zero_std], collective))
        self.counts.update(dropped=num_dropped, empty_completions=empty, zero_std_groups=zero_std, batches=1)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("reward_guard/dropped", float(num_dropped))
            log_metric("reward_guard/dropped_total", float(self.counts["dropped"]))
            log_metric("reward_guard/empty_completions", float(empty))
            log_metric("reward_guard/zero_std_groups", float(zero_std))
        if num_dropped:
            logger.warning("Dropped %d of %d samples with non-finite rewards from %s (%d so far).", num_dropped,
                           len(completions), sorted(bad), self.counts["dropped"])


# ----------------------------------------------------------------------------------------------------------------------
# Attaching to a trainer
# ----------------------------------------------------------------------------------------------------------------------
def guard_reward_funcs(funcs: Any, output_dir: str, nan_rewards: str = "error") -> list[Callable]:
    """Guarded copies of ``funcs`` (functions, or reward models as paths / modules, made
    :class:`~hf_rlhf_ext.rewards.RewardModelFunction`) to pass as a trainer's ``reward_funcs``."""
    from .rewards import RewardModelFunction

    funcs = funcs if isinstance(funcs, list) else [funcs]
    funcs = [RewardModelFunction(f) if _is_model(f) else f for f in funcs]
    return RewardGuard(funcs, output_dir, nan_rewards).reward_funcs


def attach_reward_guard(trainer: Any, nan_rewards: str | None = None) -> RewardGuard | None:
    """Guards a built ``GRPOTrainer`` (or subclass): ``trainer.reward_funcs`` becomes a list of guarded proxies
    (same names, same order; the list the trainer was given is left as it was). ``nan_rewards`` defaults to
    ``trainer.args.nan_rewards``, else ``"error"``. Idempotent: a trainer already guarded keeps its guard. Async
    reward functions are left as they are (with a warning)."""
    existing = getattr(trainer, "reward_guard", None)
    if existing is not None:
        if nan_rewards is not None:
            check_nan_rewards_mode(nan_rewards)
            existing.nan_rewards = nan_rewards
        return existing
    mode = nan_rewards or getattr(trainer.args, "nan_rewards", None) or "error"
    from .rewards import RewardModelFunction

    indices, funcs = [], []
    for i, func in enumerate(trainer.reward_funcs):
        if getattr(func, "reward_guard", None) is not None:
            return func.reward_guard  # built from guard_reward_funcs
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
            logger.warning("Reward function %r is async: it is not guarded against NaN.", trainer.reward_func_names[i])
            continue
        if _is_model(func):
            func = RewardModelFunction(func, tokenizer=trainer.reward_processing_classes[i],
                                       name=trainer.reward_func_names[i], append_eos=False)
        indices.append(i)
        funcs.append(func)
    if not funcs:
        return None
    guard = RewardGuard(funcs, trainer.args.output_dir, mode, names=[trainer.reward_func_names[i] for i in indices])
    guarded = list(trainer.reward_funcs)  # a new list: the caller's list (TRL keeps it) stays as it was
    for i, proxy in zip(indices, guard.reward_funcs):
        guarded[i] = proxy
    trainer.reward_funcs = guarded
    trainer.reward_guard = guard
    return guard


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def _is_model(func: Any) -> bool:
    from torch import nn

    return isinstance(func, (str, os.PathLike, nn.Module))


def _non_finite(columns: list[list[float | None]], names: Sequence[str]) -> dict[str, list[int]]:
    bad = {}
    for name, column in zip(names, columns):
        rows = [i for i, v in enumerate(column) if v is not None and not math.isfinite(v)]
        if rows:
            bad[name] = rows
    return bad


def _zero_std_groups(prompts: Sequence[Any], columns: list[list[float | None]]) -> int:
    """Runs of consecutive identical prompts (TRL lays a prompt's completions out together) with at least two scored
    completions whose rewards are equal in every function: their group advantages are all 0."""
    count, start = 0, 0
    for end in range(1, len(prompts) + 1):
        if end < len(prompts) and prompts[end] == prompts[start]:
            continue
        scored = [i for i in range(start, end) if any(column[i] is not None for column in columns)]
        if len(scored) > 1 and all(len({column[i] for i in scored}) == 1 for column in columns):
            count += 1
        start = end
    return count


def _any_process(flag: bool, collective: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call this when ``collective``)."""
    return _sum_over_processes([1.0 if flag else 0.0], collective)[0] > 0


def _sum_over_processes(values: Sequence[float], collective: bool) -> list[float]:
    """``values`` summed over all processes (every process must call this when ``collective``)."""
    import torch.distributed as dist

    if not collective or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    import torch
    from accelerate import PartialState

    total = torch.tensor([float(v) for v in values], device=PartialState().device)
    dist.all_reduce(total)
    return total.tolist()


def _process_index() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(_completion_text(value) if isinstance(value, list) else value)
    return text if len(text) <= limit else text[: limit - 3] + "...'"


def _json_number(value: float | None) -> Any:
    return value if value is None or math.isfinite(value) else str(value)

"""Reward adapters: any reward model or reward function as a TRL reward function, and helpers for tracked-only
(weight 0) rewards. The lab's ready-made rewards
(``lab_gold_reward``, ``lab_proxy_reward``) live with the lab, in :mod:`hf_rlhf_ext.lab.rewards`.

Why: TRL's ``GRPOTrainer`` / ``RLOOTrainer`` take reward *functions* ``f(prompts, completions, completion_ids, ...)``
and log each one's batch mean as ``rewards/<__name__>/mean``. A function with weight 0 in ``reward_weights`` is
computed and logged but does not steer training — the way to watch a gold reward (or a held-out judge) next to the
proxy being optimised, in an unmodified TRL script or in TRL's own CLI::

    trl grpo --model_name_or_path <policy dir> --dataset_name <prompts dir> \\
        --reward_funcs hf_rlhf_ext.lab.rewards.lab_proxy_reward hf_rlhf_ext.lab.rewards.lab_gold_reward \\
        --reward_weights 1 0

A reward *model* passed to TRL directly is scored on ``prompt + completion`` text without the EOS the policy emitted
(completions are decoded with ``skip_special_tokens=True``) and, built from a config, is logged as ``rewards//mean``.
:class:`RewardModelFunction` instead re-tokenises with the RM's own tokenizer, appends the RM's EOS when the policy
really terminated, and has a stable readable name.

Every function here validates its output (one finite float or None per completion; ``validation.check_rewards``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Literal, Sequence

from .scoring import score_token_ids
from .validation import check_rewards, reward_model_pad_id

__all__ = [
    "RewardModelFunction",
    "tracking",
    "ensemble_judge",
    "import_reward_func",
    "ensemble_reward",
    "ENSEMBLE_OBJECTIVES",
]



def _is_conversational(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def _assistant_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if _is_conversational(completion):
        parts = []
        for m in completion:
            if m.get("role") == "assistant":
                content = m.get("content", "")
                if isinstance(content, list):
                    content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
                parts.append(str(content))
        return " ".join(parts)
    raise TypeError(f"A completion must be a string or a list of chat messages, got {type(completion).__name__}.")


class RewardModelFunction:
    """A sequence-classification reward model (``num_labels=1``) as a TRL reward function.

    Args:
        model_or_path: a local directory / Hub id loadable with ``AutoModelForSequenceClassification``, or the module.
        tokenizer: the RM's tokenizer (object or path); default: loaded from the model's directory.
        name: the name TRL logs it under (``rewards/<name>/mean``); default: the directory's base name.
        batch_size: completions scored per forward pass.
        append_eos: "auto" appends the RM tokenizer's EOS when the policy's completion ids end with that id (same
            tokenizer for policy and RM, e.g. the lab) — TRL decodes completions without EOS, and an RM trained on
            terminated replies needs to see it; True always appends it; False never.
        max_length: keep at most this many tokens (the last ones, so the end of the reply is kept); default: the
            model's position limit.
        device: where a model loaded from a path is placed (default: this process's accelerator device).

    Text handling: prompt and reply are tokenised separately (no special tokens added) and concatenated, so a word
    never fuses across the prompt/reply boundary. Conversational prompts are rendered with the RM tokenizer's chat
    template (``add_generation_prompt=True``) and the assistant content is appended, as the policy produced it.
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        name: str | None = None,
        batch_size: int = 64,
        append_eos: bool | Literal["auto"] = "auto",
        max_length: int | None = None,
        device: Any = None,
    ) -> None:
        import torch
        from torch import nn
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if append_eos not in (True, False, "auto"):
            raise ValueError(f"append_eos must be True, False or 'auto', got {append_eos!r}.")
        if isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            if device is None:
                from accelerate import PartialState

                device = PartialState().device
            model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
            default_name = os.path.basename(os.path.normpath(path))
            tok_source = path
        elif isinstance(model_or_path, nn.Module):
            model = model_or_path
            path = str(model.config.name_or_path or "") if hasattr(model, "config") else ""
            default_name = os.path.basename(os.path.normpath(path)) if path else type(model).__name__
            tok_source = path or None
        else:
            raise TypeError(
                f"RewardModelFunction takes a model directory/id or a torch module, got {type(model_or_path).__name__}."
            )
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"A reward model must output one score (num_labels=1); this one has {num_labels}.")
        if tokenizer is None:
            if tok_source is None:
                raise ValueError(
                    "RewardModelFunction needs the reward model's tokenizer: pass tokenizer=... (the module has no "
                    "config._name_or_path to load it from)."
                )
            tokenizer = AutoTokenizer.from_pretrained(tok_source)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.append_eos = append_eos
        limit = max_length or getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        self.max_length = int(limit) if limit else None
        self.name = name or default_name or "reward_model"
        self.pad_token_id = reward_model_pad_id(model, tokenizer, self.name)
        self.__name__ = self.name  # TRL: rewards/<__name__>/mean
        self.__qualname__ = self.name
        self._torch = torch

    def __repr__(self) -> str:
        return f"RewardModelFunction(name={self.name!r}, model={type(self.model).__name__})"

    def _prompt_ids(self, prompt: Any) -> list[int]:
        from .sampling import encode_prompts

        return encode_prompts(self.tokenizer, [prompt])[0]

    def sequences(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None
    ) -> list[list[int]]:
        """The token ids the reward model scores, one list per completion."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = self._prompt_ids(p) + tok(_assistant_text(c), add_special_tokens=False)["input_ids"]
            terminated = False
            if self.append_eos is True:
                terminated = True
            elif self.append_eos == "auto" and completion_ids is not None and eos is not None:
                row = list(completion_ids[i])
                terminated = bool(row) and int(row[-1]) == int(eos)
            if terminated and eos is not None:
                ids.append(int(eos))
            if not ids:
                ids = [eos if eos is not None else (tok.pad_token_id or 0)]
            if self.max_length and len(ids) > self.max_length:
                ids = ids[-self.max_length :]
            out.append(ids)
        return out

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        values = self.unchecked_rewards(prompts, completions, completion_ids)
        return check_rewards(values, len(completions), self.name)

    def unchecked_rewards(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """The scores, NaN and inf included (``reward_guard.RewardGuard`` judges them; ``__call__`` refuses them)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(completions)} completions.")
        if len(completions) == 0:
            return []
        seqs = self.sequences(prompts, completions, completion_ids)
        scores = score_token_ids(self.model, seqs, pad_token_id=self.pad_token_id, batch_size=self.batch_size)
        return scores.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions named on a command line


def import_reward_func(name: str, flag: str = "--reward_funcs") -> Callable:
    """A reward function from a dotted import path (``pkg.module.fn``) or a name in ``trl.rewards``.

    Only the module named is imported, and nothing else is tried. The working directory is importable during that
    import only, and after the installed packages (a file there cannot shadow one of them for the rest of the run).
    The function is returned as it is: the trainer's ``RewardGuard`` checks its values. ``flag`` names the option the
    path came from in error messages (``--reward_funcs``, a testbed's ``--gold_funcs``).
    """
    from .validation import InputError

    if "." not in name:
        import trl.rewards

        if not hasattr(trl.rewards, name):
            raise InputError(f"Unknown reward function {name!r}: give a dotted import path (my_rewards.length_reward) "
                             "or a name in trl.rewards.")
        return getattr(trl.rewards, name)
    if not all(part.isidentifier() for part in name.split(".")):
        raise InputError(f"{flag} {name!r} is not a dotted import path (module.function).")
    module_path, attr = name.rsplit(".", 1)
    module = _import_from_cwd(module_path, name, flag)
    if not hasattr(module, attr):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(f"{flag} {name!r}: module {module_path!r} ({getattr(module, '__file__', '?')}) has "
                         f"no attribute {attr!r}; its public callables are {public}.")
    func = getattr(module, attr)
    if not callable(func):
        raise InputError(f"{flag} {name!r} is a {type(func).__name__}, not a function.")
    return func


def _import_from_cwd(module_path: str, name: str, flag: str) -> Any:
    import importlib
    import sys

    from .validation import InputError

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        raise InputError(f"{flag} {name!r}: cannot import module {module_path!r} ({exc}). Give the dotted path "
                         "of an installed module, or of a .py file in the working directory, and a function in it.") \
            from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def tracking(func: Any, name: str | None = None) -> Callable[..., list[float]]:
    """A renamed, validating copy of a reward function (or reward model / model path) for weight-0 tracking.

    Pass it in ``reward_funcs`` with weight 0 in ``reward_weights``: TRL logs it as ``rewards/<name>/mean`` without
    optimising it. Renaming lets the same function be optimised and tracked (e.g. on another data column) without
    two metrics of one name, and gives a reward model a readable name. Default name: ``<original>_tracked``.
    """
    from torch import nn

    if isinstance(func, (str, os.PathLike, nn.Module)):
        base = RewardModelFunction(func)
        return RewardModelFunction(base.model, tokenizer=base.tokenizer, name=name or f"{base.name}_tracked")
    if not callable(func):
        raise TypeError("tracking() takes a reward function, a reward model or a model path, got "
                        f"{type(func).__name__}.")
    original = getattr(func, "__name__", type(func).__name__)
    new_name = name or f"{original}_tracked"

    def tracked(prompts=None, completions=None, **kwargs):
        values = func(prompts=prompts, completions=completions, **kwargs)
        return check_rewards(values, len(completions), new_name)

    tracked.__name__ = tracked.__qualname__ = new_name
    tracked.__doc__ = f"Tracked copy of {original!r} (for weight-0 logging)."
    tracked.__wrapped__ = func  # type: ignore[attr-defined]
    return tracked


ENSEMBLE_OBJECTIVES = ("mean", "min", "mean_minus_std")


def ensemble_reward(
    funcs: Sequence[Callable[..., Any]],
    objective: Literal["mean", "min", "mean_minus_std"] = "mean",
    penalty: float = 1.0,
    name: str | None = None,
) -> Callable[..., list[float]]:
    """One reward from an ensemble of reward functions (Coste et al. 2023, arXiv 2310.02743), per completion:

    * ``"mean"``: the members' mean — averages out each member's idiosyncratic errors;
    * ``"min"``: the worst case — a completion scores only what every member grants it;
    * ``"mean_minus_std"``: uncertainty-weighted, mean − ``penalty`` · std across members — falls where the members
      disagree, which is off their training data, where a policy exploiting one reward model goes.

    Members that return None for a completion are left out of its statistics (all None → None). The mean
    disagreement (std) is logged through TRL's ``log_metric`` as ``<name>/disagreement`` when TRL passes it.
    """
    funcs = list(funcs)
    if len(funcs) < 2:
        raise ValueError(f"An ensemble needs at least 2 reward functions, got {len(funcs)}.")
    if objective not in ENSEMBLE_OBJECTIVES:
        raise ValueError(f"objective must be one of {ENSEMBLE_OBJECTIVES}, got {objective!r}.")
    if penalty < 0 or not math.isfinite(penalty):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty}.")
    name = name or f"ensemble_{objective}"
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]

    def combine(vals: list[float]) -> tuple[float, float]:
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        if objective == "min":
            return min(vals), std
        return (mean - penalty * std if objective == "mean_minus_std" else mean), std

    def ensemble(prompts=None, completions=None, log_metric=None, **kwargs):
        columns = []
        for f, n in zip(funcs, names):
            vals = check_rewards(f(prompts=prompts, completions=completions, **kwargs), len(completions), n)
            columns.append([math.nan if v is None else float(v) for v in vals])
        out: list[float | None] = []
        stds = []
        for row in zip(*columns):
            vals = [v for v in row if math.isfinite(v)]
            if not vals:
                out.append(None)
                continue
            value, std = combine(vals)
            stds.append(std)
            out.append(value)
        if log_metric is not None and stds:
            log_metric(f"{name}/disagreement", sum(stds) / len(stds))
        return check_rewards(out, len(completions), name)

    ensemble.__name__ = ensemble.__qualname__ = name
    ensemble.members = names  # type: ignore[attr-defined]
    ensemble.funcs = funcs  # type: ignore[attr-defined]  # e.g. for OveroptimizationCallback(ensemble=...)
    ensemble.objective = objective  # type: ignore[attr-defined]
    return ensemble


def ensemble_judge(
    funcs: Sequence[Callable[..., Any]], penalty: float = 1.0, name: str = "ensemble_judge"
) -> Callable[..., list[float]]:
    """A held-out judge from an ensemble of reward functions: mean − ``penalty`` · std across members, per completion
    (``ensemble_reward(funcs, "mean_minus_std", penalty, name)``).

    Where there is no gold reward, this is a stand-in that falls when the members start to disagree — which is what
    happens off the data the reward models were trained on, where a policy exploiting one RM goes.
    """
    return ensemble_reward(funcs, "mean_minus_std", penalty=penalty, name=name)

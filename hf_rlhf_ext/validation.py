"""Clear errors for bad input, raised before any training starts (a wrong column name should not cost a minute of
model loading and then fail deep inside a trainer).

One layer for the recipes and the Python API: the recipes call these checks in ``run.build.prepare_rl_run``, our
trainers call ``validate_grpo_args`` and ``check_prompt_dataset`` in ``__init__`` and ``check_trainer_inputs`` right
after, and a vanilla ``trl.GRPOTrainer`` user can call the same functions. Every message names the problem and the fix.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Iterable, Sequence


class InputError(ValueError):
    """Bad input to a recipe, trainer or callback; the message names the problem and the fix."""


class DataValidationError(InputError):
    """A data set or reward function does not have the shape a trainer needs."""


class ConfigValidationError(InputError):
    """A training setting is out of its valid range."""


# ----------------------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------------------
def _splits(dataset, split: str | None) -> dict[str, Any]:
    """A DatasetDict's splits by name, or a single Dataset as one split (named ``split``, or unnamed)."""
    from datasets import DatasetDict

    if isinstance(dataset, (DatasetDict, dict)):
        return dict(dataset.items())
    return {split: dataset}


def _where(purpose: str, split: str | None) -> str:
    return f"The {purpose} data set" + (f" (split '{split}')" if split else "")


def require_columns(dataset, columns: Sequence[str], purpose: str, split: str | None = None) -> None:
    """Raises ``DataValidationError`` when a split is empty or lacks one of ``columns``.

    ``purpose`` names what the data is for ("preference pairs", "prompts") so the message says what to fix.
    """
    for name, part in _splits(dataset, split).items():
        where = _where(purpose, name)
        if not hasattr(part, "column_names"):
            raise DataValidationError(f"{where} is a {type(part).__name__}, not a datasets.Dataset: build one with "
                                      "datasets.Dataset.from_dict / from_list.")
        present = list(part.column_names or [])
        missing = [c for c in columns if c not in present]
        if missing:
            hint = f" Rename one, e.g. dataset.rename_column({present[0]!r}, {missing[0]!r})." if present else ""
            raise DataValidationError(
                f"{where} has no column(s) {missing}; it needs {list(columns)} and has {present}.{hint}"
            )
        if hasattr(part, "__len__") and len(part) == 0:
            raise DataValidationError(f"{where} is empty (0 rows): give a data set with at least one row.")


def require_preference_columns(dataset, split: str | None = None) -> None:
    require_columns(dataset, ["chosen", "rejected"], "preference pairs", split)


def require_prompt_column(dataset, split: str | None = None) -> None:
    require_columns(dataset, ["prompt"], "prompts", split)


def prompt_problem(prompt: Any) -> str | None:
    """What is wrong with one prompt, or None: a prompt is a non-empty string or a non-empty list of chat messages
    (dicts with a string ``role`` and a ``content``)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is an empty string"
    if isinstance(prompt, list):
        if not prompt:
            return "is an empty list of messages"
        for j, message in enumerate(prompt):
            if not isinstance(message, dict):
                return f"has message {j} of type {type(message).__name__}, not a dict with 'role' and 'content'"
            if not isinstance(message.get("role"), str) or "content" not in message:
                return f"has message {j} without a string 'role' and a 'content' (keys: {sorted(message)})"
        return None
    return f"is a {type(prompt).__name__} ({prompt!r:.40}), not a string or a list of chat messages"


def check_prompt_rows(dataset, split: str | None = None) -> None:
    """Raises ``DataValidationError`` naming the first row whose ``prompt`` is not a usable prompt."""
    require_prompt_column(dataset, split)
    for name, part in _splits(dataset, split).items():
        for i, prompt in enumerate(part["prompt"]):
            problem = prompt_problem(prompt)
            if problem is not None:
                raise DataValidationError(
                    f"{_where('prompts', name)}: row {i}'s 'prompt' {problem}. Each prompt must be a non-empty string "
                    "or a list of {'role': ..., 'content': ...} messages; filter or fix that row."
                )


def check_prompt_dataset(dataset, split: str | None = None) -> None:
    """Columns, emptiness and every row of a prompt data set (None passes: the trainer may not need one)."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return  # None, or an IterableDataset whose rows cannot be checked up front
    check_prompt_rows(dataset, split)


def validate_trainer_inputs(args: Any, train_dataset: Any = None, eval_dataset: Any = None) -> None:
    """What a trainer checks before loading anything: its settings and its prompt data sets."""
    validate_grpo_args(args)
    check_prompt_dataset(train_dataset, "train")
    check_prompt_dataset(eval_dataset, "eval")


def check_trainer_prompts(trainer: Any) -> None:
    """After a trainer is built (its model and tokenizer loaded): its prompts plus ``max_completion_length`` fit
    the policy's context."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    context = model_context_length(model.config)
    for name, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        check_prompt_lengths(dataset, tokenizer, context, trainer.args.max_completion_length, name)


def model_context_length(config: Any) -> int | None:
    """The longest sequence (prompt + completion) a model's config accepts, or None when it names no limit."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _prompt_token_lengths(prompts: Sequence[Any], tokenizer: Any) -> list[int]:
    if prompts and isinstance(prompts[0], list):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_prompt_lengths(
    dataset, tokenizer: Any, context_length: int | None, max_completion_length: int, split: str | None = None
) -> None:
    """Raises when the longest prompt plus ``max_completion_length`` tokens exceeds the model's context (the model
    would fail or silently wrap its positions mid-generation)."""
    if context_length is None or dataset is None or not hasattr(dataset, "column_names"):
        return
    for name, part in _splits(dataset, split).items():
        if "prompt" not in part.column_names or len(part) == 0:
            continue
        lengths = _prompt_token_lengths(list(part["prompt"]), tokenizer)
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] + max_completion_length > context_length:
            too_long = sum(n + max_completion_length > context_length for n in lengths)
            raise DataValidationError(
                f"{_where('prompts', name)}: {too_long} prompt(s) do not fit the model's context of {context_length} "
                f"tokens with max_completion_length={max_completion_length} (the longest, row {longest}, has "
                f"{lengths[longest]} tokens). Filter long prompts, e.g. dataset.filter(lambda r: "
                f"len(tokenizer(r['prompt'])['input_ids']) <= {max(context_length - max_completion_length, 0)}), "
                "or lower max_completion_length."
            )


# ----------------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only be a local path (absolute, ``./``, ``~``, several ``/``, a file extension), not
    a Hub id such as ``org/name``."""
    if name.startswith(("/", "./", "../", "~", "\\")) or os.sep in name.strip(os.sep).replace("/", "", 1):
        return True
    if re.search(r"\.(jsonl?|csv|parquet|arrow|txt|tsv)$", name):
        return True
    return not _HUB_ID.match(name)


def require_existing_path(name: str | None, flag: str, what: str) -> None:
    """Raises ``InputError`` for a local path that does not exist (instead of the Hub's "Repo id must use
    alphanumeric chars" for ``/nonexistent``); Hub ids are left to the Hub."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_local_path(name):
        raise InputError(
            f"{flag} {name!r}: no such file or directory. Give an existing local {what} or a Hub id such as "
            "'org/name'."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Training settings
# ----------------------------------------------------------------------------------------------------------------------
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigValidationError(message)


def validate_grpo_args(args: Any) -> None:
    """Range checks TRL's ``GRPOConfig`` does not make, for a vanilla ``GRPOConfig`` and for our configs (PPO,
    REINFORCE): each field is checked when the config has it. Call it before building a trainer."""
    get = functools.partial(getattr, args)
    max_len = get("max_completion_length", None)
    _require(max_len is None or max_len >= 1,
             f"max_completion_length must be >= 1 (tokens per completion), got {max_len}.")
    kl_name = "kl_coef" if hasattr(args, "kl_coef") else "beta"
    kl = get(kl_name, 0.0)
    _require(kl is not None and kl >= 0 and math.isfinite(kl),
             f"{kl_name} (the KL coefficient β) must be a finite number >= 0, got {kl}. Use 0 to turn the KL "
             "penalty off.")
    clip_name = "cliprange" if hasattr(args, "cliprange") else "epsilon"
    clip = get(clip_name, 0.2)
    _require(clip is not None and clip > 0, f"{clip_name} (the ratio clip ε) must be > 0, got {clip}; 0.2 is usual.")
    eps_high = get("epsilon_high", None)
    _require(eps_high is None or eps_high > 0, f"epsilon_high must be > 0 (or unset), got {eps_high}.")
    for name in ("gamma", "lam"):
        value = get(name, None)
        _require(value is None or 0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}.")
    num_generations = get("num_generations", None)
    _require(num_generations is None or num_generations >= 1,
             f"num_generations (completions per prompt) must be >= 1, got {num_generations}.")
    temperature = get("temperature", 1.0)
    _require(temperature is None or temperature > 0,
             f"temperature must be > 0 (RL samples from the policy), got {temperature}.")
    mode = get("nan_rewards", "error")
    _require(mode in ("error", "drop"), f"nan_rewards must be 'error' or 'drop', got {mode!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# Reward models and reward outputs
# ----------------------------------------------------------------------------------------------------------------------
def reward_model_pad_id(model: Any, tokenizer: Any, name: str) -> int:
    """The id a sequence-classification reward model is padded with: the one its config uses to find each row's last
    token (set from the tokenizer when the config has none). Raises when neither names a pad token."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    if getattr(tokenizer, "pad_token_id", None) is not None:
        config.pad_token_id = tokenizer.pad_token_id  # the model finds each row's last token with it
        return int(tokenizer.pad_token_id)
    raise DataValidationError(
        f"Reward model '{name}': neither its tokenizer nor its config has a pad token, so batches of completions of "
        "different lengths cannot be scored. Set one and save it: tokenizer.pad_token = tokenizer.eos_token; "
        "model.config.pad_token_id = tokenizer.pad_token_id."
    )


def check_rewards(rewards: Iterable[Any], expected: int, name: str) -> list[Any]:
    """Checks one reward function's output: one value per completion, each a finite number or None (= ignored)."""
    values = reward_values(rewards, expected, name)
    for i, v in enumerate(values):
        if v is not None and not math.isfinite(v):
            raise DataValidationError(f"Reward function '{name}' returned {v} at index {i} (rewards must be finite).")
    return values


def reward_values(rewards: Any, expected: int, name: str) -> list[float | None]:
    """One reward function's output as floats (None kept; NaN/inf kept for the caller to judge). Raises on a wrong
    type, a wrong count or a non-number."""
    if rewards is None or isinstance(rewards, (str, bytes, dict)) or not hasattr(rewards, "__len__"):
        raise DataValidationError(
            f"Reward function '{name}' returned {type(rewards).__name__}, not a list of floats (one per completion)."
        )
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    if len(values) != expected:
        raise DataValidationError(
            f"Reward function '{name}' returned {len(values)} values for {expected} completions: return one float "
            "(or None) per completion."
        )
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
            raise DataValidationError(
                f"Reward function '{name}' returned a non-number ({v!r}) at index {i}: return floats (or None)."
            )
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise DataValidationError(
                f"Reward function '{name}' returned a non-number ({v!r}) at index {i}: return floats (or None)."
            ) from None
    return out


def validated_reward_func(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a TRL reward function so that NaN, inf or a wrong number of values raise a clear error.

    The wrapper keeps ``__name__`` (TRL names the ``rewards/<name>/mean`` metric after it).
    """
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def wrapper(prompts=None, completions=None, **kwargs):
        rewards = func(prompts=prompts, completions=completions, **kwargs)
        return check_rewards(rewards, len(completions), name)

    wrapper.unchecked_rewards = func  # type: ignore[attr-defined]  # what reward_guard.RewardGuard calls
    return wrapper

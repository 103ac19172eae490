"""Shared plumbing of the RL recipes (``recipes/ppo.py``, ``recipes/grpo.py``, ``recipes/reinforce.py``), so that each
recipe stays a thin ``TrlParser`` script like TRL's own ``trl/scripts/grpo.py``.

Defaults are the offline lab: its SFT policy, its prompts (train / held-out test) and its proxy reward model, with the
gold reward tracked at weight 0. ``--model_name_or_path``, ``--dataset_name``, ``--reward_model_name_or_path`` and
``--reward_funcs`` (dotted import paths, as TRL's CLI takes them) replace each part; ``--use_peft`` gives LoRA
(TRL's ``get_peft_config``). Every run writes the results contract: ``log_history.jsonl`` while training
(``ResultsCallback``) and ``metrics.json`` at the end, with the final training metrics and a held-out evaluation of
the policy before and after training (mean reward per function, KL to the initial policy, sample completions).

This module builds a run (lab, policy, prompts, rewards, trainer) from its ``spec``; the rest of ``run`` has a
module each: ``parsing`` (YAML defaults, the parser), ``monitors`` (``--monitor``), ``finish`` (evaluation, metrics,
card, push) and ``errors`` (one readable line per failure).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from typing import Any, Callable, Sequence

import torch

from ..results import ResultsCallback
from ..reward_guard import attach_reward_guard
from ..rewards import import_reward_func
from ..validation import (
    DataValidationError,
    InputError,
    check_prompt_lengths,
    check_prompt_rows,
    model_context_length,
    require_existing_path,
    validate_grpo_args,
    validated_reward_func,
)
from .parsing import apply_cpu_defaults
from .spec import RLScriptArguments, RLSetup

logger = logging.getLogger(__name__)




def load_lab(script_args: RLScriptArguments):
    """The lab in ``--lab_dir`` / ``$HF_RLHF_EXT_LAB_DIR`` (put there if missing), else the cached default lab. A
    ``--lab_dir`` whose parent folder does not exist is refused (a typo should not create a tree of folders)."""
    from ..lab.build import open_lab

    parent = os.path.dirname(os.path.abspath(script_args.lab_dir)) if script_args.lab_dir else None
    if parent is not None and not os.path.isdir(parent):
        raise InputError(
            f"--lab_dir {script_args.lab_dir!r}: its folder {parent!r} does not exist. Give a lab directory (it is put "
            "there if missing) in an existing folder, or drop --lab_dir for the cached default lab."
        )
    return open_lab(script_args.lab_dir)


def resolve_policy(model_args: Any, training_args: Any, lab: Any = None) -> tuple[str, Any]:
    """(model path or Hub id, tokenizer). Default: the lab's SFT policy. A ``--model_name_or_path`` is loaded by the
    trainer with ``training_args.model_init_kwargs`` (dtype, revision, attention; ``trust_remote_code`` from the
    training config, default False)."""
    from transformers import AutoTokenizer

    path = model_args.model_name_or_path or (lab.policy_path if lab is not None else None)
    if not path:
        raise InputError("No policy: pass --model_name_or_path (or run on the lab).")
    require_existing_path(path, "--model_name_or_path", "model directory")
    init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    init_kwargs = {k: v for k, v in init_kwargs.items() if v is not None}
    init_kwargs.update(quantization_kwargs(model_args, training_args))
    if training_args.model_init_kwargs:
        init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = init_kwargs
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


def quantization_kwargs(model_args: Any, training_args: Any) -> dict[str, Any]:
    """``--load_in_4bit`` / ``--load_in_8bit`` as model-loading kwargs (TRL's ``get_quantization_config``), or a clear
    refusal where they cannot work: no CUDA or no bitsandbytes, no ``--use_peft`` (quantized weights cannot be
    trained), or a PPO critic that would copy the quantized body."""
    if not (getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)):
        return {}
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"{flag} needs a CUDA GPU and the bitsandbytes package, and this machine lacks "
                         f"{'a CUDA GPU' if not torch.cuda.is_available() else 'bitsandbytes'}: drop the flag, or "
                         "run on a GPU with `pip install bitsandbytes`.")
    if not model_args.use_peft:
        raise InputError(f"{flag} quantizes the policy, whose weights then cannot be trained: add --use_peft (QLoRA).")
    if hasattr(training_args, "critic_shares_base") and not training_args.critic_shares_base and \
            not getattr(training_args, "value_model_name_or_path", None):
        raise InputError(f"{flag} with PPO: the critic would copy the quantized body and could not train; add "
                         "--critic_shares_base true (a LoRA critic on the shared base) or --value_model_name_or_path.")
    from trl import get_kbit_device_map, get_quantization_config

    return {"quantization_config": get_quantization_config(model_args), "device_map": get_kbit_device_map()}


def load_prompt_datasets(script_args: RLScriptArguments, lab: Any = None, seed: int = 0,
                         tokenizer: Any = None) -> tuple[Any, Any]:
    """(train, test) prompt data sets, each with a ``prompt`` column and usable prompts (validated). Default: the
    lab's prompts. A ``--dataset_name`` without the test split gets ``num_eval_prompts`` held out of its train split.
    With the policy's ``tokenizer``, plain-text prompts become one user turn each where its chat template calls for
    it (:func:`~hf_rlhf_ext.sampling.as_chat_prompts`), so training and evaluation both render them as TRL renders
    conversational data."""
    if script_args.dataset_name:
        from ..data import load_dataset_dict

        require_existing_path(script_args.dataset_name, "--dataset_name", "data file or folder")
        data = load_dataset_dict(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
        if script_args.dataset_train_split not in data:
            raise DataValidationError(
                f"--dataset_name {script_args.dataset_name!r} has no split {script_args.dataset_train_split!r}; it "
                f"has {list(data)}. Pick one with --dataset_train_split."
            )
        train = data[script_args.dataset_train_split]
        check_prompt_rows(train, script_args.dataset_train_split)  # before any split: a wrong column fails first
        test = data.get(script_args.dataset_test_split)
        if test is None and script_args.num_eval_prompts > 0 and len(train) > 1:
            n_test = min(script_args.num_eval_prompts, max(1, len(train) // 10))
            split = train.train_test_split(test_size=n_test, seed=seed)
            train, test = split["train"], split["test"]
    else:
        if lab is None:
            raise InputError("No prompts: pass --dataset_name (or run on the lab).")
        data = lab.load_prompts()
        train, test = data["train"], data["test"]
    check_prompt_rows(train, script_args.dataset_train_split)
    if test is not None:
        check_prompt_rows(test, script_args.dataset_test_split)
    if tokenizer is None:
        return train, test
    return chat_prompt_dataset(train, tokenizer), None if test is None else chat_prompt_dataset(test, tokenizer)


def chat_prompt_dataset(data: Any, tokenizer: Any) -> Any:
    """``data`` with its ``prompt`` column through :func:`~hf_rlhf_ext.sampling.as_chat_prompts` (unchanged when
    no prompt changes, so the lab's data sets and their fingerprints stay as they were)."""
    from ..sampling import as_chat_prompts

    prompts = list(data["prompt"])
    rendered = as_chat_prompts(tokenizer, prompts)
    if rendered == prompts:
        return data
    # added before the old column goes: a data set left without columns cannot take a new one
    return data.add_column("chat_prompt", rendered).remove_columns("prompt").rename_column("chat_prompt", "prompt")


def build_reward_funcs(
    script_args: RLScriptArguments, training_args: Any, lab: Any = None, on_lab: bool = False
) -> tuple[list, list[float], dict[str, Callable]]:
    """(reward functions, weights, functions for the held-out evaluation by name).

    Main rewards: ``--reward_model_name_or_path`` and ``--reward_funcs``; the lab's proxy RM when neither is given.
    Reward models are wrapped in ``rewards.RewardModelFunction`` (re-tokenised with their own tokenizer, EOS shown
    where the policy emitted it). With ``track_gold`` on the lab the gold reward is appended with weight 0 (on a
    testbed: its judge, ``lab_gold_func``).
    ``training_args.reward_weights`` may name the main weights only (the 0 is appended) or all of them.
    """
    from ..rewards import RewardModelFunction

    funcs: list = []
    if script_args.reward_model_name_or_path:
        require_existing_path(script_args.reward_model_name_or_path, "--reward_model_name_or_path", "reward model")
        funcs.append(RewardModelFunction(script_args.reward_model_name_or_path))
    for name in script_args.reward_funcs or []:
        funcs.append(import_reward_func(name))
    if not funcs:
        if lab is None:
            raise InputError("No reward: pass --reward_model_name_or_path or --reward_funcs (or run on the lab).")
        funcs.append(RewardModelFunction(lab.reward_model_path, name="proxy_reward"))
    n_main = len(funcs)
    weights = list(training_args.reward_weights) if training_args.reward_weights is not None else [1.0] * n_main
    if on_lab and script_args.track_gold:
        funcs.append(lab_gold_func(lab))
        if len(weights) == n_main:
            weights.append(0.0)
    if len(weights) != len(funcs):
        raise InputError(f"{len(weights)} reward_weights for {len(funcs)} reward functions ({_names(funcs)}): give "
                         "one weight per function (or per main function: the tracked gold then gets 0).")
    training_args.reward_weights = weights
    # Training scores through the trainer's RewardGuard; the held-out evaluation refuses NaN outright.
    eval_rewards = {_name(f): f if hasattr(f, "model") else validated_reward_func(f) for f in funcs}
    return funcs, weights, eval_rewards


def lab_gold_func(lab: Any) -> Callable:
    """The gold reward of the lab a run is on: a testbed's own judge (its dotted path, imported as ``--reward_funcs``
    are), else the lab's ``gold_reward``. Logged as ``rewards/<its name>/mean``."""
    if getattr(lab, "gold_funcs", None):
        return import_reward_func(lab.gold_funcs)
    from ..lab.task import gold_reward

    return gold_reward


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def _names(funcs: Sequence[Any]) -> list[str]:
    return [_name(f) for f in funcs]


def prepare_rl_run(script_args: RLScriptArguments, training_args: Any, model_args: Any) -> RLSetup:
    """Resolves policy, tokenizer, prompts, rewards, PEFT config and callbacks for an RL recipe."""
    from trl import get_peft_config

    apply_cpu_defaults(training_args)
    check_run_inputs(script_args, training_args, model_args)
    needs_lab = not (model_args.model_name_or_path and script_args.dataset_name and
                     (script_args.reward_model_name_or_path or script_args.reward_funcs))
    lab = None
    if needs_lab:
        with training_args.main_process_first(desc="building or opening the lab"):  # one process builds it
            lab = load_lab(script_args)
    on_lab = not script_args.dataset_name and lab is not None
    model, tokenizer = resolve_policy(model_args, training_args, lab)
    train, test = load_prompt_datasets(script_args, lab, seed=training_args.seed, tokenizer=tokenizer)
    check_prompt_lengths(train, tokenizer, _context_length(model, model_args, training_args),
                         training_args.max_completion_length, script_args.dataset_train_split)
    funcs, weights, eval_rewards = build_reward_funcs(script_args, training_args, lab, on_lab=on_lab)
    eval_prompts = []
    if test is not None and len(test) and script_args.num_eval_prompts:
        pool = list(test["prompt"])  # cycled when more evaluation prompts are asked for than the split has
        eval_prompts = [pool[i % len(pool)] for i in range(script_args.num_eval_prompts)]
    return RLSetup(
        model=model, tokenizer=tokenizer, train_dataset=train, eval_prompts=eval_prompts, reward_funcs=funcs,
        reward_weights=weights, eval_rewards=eval_rewards, peft_config=get_peft_config(model_args),
        callbacks=[ResultsCallback(training_args.output_dir)], lab=lab, on_lab=on_lab,
    )


def check_run_inputs(script_args: RLScriptArguments, training_args: Any, model_args: Any) -> None:
    """Everything checkable before loading anything: the training settings, the paths, and that a model of one's
    own comes with its own reward and prompts (the lab's word-level proxy RM and prompts mean nothing to it)."""
    validate_grpo_args(training_args)
    model = model_args.model_name_or_path
    require_existing_path(model, "--model_name_or_path", "model directory")
    require_existing_path(script_args.reward_model_name_or_path, "--reward_model_name_or_path", "reward model")
    require_existing_path(getattr(training_args, "value_model_name_or_path", None), "--value_model_name_or_path",
                          "model directory")
    require_existing_path(script_args.dataset_name, "--dataset_name", "data file or folder")
    if model and not _is_lab_model(model):
        has_reward = script_args.reward_model_name_or_path or script_args.reward_funcs
        if not has_reward or not script_args.dataset_name:
            missing = " and ".join(
                flag for flag, given in (("reward (--reward_funcs or --reward_model_name_or_path)", has_reward),
                                         ("prompts (--dataset_name)", script_args.dataset_name)) if not given)
            raise InputError(
                f"--model_name_or_path {model!r} is not the lab's policy, and no {missing} was given: the lab's "
                "defaults (a word-level proxy reward model and word-level prompts) mean nothing to another model. "
                "Pass them, or drop --model_name_or_path to run on the lab."
            )


def _is_lab_model(path: str) -> bool:
    """Whether ``path`` is a model directory of a built lab (its policy, or another model the lab holds)."""
    from ..lab.build import is_complete

    return os.path.isdir(path) and is_complete(os.path.dirname(os.path.normpath(os.path.abspath(path))))


def _context_length(model: str, model_args: Any, training_args: Any) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=model_args.model_revision,
                                        trust_remote_code=training_args.trust_remote_code)
    return model_context_length(config)


def make_trainer(trainer_cls: type, setup: RLSetup, training_args: Any, **kwargs: Any) -> Any:
    """A ``GRPOTrainer`` (or subclass) wired to the resolved policy, rewards, prompts, PEFT config and callbacks, its
    reward functions guarded (``reward_guard``: NaN stops the run, or is dropped with ``nan_rewards="drop"``)."""
    with expected_head_drops_unreported():  # PPO's critic is the reward model's body: its score head is dropped
        trainer = trainer_cls(
            model=setup.model,
            reward_funcs=setup.reward_funcs,
            args=training_args,
            train_dataset=setup.train_dataset,
            processing_class=setup.tokenizer,
            peft_config=setup.peft_config,
            callbacks=setup.callbacks,
            **kwargs,
        )
    attach_reward_guard(trainer)  # ours attach it in __init__; a vanilla GRPOTrainer gets it here
    return trainer


def end_trainer(trainer: Any) -> None:
    """``trainer.end()`` where the trainer has it (transformers >= 5.18): finishes the trackers and destroys the
    distributed process group (``accelerator.end_training``). The last call of a run: everything that talks to the
    other processes (train, evaluate, save, push) must come before it."""
    if hasattr(trainer, "end"):
        trainer.end()


# heads of task models: a bare body (AutoModel) loaded from such a checkpoint leaves them out, as intended
_TASK_HEADS = ("score.", "lm_head.", "v_head.", "classifier.")


class _ExpectedHeadDropFilter(logging.Filter):
    """Drops transformers' load report when its only entries are task-head weights left UNEXPECTED by a bare body
    (e.g. ``score.weight`` when a critic takes a reward model's body). Any other report passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        entries = [(cells[0].strip(), cells[1].strip()) for cells in rows[1:] if not set(cells[0].strip()) <= {"-"}]
        expected = bool(entries) and all(status.endswith("UNEXPECTED") and key.startswith(_TASK_HEADS)
                                         for key, status in entries)
        return not expected


@contextlib.contextmanager
def expected_head_drops_unreported():
    """While open, a model load whose only surprise is a dropped task head reports nothing (see the filter)."""
    loader_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _ExpectedHeadDropFilter()
    loader_logger.addFilter(quiet)
    try:
        yield
    finally:
        loader_logger.removeFilter(quiet)


# ----------------------------------------------------------------------------------------------------------------------
# Monitors: our callbacks, attached from the command line (--monitor)
# ----------------------------------------------------------------------------------------------------------------------




# ----------------------------------------------------------------------------------------------------------------------
# Errors on the command line
# ----------------------------------------------------------------------------------------------------------------------
#: exceptions that mean bad input, or a fault of the user's reward function: one line on stderr, no traceback


# ----------------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------------------------

"""Shared plumbing of the RL recipes (``recipes/ppo.py``, ``recipes/grpo.py``, ``recipes/reinforce.py``), so that each
recipe stays a thin ``TrlParser`` script like TRL's own ``trl/scripts/grpo.py``.

Defaults are the offline lab: its SFT policy, its prompts (train / held-out test) and its proxy reward model, with the
gold reward tracked at weight 0. ``--model_name_or_path``, ``--dataset_name``, ``--reward_model_name_or_path`` and
``--reward_funcs`` (dotted import paths, as TRL's CLI takes them) replace each part; ``--use_peft`` gives LoRA
(TRL's ``get_peft_config``). Every run writes the results contract: ``log_history.jsonl`` while training
(``ResultsCallback``) and ``metrics.json`` at the end, with the final training metrics and a held-out evaluation of
the policy before and after training (mean reward per function, KL to the initial policy, sample completions).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback
from trl import ScriptArguments, TrlParser

from .model_card import RecipeCard, lora_settings, settings_from
from .objectives import kl_k1, kl_k3
from .results import ResultsCallback, write_metrics
from .reward_guard import RewardFault, attach_reward_guard
from .reference import Reference, ReferencePolicy, reference_model, resolve_reference
from .sampling import completion_mask, per_token_logps, policy_eos_ids, sample_policy
from .validation import (
    DataValidationError,
    InputError,
    check_prompt_lengths,
    check_prompt_rows,
    model_context_length,
    require_existing_path,
    validate_grpo_args,
    validated_reward_func,
)

logger = logging.getLogger(__name__)

# --monitor names -> the hf_rlhf_ext.callbacks class each one attaches
MONITORS = {
    "overoptimization": "OveroptimizationCallback",
    "kl": "KLToReferenceCallback",
    "advantages": "GroupAdvantageCheckCallback",
    "grad_variance": "GradientVarianceCallback",
}
# With --use_peft and no learning rate given, the RL recipes train LoRA at this multiple of their full-weight default:
# on the lab PPO recipe, LoRA (r=16) at 1e-4 stays at the initial policy (KL ≈ 0); at 1e-3 it learns as full weights do.
LORA_LEARNING_RATE_MULTIPLIER = 10.0

__all__ = [
    "RLScriptArguments",
    "RLSetup",
    "cpu_parser_defaults",
    "apply_cpu_defaults",
    "load_lab",
    "resolve_policy",
    "load_prompt_datasets",
    "import_reward_func",
    "build_reward_funcs",
    "prepare_rl_run",
    "make_trainer",
    "make_recipe_parser",
    "read_lab_config",
    "shipped_config_path",
    "read_shipped_config",
    "check_lab_keys",
    "RecipeParser",
    "MONITORS",
    "parse_monitors",
    "add_monitors",
    "LORA_LEARNING_RATE_MULTIPLIER",
    "RecipeCard",
    "write_run_card",
    "recipe_command",
    "log_evaluation",
    "outputs_line",
    "evaluate_policy",
    "train_and_report",
    "summary_text",
    "cli_main",
]


@dataclass
class RLScriptArguments(ScriptArguments):
    """Script arguments shared by the RL recipes (on top of TRL's ``ScriptArguments``: ``dataset_name``,
    ``dataset_config``, ``dataset_train_split``, ``dataset_test_split``).

    Args:
        lab_dir: the lab directory (put there if missing); default: ``$HF_RLHF_EXT_LAB_DIR``, else the cached default
            lab. The same directory as ``hf-rlhf-ext lab build --lab_dir``.
        reward_model_name_or_path: a reward model (``AutoModelForSequenceClassification``, ``num_labels=1``) to
            optimise; default on the lab: the lab's proxy reward model.
        reward_funcs: reward functions as dotted import paths (``my_pkg.rewards.fn``) or names in ``trl.rewards``.
        track_gold: on the lab, add the gold reward with weight 0 (logged as ``rewards/gold_reward/mean``, not
            optimised). Reward weights come from the training config's ``reward_weights`` (main functions first).
        num_eval_prompts: held-out completions evaluated before and after training (0 disables the evaluation);
            the test prompts are cycled when this exceeds the test split (several samples per prompt).
        eval_sampling: "sample" (temperature 1: the KL to the initial policy is then a true KL estimate) or "greedy".
        num_sample_completions: sample completions stored in ``metrics.json`` before and after training.
    """

    lab_dir: str | None = field(
        default=None, metadata={"help": "Lab directory (default: $HF_RLHF_EXT_LAB_DIR, else the cached default lab)."}
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model to optimise (default on the lab: its proxy RM)."}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Reward functions: dotted import paths or names in trl.rewards."}
    )
    track_gold: bool = field(default=True, metadata={"help": "On the lab, log the gold reward with weight 0."})
    num_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for the before/after evaluation."})
    eval_sampling: str = field(default="sample", metadata={"help": "'sample' (temperature 1) or 'greedy'."})
    num_sample_completions: int = field(default=4, metadata={"help": "Sample completions kept in metrics.json."})
    monitor: str = field(
        default="none",
        metadata={"help": "Callbacks to attach, comma-separated: " + ", ".join(MONITORS) + "; 'auto' = the cheap ones "
                  "that apply to this run; 'none'."},
    )
    monitor_every_n_steps: int = field(default=10, metadata={"help": "Measure every N optimizer steps (kl, "
                                                                     "advantages, grad_variance, overoptimization)."})
    monitor_num_samples: int | None = field(
        default=None, metadata={"help": "Held-out completions per KL measurement (default: one generation batch)."}
    )
    monitor_save_peak: bool = field(
        default=False, metadata={"help": "overoptimization: save the policy at each new gold peak to <out>/gold_peak."}
    )
    monitor_min_delta: float = field(
        default=0.05,
        metadata={"help": "overoptimization: how far the smoothed gold must fall below its peak to count (a smaller "
                          "dip is sampling noise; ≈ 1.5 standard errors on the lab's logged batches)."},
    )
    monitor_stop_on_overoptimization: bool = field(
        default=False, metadata={"help": "overoptimization: stop training once gold falls while the proxy rises."}
    )
    # the command line the recipe was parsed from (set by the recipe parser; shown in the model card)
    cli_args: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.eval_sampling not in ("sample", "greedy"):
            raise ValueError(f"eval_sampling must be 'sample' or 'greedy', got {self.eval_sampling!r}")
        if self.num_eval_prompts < 0:
            raise ValueError("num_eval_prompts must be >= 0")
        parse_monitors(self.monitor)  # an unknown name fails here, before any model is loaded


@dataclass
class RLSetup:
    """Everything a recipe hands to its trainer, plus what the evaluation needs."""

    model: str
    tokenizer: Any
    train_dataset: Any
    eval_prompts: list
    reward_funcs: list
    reward_weights: list[float]
    eval_rewards: dict[str, Callable]
    peft_config: Any
    callbacks: list
    lab: Any = None
    on_lab: bool = False


def cpu_parser_defaults() -> dict[str, Any]:
    """Parser defaults for machines without CUDA: ``use_cpu`` (without it, CPU ranks launched by accelerate do not join
    a process group and each trains alone), and bf16 / gradient checkpointing off: TRL configs default to both, and
    ``TrainingArguments`` refuses bf16 on such a machine before any recipe code runs. Checkpointing is turned off under
    its current name (``activation_checkpointing``; ``gradient_checkpointing`` left unset, which transformers
    mirrors from it without a deprecation warning). Explicit flags still win."""
    if torch.cuda.is_available():
        return {}
    return {"bf16": False, "fp16": False, "activation_checkpointing": False, "gradient_checkpointing": None,
            "use_cpu": True}


def apply_cpu_defaults(training_args: Any) -> None:
    """bf16 and gradient checkpointing off without CUDA (TRL defaults both on; on CPU they fail or crawl)."""
    if not torch.cuda.is_available():
        if getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False):
            logger.info("No CUDA: training in float32 (bf16/fp16 off).")
        training_args.bf16 = False
        training_args.fp16 = False
        training_args.gradient_checkpointing = False


def load_lab(script_args: RLScriptArguments):
    """The lab in ``--lab_dir`` / ``$HF_RLHF_EXT_LAB_DIR`` (put there if missing), else the cached default lab. A
    ``--lab_dir`` whose parent folder does not exist is refused (a typo should not create a tree of folders)."""
    from .lab import open_lab

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


def load_prompt_datasets(script_args: RLScriptArguments, lab: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """(train, test) prompt data sets, each with a ``prompt`` column and usable prompts (validated). Default: the
    lab's prompts. A ``--dataset_name`` without the test split gets ``num_eval_prompts`` held out of its train split."""
    if script_args.dataset_name:
        from .data import load_dataset_dict

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
    return train, test


def import_reward_func(name: str) -> Callable:
    """A reward function from a dotted import path (``pkg.module.fn``) or a name in ``trl.rewards``.

    Only the module named is imported, and nothing else is tried. The working directory is importable during that
    import only, and after the installed packages (a file there cannot shadow one of them for the rest of the run).
    The function is returned as it is: the trainer's ``RewardGuard`` checks its values.
    """
    if "." not in name:
        import trl.rewards

        if not hasattr(trl.rewards, name):
            raise InputError(f"Unknown reward function {name!r}: give a dotted import path (my_rewards.length_reward) "
                             "or a name in trl.rewards.")
        return getattr(trl.rewards, name)
    if not all(part.isidentifier() for part in name.split(".")):
        raise InputError(f"--reward_funcs {name!r} is not a dotted import path (module.function).")
    module_path, attr = name.rsplit(".", 1)
    module = _import_from_cwd(module_path, name)
    if not hasattr(module, attr):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(f"--reward_funcs {name!r}: module {module_path!r} ({getattr(module, '__file__', '?')}) has "
                         f"no attribute {attr!r}; its public callables are {public}.")
    func = getattr(module, attr)
    if not callable(func):
        raise InputError(f"--reward_funcs {name!r} is a {type(func).__name__}, not a function.")
    return func


def _import_from_cwd(module_path: str, name: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        raise InputError(f"--reward_funcs {name!r}: cannot import module {module_path!r} ({exc}). Give the dotted path "
                         "of an installed module, or of a .py file in the working directory, and a function in it.") \
            from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def build_reward_funcs(
    script_args: RLScriptArguments, training_args: Any, lab: Any = None, on_lab: bool = False
) -> tuple[list, list[float], dict[str, Callable]]:
    """(reward functions, weights, functions for the held-out evaluation by name).

    Main rewards: ``--reward_model_name_or_path`` and ``--reward_funcs``; the lab's proxy RM when neither is given.
    Reward models are wrapped in ``rewards.RewardModelFunction`` (re-tokenised with their own tokenizer, EOS shown
    where the policy emitted it). With ``track_gold`` on the lab the gold reward is appended with weight 0.
    ``training_args.reward_weights`` may name the main weights only (the 0 is appended) or all of them.
    """
    from .rewards import RewardModelFunction

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
        from .lab import gold_reward

        funcs.append(gold_reward)
        if len(weights) == n_main:
            weights.append(0.0)
    if len(weights) != len(funcs):
        raise InputError(f"{len(weights)} reward_weights for {len(funcs)} reward functions ({_names(funcs)}): give "
                         "one weight per function (or per main function: the tracked gold then gets 0).")
    training_args.reward_weights = weights
    # Training scores through the trainer's RewardGuard; the held-out evaluation refuses NaN outright.
    eval_rewards = {_name(f): f if hasattr(f, "model") else validated_reward_func(f) for f in funcs}
    return funcs, weights, eval_rewards


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
    train, test = load_prompt_datasets(script_args, lab, seed=training_args.seed)
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
    from .lab.build import is_complete

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
def parse_monitors(value: str | Sequence[str] | None) -> list[str] | None:
    """The monitor names in ``--monitor`` ("a,b", or a YAML list); None for "auto", [] for "none"."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip() for n in names if n and n.strip()]
    if names == ["auto"]:
        return None
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in MONITORS]
    if unknown:
        raise InputError(f"Unknown --monitor {', '.join(unknown)}: choose among {', '.join(MONITORS)} "
                         "(comma-separated), 'auto' or 'none'.")
    return names


def _uses_trl_group_advantages(trainer: Any) -> bool:
    """GRPO/RLOO computing TRL's own group advantages (PPO and REINFORCE compute theirs: nothing to check)."""
    from trl import GRPOTrainer, RLOOTrainer

    return any(type(trainer)._generate_and_score_completions is base._generate_and_score_completions
               for base in (GRPOTrainer, RLOOTrainer))


def _monitor(name: str, trainer: Any, setup: RLSetup, script_args: RLScriptArguments) -> Any:
    """One callback, built with the recipe's settings; raises ValueError when it does not apply to this run."""
    from . import callbacks

    every = script_args.monitor_every_n_steps
    if name == "overoptimization":
        return callbacks.OveroptimizationCallback(
            trainer, mode="logs", every_n_steps=every, save_peak=script_args.monitor_save_peak,
            min_delta=script_args.monitor_min_delta,
            stop_on_overoptimization=script_args.monitor_stop_on_overoptimization,
        )
    if name == "kl":
        if not setup.eval_prompts:
            raise ValueError("the KL monitor samples held-out prompts, and this run has none (num_eval_prompts 0)")
        return callbacks.KLToReferenceCallback(trainer, setup.eval_prompts, every_n_steps=every,
                                               num_samples=script_args.monitor_num_samples)
    if name == "advantages":
        if not _uses_trl_group_advantages(trainer):
            raise ValueError(f"{type(trainer).__name__} does not compute TRL's group advantages")
        return callbacks.GroupAdvantageCheckCallback(trainer, every_n_steps=every)
    return callbacks.GradientVarianceCallback(trainer, every_n_steps=every)


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


def read_lab_config(path: Any) -> dict[str, Any]:
    """A recipe's lab settings from its YAML file (``recipes/configs/<name>_lab.yaml``), the one place they are
    written: the recipe's parser takes them as its defaults, and ``--config`` the same file reproduces a run.
    ``path``: a file path, or a ``Traversable`` (``shipped_config_path``)."""
    import yaml
    from pathlib import Path

    source = path if hasattr(path, "read_text") else Path(path)
    values = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}.")
    return values


def shipped_config_path(name: str) -> Any:
    """``configs/<name>`` of the recipes package, wherever it is: ``recipes/configs/`` in a checkout,
    ``hf_rlhf_ext/recipes/configs/`` in an installed wheel (its package data). The library's experiments read their
    lab defaults from there, so that the YAML file is their one copy."""
    from importlib.resources import files

    from .cli import recipes_package

    path = files(recipes_package()) / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"No shipped config {name!r} in {files(recipes_package()) / 'configs'}: the package "
                                "is incomplete; reinstall hf-rlhf-ext (its recipes/configs/*.yaml are package data).")
    return path


def read_shipped_config(name: str) -> dict[str, Any]:
    """The lab settings of the shipped ``configs/<name>`` (``read_lab_config`` of ``shipped_config_path``)."""
    return read_lab_config(shipped_config_path(name))


def check_lab_keys(defaults: dict[str, Any], classes: Sequence[type]) -> None:
    """Refuses lab settings that no argument class of the parser has (a typo in a YAML file would else be ignored)."""
    import dataclasses

    unknown = sorted(set(defaults) - {f.name for cls in classes for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"Recipe default(s) {unknown} are not fields of {[c.__name__ for c in classes]}.")


def make_recipe_parser(script_args_cls: type, config_cls: type, defaults: dict[str, Any],
                       lora_learning_rate_multiplier: float | None = LORA_LEARNING_RATE_MULTIPLIER):
    """A ``TrlParser`` (so ``--config file.yaml`` works) over (script args, trainer config, ``ModelConfig``) with the
    recipe's lab defaults (``read_lab_config``) and the CPU defaults; explicit flags and config files override both.
    With ``--use_peft`` and no learning rate in the flags or the config file, the learning rate is multiplied by
    ``lora_learning_rate_multiplier`` (None: kept)."""
    from trl import ModelConfig

    classes = (script_args_cls, config_cls, ModelConfig)
    check_lab_keys(defaults, classes)
    parser = RecipeParser(classes, lora_learning_rate_multiplier=lora_learning_rate_multiplier)
    parser.set_defaults(**defaults, **cpu_parser_defaults())
    return parser


#: The command a recipe was started with when not as its script (``hf-rlhf-ext ppo``); see :func:`launched_as`.
_LAUNCHER: list[str] = []


@contextlib.contextmanager
def launched_as(command: str):
    """Recipes run inside this context name ``command`` in their usage line and model card (the console entry point
    runs them as modules, whose ``sys.argv[0]`` is the module's file)."""
    _LAUNCHER.append(command)
    try:
        yield
    finally:
        _LAUNCHER.pop()


class RecipeParser(TrlParser):
    """``TrlParser`` that remembers the command line (for the model card) and applies the LoRA learning-rate rule,
    which needs to know whether the learning rate was given (a flag or a config key) or is the recipe's default."""

    def __init__(self, dataclass_types, lora_learning_rate_multiplier: float | None = None, **kwargs):
        if _LAUNCHER:
            kwargs.setdefault("prog", _LAUNCHER[-1])
        super().__init__(dataclass_types, **kwargs)
        self.lora_learning_rate_multiplier = lora_learning_rate_multiplier
        self._config_keys: set[str] = set()

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        self._config_keys |= set(kwargs)
        return super().set_defaults_with_config(**kwargs)

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        argv = list(sys.argv[1:] if args is None else args)
        outputs = super().parse_args_and_config(argv, *rest, **kwargs)
        given = self._config_keys | {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
        if hasattr(outputs[0], "cli_args"):
            outputs[0].cli_args = argv
        if (self.lora_learning_rate_multiplier and len(outputs) >= 3 and getattr(outputs[2], "use_peft", False)
                and "learning_rate" not in given):
            training_args = outputs[1]
            training_args.learning_rate *= self.lora_learning_rate_multiplier
            logger.info("LoRA: learning rate %.3g (%g x the full-weight default; set --learning_rate to choose).",
                        training_args.learning_rate, self.lora_learning_rate_multiplier)
        return outputs


# ----------------------------------------------------------------------------------------------------------------------
# Errors on the command line
# ----------------------------------------------------------------------------------------------------------------------
#: exceptions that mean bad input, or a fault of the user's reward function: one line on stderr, no traceback
USER_ERRORS = (InputError, RewardFault, FileNotFoundError, NotADirectoryError, IsADirectoryError)
#: a ValueError raised in these functions comes from checking the command line or a config's settings
_PARSING_FRAMES = {"__post_init__", "parse_args_into_dataclasses", "parse_args_and_config", "parse_yaml_file",
                   "parse_dict"}


def is_user_error(exc: BaseException) -> bool:
    """Bad input or a reward fault (reported in one line) rather than a bug (reported with its traceback)."""
    if isinstance(exc, USER_ERRORS):
        return True
    if isinstance(exc, ValueError):
        frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
        return bool(frames & _PARSING_FRAMES)
    return False


def cli_main(entry: Callable[[], Any]) -> Any:
    """Runs a recipe's ``main`` for the command line: bad input and reward faults print one line on stderr
    (``<script>: error: ...``, from the first process only) and exit with code 2 (input) or 1 (a reward fault);
    anything else is a bug and keeps its traceback. Under ``accelerate launch``, add ``-q`` to drop the launcher's
    own traceback of the failed child."""
    try:
        return entry()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(exc, RewardFault) else 2) from None


# ----------------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------------------------
def _prompt_texts(prompts: Sequence[Any], tokenizer: Any) -> list[str]:
    if prompts and isinstance(prompts[0], list):  # conversational
        return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return list(prompts)


@torch.no_grad()
def evaluate_policy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    reward_funcs: dict[str, Callable],
    max_new_tokens: int,
    sampling: str = "sample",
    reference: Reference | None = None,
    batch_size: int = 32,
    seed: int = 0,
    num_samples: int = 4,
) -> dict[str, Any]:
    """Samples one completion per held-out prompt (:func:`hf_rlhf_ext.sampling.sample_policy`, at temperature 1, or
    greedy) and scores it with every reward function.

    Returns ``{"<name>": mean reward, ..., "eos_rate", "mean_length", "kl_to_reference" (sequence k1, sampled
    completions only, when ``reference`` is given: a model, ``"disable_adapter"`` for the same PEFT model with its
    adapters disabled, or a trainer's :class:`~hf_rlhf_ext.reference.ReferencePolicy`), "kl_k3_to_reference" (the same
    with k3), "samples": [...]}``.
    """
    if not prompts:
        return {}
    eos_ids = policy_eos_ids(model, tokenizer)
    completion_ids, kl = _sample_for_eval(model, tokenizer, prompts, max_new_tokens, sampling == "sample", reference,
                                          batch_size, seed, eos_ids)
    completions: list[Any] = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    result: dict[str, Any] = {}
    for name, func in reward_funcs.items():
        values = func(prompts=list(prompts), completions=completions, completion_ids=completion_ids)
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        result[name] = sum(finite) / len(finite) if finite else None
    result["eos_rate"] = sum(bool(ids) and ids[-1] in eos_ids for ids in completion_ids) / len(completion_ids)
    result["mean_length"] = sum(len(ids) for ids in completion_ids) / len(completion_ids)
    if kl:
        result["kl_to_reference"] = sum(k1 for k1, _ in kl) / len(kl)
        result["kl_k3_to_reference"] = sum(k3 for _, k3 in kl) / len(kl)
    result["samples"] = [
        {"prompt": p, "completion": c} for p, c in zip(list(prompts)[:num_samples], completions[:num_samples])
    ]
    return result


def _sample_for_eval(model, tokenizer, prompts, max_new_tokens, sample, reference, batch_size, seed, eos_ids):
    """(completion ids cut after the first EOS, [(k1, k3)] per completion when sampled with a reference). The
    model's training mode and the caller's CPU random state are restored."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    texts = _prompt_texts(prompts, tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completion_ids, kl = [], []
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            tokens, logps = sample_policy(
                model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, temperature=1.0,
                pad_token_id=pad_id, eos_token_ids=eos_ids, greedy=not sample,
            )
            mask = completion_mask(tokens, eos_ids)
            completion_ids.extend(row[m.bool()].tolist() for row, m in zip(tokens, mask))
            if reference is not None and sample:
                kl.extend(_sequence_kl(model, reference, enc, tokens, mask, logps))
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return completion_ids, kl


def _sequence_kl(model, reference, enc, tokens, mask, logps) -> list[tuple[float, float]]:
    """(k1, k3) summed over each sampled completion: k1 = log π − log π_ref and k3 = eˣ − 1 − x with
    x = log π_ref − log π, both unbiased for KL(π‖π_ref) at temperature 1; k3 is ≥ 0 and has the lower variance.
    log π comes with the samples; log π_ref from one forward pass of the reference."""
    with reference_model(model, reference) as ref:
        ref_logps = per_token_logps(ref, enc["input_ids"], enc["attention_mask"], tokens, mask)
    m = mask.to(logps.dtype)
    k1, k3 = (kl_k1(logps, ref_logps) * m).sum(dim=1), (kl_k3(logps, ref_logps) * m).sum(dim=1)
    return [(float(a), float(b)) for a, b in zip(k1, k3)]


def _reference_for_eval(trainer: Any) -> ReferencePolicy | None:
    """The initial policy, as every π_ref of this package is found (:func:`hf_rlhf_ext.reference.resolve_reference`:
    the adapter-disabled PEFT model or the trainer's reference model); None without one (no copy is made)."""
    return resolve_reference(trainer, allow_copy=False, who="the held-out evaluation")


def summary_text(metrics: dict[str, Any]) -> str:
    """A few console lines for a person: each reward before -> after on held-out prompts, the KL to the initial
    policy (k3: never negative, lower variance than k1, which stays in ``metrics.json`` as ``kl_after``), and sample
    completions before and after (the numbers themselves live in ``metrics.json``)."""
    lines = ["", f"held-out evaluation ({metrics.get('num_eval_prompts', 0)} completions, {metrics.get('eval_sampling')}):"]
    for name in metrics.get("reward_funcs", []):
        if f"{name}_before" in metrics:
            lines.append(f"  {name:<24} {metrics[f'{name}_before']:+.3f} -> {metrics[f'{name}_after']:+.3f}")
    if "kl_k3_after" in metrics:
        lines.append(f"  {'KL to initial policy':<24} {metrics['kl_k3_after']:.3f} nats per completion (k3)")
    before, after = metrics.get("samples_before", []), metrics.get("samples_after", [])
    for b, a in zip(before, after):
        lines += [f"  prompt: {b['prompt']}", f"    before: {b['completion']}", f"    after:  {a['completion']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Model card of an RL recipe's output folder
# ----------------------------------------------------------------------------------------------------------------------
def recipe_command(script: str, cli_args: list[str] | None) -> str:
    """The command line that reproduces a recipe run (``cli_args``: as parsed; None when run from Python)."""
    import shlex

    if cli_args is None:
        return f"python {script}  # run from Python: the settings are listed below"
    launcher = _LAUNCHER[-1] if _LAUNCHER else f"accelerate launch {script}"
    return " ".join([launcher, *(shlex.quote(a) for a in cli_args)])


def _result_rows(metrics: dict[str, Any]) -> list[tuple]:
    before, after = metrics["eval_before"], metrics["eval_after"]
    rows: list[tuple] = []
    for name, weight in zip(metrics["reward_funcs"], metrics["reward_weights"]):
        role = "tracked, weight 0" if weight == 0 else f"optimised, weight {weight:g}"
        rows.append((f"held-out {name} ({role})", before.get(name), after.get(name)))
    if "kl_k3_to_reference" in after:
        rows.append(("KL to the initial policy, k3 (nats per completion)", 0.0, after["kl_k3_to_reference"]))
        rows.append(("KL to the initial policy, k1 (nats per completion)", 0.0, after["kl_to_reference"]))
    rows += [("completions ending with EOS", before.get("eos_rate"), after.get("eos_rate")),
             ("mean completion length (tokens)", before.get("mean_length"), after.get("mean_length"))]
    return rows


def write_run_card(trainer: Any, setup: RLSetup, script_args: RLScriptArguments, training_args: Any,
                   card: RecipeCard, metrics: dict[str, Any]) -> str:
    """Writes the training-curve plot and ``<output_dir>/README.md`` (a ``huggingface_hub.ModelCard``); returns the
    card's path. Called after ``save_model``, so it replaces the template PEFT writes for an adapter."""
    from .callbacks.overoptimization import PLOT_FILE as OVEROPTIMIZATION_PLOT
    from .model_card import CARD_FILE, RunCard, hub_id_or_none, load_snippet, write_model_card
    from .plots import plot_training_curves

    out = training_args.output_dir
    plot_training_curves(trainer.state.log_history, os.path.join(out, "training_curves.png"), title=card.method)
    repo = _hub_repo_id(trainer, training_args) if training_args.push_to_hub else None
    base = "the lab's SFT policy" if setup.on_lab and setup.model == getattr(setup.lab, "policy_path", None) \
        else f"`{hub_id_or_none(setup.model) or os.path.basename(os.path.normpath(setup.model))}`"
    data = "the lab's prompts" if setup.on_lab else f"`{script_args.dataset_name}`"
    dataset_id = hub_id_or_none(script_args.dataset_name)
    optimised = [name for name, weight in zip(metrics["reward_funcs"], metrics["reward_weights"]) if weight]
    run = RunCard(
        title=(repo or os.path.basename(os.path.abspath(out))).split("/")[-1],
        summary=(f"{card.method} ({'a LoRA adapter on ' if setup.peft_config else ''}{base}), trained on {data} for "
                 f"{metrics['global_step']} steps, rewarded by {', '.join(optimised)}."),
        recipe=card.script,
        command=recipe_command(card.script, script_args.cli_args),
        tags=card.tags,
        base_model=hub_id_or_none(setup.model),
        datasets=[dataset_id] if dataset_id else [],
        library_name="peft" if setup.peft_config is not None else "transformers",
        hyperparameters={**settings_from(card.hyperparameters, training_args, script_args),
                         **lora_settings(setup.peft_config)},
        metrics=_result_rows(metrics),
        metrics_note=(f"Measured on {metrics['num_eval_prompts']} held-out completions ({metrics['eval_sampling']}), "
                      "before and after training; all numbers are in `metrics.json`, the curves in "
                      "`log_history.jsonl`."),
        plots={"training_curves.png": "Reward and KL on the training batches against the optimizer step",
               OVEROPTIMIZATION_PLOT: "Over-optimisation monitor: proxy and gold rewards and KL, gold peak marked"},
        usage=load_snippet(repo or out, "peft" if setup.peft_config is not None else "causal_lm",
                           with_critic=os.path.isdir(os.path.join(out, "value_model"))),
    )
    write_model_card(out, run)
    return os.path.join(out, CARD_FILE)


def log_evaluation(trainer: Any, evaluation: dict[str, Any]) -> None:
    """Sends the held-out evaluation's numbers to the trainer's trackers (``report_to``: TensorBoard, Trackio, ...)
    and to ``log_history.jsonl`` as ``eval_<name>`` at the current step (``eval/<name>`` in TensorBoard): the
    evaluation before training lands at step 0, the one after at the last step."""
    logs = {f"eval_{k}": float(v) for k, v in evaluation.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if not logs:
        return
    trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ResultsCallback):
            callback.flush()  # after training no later event would write the record


class _LogAtTrainBegin(TrainerCallback):
    """Logs an evaluation made before training once the trainer's trackers exist: a tracker opened earlier writes
    somewhere else (TensorBoard: ``./runs`` instead of the run's logging directory)."""

    def __init__(self, trainer: Any, evaluation: dict[str, Any]):
        self.trainer, self.evaluation = trainer, evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        log_evaluation(self.trainer, self.evaluation)


def train_and_report(
    trainer: Any,
    setup: RLSetup,
    script_args: RLScriptArguments,
    training_args: Any,
    card: RecipeCard | None = None,
    monitors: dict[str, Any] | None = None,
    extra_metrics: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluates, trains, evaluates again (both evaluations also go to the trackers), saves (policy, and the critic
    for PPO), writes ``metrics.json`` (with ``extra_metrics()`` and what the ``monitors`` found), the training-curve
    plot and the model card (``card``), pushes the folder to the Hub when asked, and prints where everything is.
    Returns the metrics written."""
    accelerator = trainer.accelerator
    max_new = getattr(training_args, "max_completion_length", 32) or 32
    evaluate = accelerator.is_main_process and setup.eval_prompts

    def run_eval(with_reference: bool) -> dict[str, Any]:
        if not evaluate:
            return {}
        model = accelerator.unwrap_model(trainer.model)
        return evaluate_policy(
            model, setup.tokenizer, setup.eval_prompts, setup.eval_rewards, max_new_tokens=max_new,
            sampling=script_args.eval_sampling, reference=_reference_for_eval(trainer) if with_reference else None,
            seed=training_args.seed, num_samples=script_args.num_sample_completions,
        )

    before = run_eval(with_reference=False)
    accelerator.wait_for_everyone()
    # logged once the trackers are set up (their on_train_begin), at step 0 (or the step a resumed run starts from)
    trainer.add_callback(_LogAtTrainBegin(trainer, before))
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = run_eval(with_reference=True)
    log_evaluation(trainer, after)
    accelerator.wait_for_everyone()  # the evaluation runs on the main process only
    # no push from save_model: the folder is pushed once, with its card, below
    trainer.save_model(training_args.output_dir, _internal_call=True)

    metrics = _run_metrics(trainer, setup, script_args, train_result, before, after)
    if monitors:
        metrics["monitors"] = monitor_results(monitors)
    if extra_metrics is not None:
        metrics.update(extra_metrics())
    if accelerator.is_main_process:
        write_metrics(training_args.output_dir, metrics)
        print(summary_text(metrics))
        if card is not None:
            write_run_card(trainer, setup, script_args, training_args, card, metrics)
        if training_args.push_to_hub:
            from .model_card import push_folder

            push_folder(training_args.output_dir, _hub_repo_id(trainer, training_args), token=training_args.hub_token,
                        private=training_args.hub_private_repo, revision=training_args.hub_revision)
        print(outputs_line(training_args.output_dir, card is not None))
    accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()  # finishes the trackers and destroys the process group (transformers >= 5.18)
    return metrics


def _run_metrics(trainer, setup, script_args, train_result, before, after) -> dict[str, Any]:
    train_logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    metrics: dict[str, Any] = {
        "train": {**(train_logs[-1] if train_logs else {}), **train_result.metrics},
        "global_step": trainer.state.global_step,
        "eval_before": {k: v for k, v in before.items() if k != "samples"},
        "eval_after": {k: v for k, v in after.items() if k != "samples"},
        "samples_before": before.get("samples", []),
        "samples_after": after.get("samples", []),
        "on_lab": setup.on_lab,
        "reward_funcs": list(setup.eval_rewards),
        "reward_weights": setup.reward_weights,
        "num_eval_prompts": len(setup.eval_prompts),
        "eval_sampling": script_args.eval_sampling,
    }
    for name in setup.eval_rewards:
        if name in before and name in after:
            metrics[f"{name}_before"], metrics[f"{name}_after"] = before[name], after[name]
    if "kl_to_reference" in after:
        metrics["kl_after"] = after["kl_to_reference"]
        metrics["kl_k3_after"] = after["kl_k3_to_reference"]
    return metrics


def _hub_repo_id(trainer: Any, training_args: Any) -> str:
    """The repository ``Trainer`` created for ``--push_to_hub`` (``--hub_model_id``, or the output folder's name)."""
    return (getattr(trainer, "hub_model_id", None) or training_args.hub_model_id
            or os.path.basename(os.path.abspath(training_args.output_dir)))


def outputs_line(output_dir: str, with_card: bool = True, metrics_file: str = "metrics.json") -> str:
    """The one line a recipe ends with: where its outputs are."""
    card = f"model card {os.path.join(output_dir, 'README.md')}, " if with_card else ""
    return f"outputs: {output_dir} ({card}metrics {os.path.join(output_dir, metrics_file)})"

"""How a recipe reads its settings: the lab defaults written once in its YAML file (shipped in
``hf_rlhf_ext.recipes/configs``), the CPU defaults, ``TrlParser`` with ``--config``, the LoRA learning-rate rule, and
the command a recipe was started with."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
from typing import Any, Sequence

import torch
from trl import TrlParser


logger = logging.getLogger(__name__)


# With --use_peft and no learning rate given, the RL recipes train LoRA at this multiple of their full-weight default:
# on the lab PPO recipe, LoRA (r=16) at 1e-4 stays at the initial policy (KL ≈ 0); at 1e-3 it learns as full weights do.
LORA_LEARNING_RATE_MULTIPLIER = 10.0


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


def check_output_dir(outputs: Sequence[Any]) -> None:
    """Refuses an ``--output_dir`` that is an existing file before anything runs (else: a FileExistsError deep in
    the first save)."""
    from .validation import InputError

    for parsed in outputs:
        path = getattr(parsed, "output_dir", None)
        if isinstance(path, str) and os.path.isfile(path):
            raise InputError(f"--output_dir {path!r} is a file, not a folder: give a directory (it is created if "
                             "missing) or remove the file.")


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


def launch_command(script: str) -> str:
    """How this run was started, as typed (the card's line that reproduces it): ``hf-rlhf-ext <name>`` from the
    console entry point, else ``python`` — or ``accelerate launch``, whose launcher sets ``ACCELERATE_DYNAMO_BACKEND``
    — with the script as given on the command line (``-m <module>`` for a module). ``script`` stands in when the
    recipe runs inside another program (a test, a notebook)."""
    import shlex

    if _LAUNCHER:
        return _LAUNCHER[-1]
    prefix = "accelerate launch" if "ACCELERATE_DYNAMO_BACKEND" in os.environ else "python"
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != os.path.basename(script):
        return f"{prefix} {script}"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"{prefix} -m {spec.name}" if spec is not None and spec.name else f"{prefix} {shlex.quote(argv0)}"


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
        try:
            outputs = super().parse_args_and_config(argv, *rest, **kwargs)
        except ValueError as err:
            if "arguments are not used by the HfArgumentParser" not in str(err):
                raise
            raise self.unknown_flags_error(str(err)) from None
        check_output_dir(outputs)
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

    def unknown_flags_error(self, message: str) -> Exception:
        """One line naming each flag the parser does not know, with the closest known ones (a typo costs seconds);
        ``message``: HfArgumentParser's, which ends with the list of the strings it did not use."""
        import ast

        from .validation import InputError

        try:
            unused = [str(a) for a in ast.literal_eval(message[message.index("["):])]
        except (ValueError, SyntaxError):
            return InputError(message)
        flags = [a.split("=", 1)[0] for a in unused if a.startswith("-")]
        if not flags:
            return InputError(f"unexpected value(s) {unused}: each value follows its flag (--name value).")
        known = {o for o in self._option_string_actions if o.startswith("--")}
        spelled = sorted(o for o in known if "-" not in o[2:] or "--" + o[2:].replace("-", "_") not in known)
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag, spelled, n=2, cutoff=0.75)
            parts.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
        return InputError(f"unknown flag(s): {', '.join(parts)}; --help lists every flag.")

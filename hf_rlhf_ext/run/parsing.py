"""How a recipe reads its settings: the lab defaults written once in its YAML file (shipped in
``hf_rlhf_ext.recipes/configs``; the defaults on the lab only, TRL's elsewhere), the CPU defaults, ``TrlParser`` with
``--config``, the LoRA learning-rate rule, the line naming where a run's settings came from, and the command a recipe
was started with."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
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


class LabDefaults(dict):
    """The lab settings of one YAML file, with the file's name (``source``) for the line naming where settings came
    from."""

    def __init__(self, values: dict[str, Any], source: str = "lab YAML"):
        super().__init__(values)
        self.source = source


def read_lab_config(path: Any) -> LabDefaults:
    """A recipe's lab settings from its YAML file (``recipes/configs/<name>_lab.yaml``), the one place they are
    written: the recipe's parser takes them as its defaults on the lab only, and ``--config`` the same file reproduces
    a run. ``path``: a file path, or a ``Traversable`` (``shipped_config_path``)."""
    from pathlib import Path

    import yaml

    source = path if hasattr(path, "read_text") else Path(path)
    values = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}.")
    return LabDefaults(values, source=source.name)


RECIPES_PACKAGE = "hf_rlhf_ext.recipes"


def recipes_package() -> str:
    """Makes ``hf_rlhf_ext.recipes`` importable and returns its name. In a source checkout that is the top-level
    ``recipes/`` beside the package (the directory the wheel installs as the subpackage), registered on first use."""
    if RECIPES_PACKAGE in sys.modules:
        return RECIPES_PACKAGE
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            RECIPES_PACKAGE, checkout / "__init__.py", submodule_search_locations=[str(checkout)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[RECIPES_PACKAGE] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(RECIPES_PACKAGE)
    return RECIPES_PACKAGE


def shipped_config_path(name: str) -> Any:
    """``configs/<name>`` of the recipes package, wherever it is: ``recipes/configs/`` in a checkout,
    ``hf_rlhf_ext/recipes/configs/`` in an installed wheel (its package data). The library's experiments read their
    lab defaults from there, so that the YAML file is their one copy."""
    from importlib.resources import files

    path = files(recipes_package()) / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"No shipped config {name!r} in {files(recipes_package()) / 'configs'}: the package "
                                "is incomplete; reinstall hf-rlhf-ext (its recipes/configs/*.yaml are package data).")
    return path


def read_shipped_config(name: str) -> LabDefaults:
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
    CPU defaults, and the recipe's lab settings (``read_lab_config``) as defaults on the lab only (``on_lab``): off the
    lab a run starts from TRL's defaults. Explicit flags and config files override both. With ``--use_peft`` and no
    learning rate in the flags or the config file, the learning rate is multiplied by ``lora_learning_rate_multiplier``
    (None: kept)."""
    from trl import ModelConfig

    classes = (script_args_cls, config_cls, ModelConfig)
    check_lab_keys(defaults, classes)
    parser = RecipeParser(classes, lora_learning_rate_multiplier=lora_learning_rate_multiplier, lab_defaults=defaults)
    parser.set_defaults(**cpu_parser_defaults())
    return parser


def on_lab(namespace: Any) -> bool:
    """A run is on the lab when it names neither a model nor a dataset (``--lab_dir`` alone still means the lab)."""
    return not (getattr(namespace, "model_name_or_path", None) or getattr(namespace, "dataset_name", None))


def testbed_dir(namespace: Any) -> str | None:
    """The testbed a run on the lab is on (``--lab_dir``, else ``$HF_RLHF_EXT_LAB_DIR``, holding a testbed), or
    None when it is on the lab itself."""
    from ..lab.testbed_settings import LAB_DIR_ENV, saved_settings

    root = getattr(namespace, "lab_dir", None) or os.environ.get(LAB_DIR_ENV)
    return root if saved_settings(root) is not None else None


def testbed_defaults(root: str, fields: set[str]) -> dict[str, Any]:
    """The defaults of a run on the testbed in ``root`` for a parser of ``fields``: its build settings that the
    recipe has (``recipe_defaults``; the reward-model schedule for a parser that trains a reward model)."""
    from ..lab.testbed_settings import recipe_defaults

    values = recipe_defaults(root, trains_reward_model="center_rewards_coefficient" in fields) or {}
    return {k: v for k, v in values.items() if k in fields}


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_line(sources: dict[str, list[str]], lab: bool, lab_source: str, lora: str | None,
                  testbed: bool = False) -> str:
    """One line naming where a run's settings came from: ``sources`` maps a source (``command line``, a config file's
    name, the lab file, a testbed's build) to its keys; ``lora``: the LoRA learning-rate rule as applied, if it was;
    ``testbed``: the run is on a testbed, where the lab file does not apply."""
    parts = []
    for source, keys in sources.items():
        if keys:
            shown = ", ".join(sorted(keys)) if len(keys) <= 6 else f"{len(keys)} settings"
            parts.append(f"{source}: {shown}")
    if testbed:
        parts.append(f"on a testbed: {lab_source} NOT applied (its build settings, else TRL's defaults)")
    elif not lab:
        parts.append(f"off the lab: {lab_source} NOT applied (TRL's defaults)")
    if lora:
        parts.append(f"LoRA: {lora}")
    return "settings: " + ("; ".join(parts) if parts else "all defaults")


def check_output_dir(outputs: Sequence[Any]) -> None:
    """Refuses an ``--output_dir`` that is an existing file before anything runs (else: a FileExistsError deep in
    the first save)."""
    from ..validation import InputError

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


def lab_epilog(lora_learning_rate_multiplier: float | None) -> str:
    """The end of a recipe's ``--help``: which defaults apply where, and the LoRA rule when the recipe has one."""
    text = ("Defaults are TRL's (and the recipe's own). On the offline lab (no --model_name_or_path and no "
            "--dataset_name) the '(lab: ...)' values apply instead; --config files and flags override both. On a "
            "testbed (--lab_dir of `hf-rlhf-ext lab build --policy ...`) they do not: its build settings (reply "
            "length, temperature; the proxy's schedule for a reward model) are the defaults there. ")
    if lora_learning_rate_multiplier:
        text += (f"With --use_peft and no --learning_rate, the learning rate is {lora_learning_rate_multiplier:g} x "
                 "its default (LoRA). ")
    return text + "A run prints one 'settings:' line saying where its settings came from."


class RecipeParser(TrlParser):
    """``TrlParser`` that remembers the command line (for the model card), takes the lab settings as defaults on the
    lab only, applies the LoRA learning-rate rule (which needs to know whether the learning rate was given, as a flag
    or a config key, or is a default) and says once where the settings came from (``settings_line``)."""

    def __init__(self, dataclass_types, lora_learning_rate_multiplier: float | None = None,
                 lab_defaults: dict[str, Any] | None = None, **kwargs):
        if _LAUNCHER:
            kwargs.setdefault("prog", _LAUNCHER[-1])
        if lab_defaults:
            kwargs.setdefault("epilog", lab_epilog(lora_learning_rate_multiplier))
        super().__init__(dataclass_types, **kwargs)
        self.lora_learning_rate_multiplier = lora_learning_rate_multiplier
        self.lab_defaults = dict(lab_defaults or {})
        self.lab_source = getattr(lab_defaults, "source", "lab YAML")
        self._config_keys: set[str] = set()
        self._lab_applied: set[str] = set()
        self.on_lab: bool | None = None
        self.testbed: str | None = None  # the testbed directory a run on the lab is on
        self.settings: str | None = None
        self._note_lab_values_in_help()

    def _note_lab_values_in_help(self) -> None:
        """``--help`` shows TRL's defaults, and each lab setting's value next to it (``(lab: 24)``)."""
        for action in self._actions:
            if action.dest in self.lab_defaults and action.help is not None:
                value = _short(self.lab_defaults[action.dest]).replace("%", "%%")
                action.help = f"{action.help} (lab: {value})"

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        self._config_keys |= set(kwargs)
        return super().set_defaults_with_config(**kwargs)

    def parse_args_into_dataclasses(self, args=None, *rest, **kwargs):
        """Decides whether the run is on the lab from the command line and the config file, then parses with the lab
        settings as defaults there (flags and config keys still win); the parser's defaults are restored after."""
        self._lab_applied = set()
        if not self.lab_defaults:
            return super().parse_args_into_dataclasses(args, *rest, **kwargs)
        import argparse

        namespace, _ = argparse.ArgumentParser.parse_known_args(self, args=args)
        self.on_lab = on_lab(namespace)
        self.testbed = testbed_dir(namespace) if self.on_lab else None
        if not self.on_lab:
            return super().parse_args_into_dataclasses(args, *rest, **kwargs)
        defaults = testbed_defaults(self.testbed, {a.dest for a in self._actions}) if self.testbed \
            else self.lab_defaults
        lab = {k: v for k, v in defaults.items() if k not in self._config_keys}
        saved = {a.dest: a.default for a in self._actions if a.dest in lab}
        self._set_action_defaults(lab)
        self._lab_applied = set(lab)
        try:
            return super().parse_args_into_dataclasses(args, *rest, **kwargs)
        finally:
            self._set_action_defaults(saved)

    def _set_action_defaults(self, values: dict[str, Any]) -> None:
        for action in self._actions:
            if action.dest in values:
                action.default = values[action.dest]

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            outputs = super().parse_args_and_config(argv, *rest, **kwargs)
        except ValueError as err:
            if "arguments are not used by the HfArgumentParser" not in str(err):
                raise
            raise self.unknown_flags_error(str(err)) from None
        check_output_dir(outputs)
        flags = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")} - {"config"}
        given = self._config_keys | flags
        lora = self._apply_lora_rule(outputs, given)
        self.settings = self._settings(argv, flags, lora)
        if hasattr(outputs[0], "cli_args"):  # a recipe's own arguments: both go to its model card
            outputs[0].cli_args = argv
            outputs[0].settings_line = self.settings  # an attribute, not a setting of the run
        else:  # an experiment's arguments: its command line announces the line (``announce_settings``)
            with contextlib.suppress(AttributeError):
                outputs[0].settings_line = self.settings
        if args is None and self.lab_defaults:  # a run from the command line (not an experiment's inner parse)
            announce(self.settings)
        return outputs

    def _apply_lora_rule(self, outputs: Sequence[Any], given: set[str]) -> str | None:
        """With ``--use_peft`` and no learning rate given, the learning rate × the multiplier; what was done, or
        None."""
        if not (self.lora_learning_rate_multiplier and len(outputs) >= 3 and getattr(outputs[2], "use_peft", False)
                and "learning_rate" not in given):
            return None
        training_args = outputs[1]
        base = training_args.learning_rate
        training_args.learning_rate = float(f"{base * self.lora_learning_rate_multiplier:.12g}")  # 1e-5, not 9.99…e-6
        logger.info("LoRA: learning rate %g (%g x the default; set --learning_rate to choose).",
                    training_args.learning_rate, self.lora_learning_rate_multiplier)
        return (f"learning_rate {training_args.learning_rate:g} = {self.lora_learning_rate_multiplier:g} × {base:g} "
                "(set --learning_rate to choose)")

    def _settings(self, argv: Sequence[str], flags: set[str], lora: str | None) -> str:
        """``settings_line`` of the last parse: flags first, then the config file's keys, then the lab's."""
        from ..lab.testbed_settings import TESTBED_FILE

        fields = {a.dest for a in self._actions}
        config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "--config file"
        sources = {"command line": sorted(flags & fields),
                   os.path.basename(config): sorted((self._config_keys & fields) - flags),
                   (f"testbed defaults ({TESTBED_FILE})" if self.testbed else f"lab defaults ({self.lab_source})"):
                   sorted(self._lab_applied - flags)}
        return settings_line(sources, self.on_lab is not False, self.lab_source, lora, testbed=bool(self.testbed))

    def unknown_flags_error(self, message: str) -> Exception:
        """One line naming each flag the parser does not know, with the closest known ones (a typo costs seconds);
        ``message``: HfArgumentParser's, which ends with the list of the strings it did not use."""
        import ast

        from ..validation import InputError

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


_ANNOUNCED: set[str] = set()


def announce_settings(parsed: Any) -> None:
    """Prints the settings line of an experiment's parsed arguments (``settings_line``) once: an experiment parses
    its command line with an explicit argv, which announces nothing by itself."""
    line = getattr(parsed, "settings_line", None)
    if line:
        announce(line)


def announce(line: str) -> None:
    """Prints ``line`` to stderr once per process, on the main process only (rank 0 of a launch)."""
    if line in _ANNOUNCED or os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _ANNOUNCED.add(line)
    print(line, file=sys.stderr, flush=True)

"""A recipe's command line fails once, readably: bad input prints one line and exits 2, a reward fault names the file
its inputs were saved to and exits 1; a real bug keeps its one traceback. And it prints no warning the user cannot
act on."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from typing import Any, Callable

from ..reward_guard import RewardFault
from ..validation import InputError

logger = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """Training stopped by Ctrl-C; the message says where the run can resume from (exit code 130, as for SIGINT)."""


USER_ERRORS = (InputError, RewardFault, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
#: a ValueError raised in these functions comes from checking the command line or a config's settings
_PARSING_FRAMES = {"__post_init__", "parse_args_into_dataclasses", "parse_args_and_config", "parse_yaml_file",
                   "parse_dict"}


def is_user_error(exc: BaseException) -> bool:
    """Bad input or a reward fault (reported in one line) rather than a bug (reported with its traceback)."""
    if isinstance(exc, USER_ERRORS) or _is_lora_target_error(exc):
        return True
    if isinstance(exc, ValueError):
        frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
        return bool(frames & _PARSING_FRAMES)
    return False


def _is_lora_target_error(exc: BaseException) -> bool:
    """PEFT found none of ``--lora_target_modules`` in the model (its ``NoMatchingPeftModuleError``)."""
    return type(exc).__name__ == "NoMatchingPeftModuleError" and type(exc).__module__.startswith("peft")


def lora_target_names(model: Any) -> list[str]:
    """The names LoRA can target in ``model``: the last name of each linear / GPT-2 ``Conv1D`` layer, the output head
    left out (what ``--lora_target_modules`` matches)."""
    from torch import nn

    names = set()
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in ("lm_head", "score") and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            names.add(leaf)
    return sorted(names)


def _lora_target_message(exc: BaseException) -> str:
    """PEFT's message does not say what would match: the model it was adapting is in the traceback, so name its
    layers."""
    from torch import nn

    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    model = next((f.f_locals["model"] for f in reversed(frames) if isinstance(f.f_locals.get("model"), nn.Module)),
                 None)
    names = lora_target_names(model) if model is not None else []
    if not names:
        return f"--lora_target_modules: {exc}"
    return (f"--lora_target_modules: none of them is a layer of this model ({type(model).__name__}); its layers LoRA "
            f"can adapt are {names}: e.g. --lora_target_modules {names[0]}, or all-linear. (PEFT: {exc})")


def user_message(exc: BaseException) -> str:
    """The one line printed for bad input or a reward fault."""
    message = _lora_target_message(exc) if _is_lora_target_error(exc) else str(exc)
    return " ".join(message.split()) or type(exc).__name__


def _program() -> str:
    """The command the user typed: ``hf-rlhf-ext <name>`` from the console entry point (which runs the recipe as a
    module, so ``sys.argv[0]`` is the module's file), else the script's name."""
    from .parsing import _LAUNCHER

    return _LAUNCHER[-1] if _LAUNCHER else os.path.basename(sys.argv[0])


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even when a progress bar (the Trainer's) is still drawn there: tqdm
    clears the bar first and redraws it below, so the message is neither glued to the bar nor overwritten by it."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def cli_main(entry: Callable[[], Any]) -> Any:
    """Runs a recipe's ``main`` for the command line: bad input and reward faults print one line on stderr
    (``<script>: error: ...``, from the first process only) and exit with code 2 (input) or 1 (a reward fault);
    anything else is a bug and keeps its traceback. Under ``accelerate launch``, add ``-q`` to drop the launcher's
    own traceback of the failed child."""
    # TRL's own call of a transformers property renamed in 5.x: nothing a user of the recipe can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return entry()
    except (RunInterrupted, KeyboardInterrupt) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            _say(f"{_program()}: {exc or 'interrupted'}")
        raise SystemExit(130) from None
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            _say(f"{_program()}: error: {user_message(exc)}")
        raise SystemExit(1 if isinstance(exc, RewardFault) else 2) from None

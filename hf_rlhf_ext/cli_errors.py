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

from .reward_guard import RewardFault
from .validation import InputError

logger = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """Training stopped by Ctrl-C; the message says where the run can resume from (exit code 130, as for SIGINT)."""


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
    # TRL's own call of a transformers property renamed in 5.x: nothing a user of the recipe can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return entry()
    except (RunInterrupted, KeyboardInterrupt) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{os.path.basename(sys.argv[0])}: {exc or 'interrupted'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(exc, RewardFault) else 2) from None

"""Lazy re-exports: a package names its public API in one dict and imports a sub-module only when a name is used, so
``import hf_rlhf_ext`` (and the lab's tokenizer-only tools) does not pay for torch + transformers + trl."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, where ``exports`` maps a public name to the sub-module defining it
    (relative to ``package``, e.g. ``"trainers.ppo"``)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__

"""hf-rlhf-ext: the experiments of an RLHF chapter, real and measured, as thin extensions of TRL.

Sub-modules are imported lazily so that ``import hf_rlhf_ext`` stays cheap (tokenizer-only tools and the CLI do not pay
for torch + transformers + trl).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "write_metrics": "results",
    "read_metrics": "results",
    "read_log_history": "results",
    "ResultsCallback": "results",
    "DataValidationError": "validation",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["__version__"]

"""A gold judge for the testbed tests, importable by dotted path (``_testbed_judge.word_count``) while pytest runs:
a TRL reward function that scores a reply by its length in words, plus an optional ``bonus`` data set column."""

from __future__ import annotations

from typing import Any, Sequence


def _text(message: Any) -> str:
    if isinstance(message, str):
        return message
    return " ".join(m["content"] for m in message if m.get("role") == "assistant")


def word_count(prompts: Sequence[Any], completions: Sequence[Any], bonus: Sequence[float] | None = None,
               **kwargs: Any) -> list[float]:
    """Words / 10 of each reply, plus its prompt's ``bonus`` column when the data set has one."""
    extra = bonus if bonus is not None else [0.0] * len(completions)
    return [len(_text(c).split()) / 10 + float(b or 0.0) for c, b in zip(completions, extra)]

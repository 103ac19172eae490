"""The gold judge of the SmolLM2 testbed (docs/testbed.md): a programmatic customer-support grader with TRL's reward
function signature, importable as ``support_judge.helpful_reply`` from this folder.

Per reply (range -1.3 ... 1.3): +0.5 names the customer's item (the prompts' ``item`` column, which TRL passes as a
keyword argument); +0.5 offers a concrete remedy; +0.3 apologises or thanks; -0.5 rude; -0.01 per word over 60;
-0.3 unfinished (does not end a sentence: cut off by the length limit).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

REMEDIES = ("replace", "replacement", "refund", "return", "repair", "exchange", "ship", "send", "track", "cancel",
            "reimburse", "credit")
POLITE = ("sorry", "apolog", "thank")
RUDE = ("stupid", "your fault", "whatever", "deal with it", "not our problem")


def _text(message: Any) -> str:
    if isinstance(message, str):
        return message
    return " ".join(m["content"] for m in message if m.get("role") == "assistant")


def helpful_reply(prompts: Sequence[Any], completions: Sequence[Any], item: Sequence[str] | None = None,
                  **kwargs: Any) -> list[float]:
    scores = []
    for k, completion in enumerate(completions):
        text = _text(completion).strip()
        low = text.lower()
        words = re.findall(r"[a-z']+", low)
        score = 0.0
        if item is not None and item[k] and item[k].lower() in low:
            score += 0.5
        if any(w.startswith(REMEDIES) for w in words):
            score += 0.5
        if any(p in low for p in POLITE):
            score += 0.3
        if any(r in low for r in RUDE):
            score -= 0.5
        score -= 0.01 * max(0, len(words) - 60)
        if not text.endswith((".", "!", "?")):
            score -= 0.3
        scores.append(score)
    return scores

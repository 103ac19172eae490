"""The gold judge of the SmolLM2 testbed (docs/testbed.md): a programmatic customer-support grader with TRL's reward
function signature, importable as ``support_judge.helpful_reply`` from this folder.

Per reply (range -1.3 ... 1.3): +0.5 names the customer's item (the prompts' ``item`` column, which TRL passes as a
keyword argument); +0.5 offers a concrete remedy; +0.3 apologises or thanks; -0.5 rude; -0.01 per word over 60;
-0.3 unfinished (does not end a sentence: cut off by the length limit).

``support_judge.graded_reply`` is a second, graded judge (counts, not 0/1
features), so that two replies of one prompt rarely score the same: a gold tie makes the pair's label a coin flip
and caps any proxy's accuracy. Per reply:

* +0.5 names the customer's item (the prompts' ``item`` column, which TRL passes as a keyword argument), +0.2 more
  when it names it again;
* +0.3 per distinct concrete remedy (replace, refund, return, repair, ...), at most 3;
* +0.2 per distinct courtesy (sorry / apologise, thank, please, "happy to help"), at most 3;
* +0.05 per "you"/"your" (addresses the customer), at most 4;
* -0.5 rude;
* -0.02 per word over 40 (rambling);
* -0.3 unfinished (does not end a sentence: cut off by the length limit).

Range about -1.3 ... 2.4.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

REMEDIES = ("replace", "replacement", "refund", "return", "repair", "exchange", "ship", "send", "track", "cancel",
            "reimburse", "credit")
POLITE = ("sorry", "apolog", "thank")
REMEDY_STEMS = ("replac", "refund", "return", "repair", "exchang", "ship", "send", "track", "cancel", "reimburs",
                "credit")
COURTESIES = (("sorry", "apolog"), ("thank",), ("please",), ("happy to help", "glad to help"))
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


def grade(text: str, item: str | None = None) -> float:
    """The rubric above, for one reply."""
    text = text.strip()
    low = text.lower()
    words = re.findall(r"[a-z']+", low)
    score = 0.0
    mentions = low.count(item.lower()) if item else 0
    score += 0.5 * (mentions >= 1) + 0.2 * (mentions >= 2)
    score += 0.3 * min(3, sum(any(w.startswith(r) for w in words) for r in REMEDY_STEMS))
    score += 0.2 * min(3, sum(any(c in low for c in group) for group in COURTESIES))
    score += 0.05 * min(4, sum(w in ("you", "your") for w in words))
    score -= 0.5 * any(r in low for r in RUDE)
    score -= 0.02 * max(0, len(words) - 40)
    score -= 0.3 * (not text.endswith((".", "!", "?")))
    return round(score, 6)


def graded_reply(prompts: Sequence[Any], completions: Sequence[Any], item: Sequence[str] | None = None,
                 **kwargs: Any) -> list[float]:
    return [grade(_text(c), item[k] if item is not None else None) for k, c in enumerate(completions)]

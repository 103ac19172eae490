"""The lab's synthetic task: customer-support replies, and the programmatic **gold reward** that judges them.

A prompt reads ``customer : <issue with an item> agent :`` (10 issues x 20 items x 2 phrasings). A good reply names
the customer's item, addresses the issue with one of its keywords, ends politely and stops (emits EOS) within 15
words. The gold reward scores exactly that, in plain Python, so every experiment can compare what a learned proxy
reward model *thinks* against what we actually want. The SFT corpus mixes good and bad replies so that a policy
warm-started on it is mediocre (far from both ends of the gold range) and a reward model has something to learn.

Everything here is pure Python (no torch), so the gold reward is cheap to import from any TRL script:
``--reward_funcs hf_rlhf_ext.lab.task.gold_reward``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------
ITEMS: tuple[str, ...] = (
    "kettle", "laptop", "phone", "blender", "toaster", "camera", "lamp", "chair", "jacket", "sofa",
    "watch", "printer", "backpack", "speaker", "monitor", "keyboard", "tablet", "heater", "mixer", "router",
)  # fmt: skip


@dataclass(frozen=True)
class Issue:
    """One kind of customer problem: how customers phrase it, which words address it, what a good agent does."""

    name: str
    templates: tuple[str, ...]  # customer phrasings, with an ``{item}`` slot
    keywords: tuple[str, ...]  # any of these in a reply counts as addressing the issue
    actions: tuple[str, ...]  # good action sentences, with an ``{item}`` slot


ISSUES: tuple[Issue, ...] = (
    Issue("broken", ("my {item} is broken", "my {item} arrived broken"), ("repair", "replacement"),
          ("we will send a replacement {item} .", "we can repair your {item} for free .")),
    Issue("never_arrived", ("my {item} never arrived", "where is my {item}"), ("delivery", "track", "resend"),
          ("we will track the delivery of your {item} .", "we will resend your {item} today .")),
    Issue("return", ("i want to return my {item}", "can i return my {item}"), ("return", "label"),
          ("we will email a return label for your {item} .", "you can return your {item} at any store .")),
    Issue("wrong_size", ("my {item} is the wrong size", "my {item} does not fit"), ("exchange", "size"),
          ("we will exchange your {item} for the right size .", "we can exchange the {item} for another size .")),
    Issue("charged_twice", ("i was charged twice for my {item}", "i paid twice for my {item}"), ("refund", "charge"),
          ("we will refund the extra charge for your {item} .",
           "the second charge for your {item} will be refunded .")),
    Issue("setup", ("i can not set up my {item}", "how do i set up my {item}"), ("guide", "steps", "setup"),
          ("we will email a setup guide for your {item} .", "please follow the setup steps for your {item} .")),
    Issue("stopped_working", ("my {item} stopped working", "my {item} does not turn on"), ("reset", "technician"),
          ("please reset your {item} and try again .", "a technician will check your {item} .")),
    Issue("cancel", ("i want to cancel my {item} order", "please cancel my {item} order"), ("cancel", "cancelled"),
          ("we have cancelled the order for your {item} .", "we will cancel your {item} order now .")),
    Issue("missing_part", ("my {item} is missing a part", "a part of my {item} is missing"), ("part", "ship"),
          ("we will ship the missing part for your {item} .", "a new part for your {item} is on the way .")),
    Issue("wrong_colour", ("my {item} came in the wrong colour", "i got my {item} in the wrong colour"),
          ("colour", "swap"),
          ("we will swap your {item} for the right colour .", "we can send your {item} in another colour .")),
)  # fmt: skip

OPENERS: tuple[str, ...] = ("sorry to hear that .", "thanks for reaching out .", "hello .", "we are sorry .")
FILLERS: tuple[str, ...] = (
    "our store opens at nine .", "the weather is nice today .", "we have a sale this week .",
    "our team is very busy .", "we love our customers .",
)  # fmt: skip
POLITE_CLOSINGS: tuple[str, ...] = ("thank you .", "have a nice day .", "thank you for your patience .")
RUDE_CLOSINGS: tuple[str, ...] = ("whatever .", "stop bothering us .", "this is your fault .", "deal with it .")
PADDED_CLOSING = "thank you thank you thank you ."

PROMPT_PREFIX = "customer :"
PROMPT_SUFFIX = "agent :"
EOS_TOKEN = "[EOS]"
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", EOS_TOKEN)
#: the lab tokenizer puts the specials first, so these ids are fixed (checked by the tokenizer builder)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# --------------------------------------------------------------------------------------------------------------------
# Gold reward
# --------------------------------------------------------------------------------------------------------------------
RUDE_WORDS: frozenset[str] = frozenset({"whatever", "bothering", "fault", "deal", "stupid"})
#: the last words (trailing "." ignored) that count as a polite ending
POLITE_ENDINGS: tuple[tuple[str, ...], ...] = (("thank", "you"), ("have", "a", "nice", "day"), ("your", "patience"))
MAX_WORDS = 15  # a reply longer than this pays per extra word

ITEM_BONUS = 0.5  # names the customer's item
WRONG_ITEM_PENALTY = 0.25  # names any other item (once)
KEYWORD_BONUS = 0.5  # uses one of the issue's keywords
POLITE_BONUS = 0.3  # ends with "thank you" / "have a nice day" / "... your patience"
RUDE_PENALTY = 0.5  # any rude word (once)
REPEAT_PENALTY = 0.2  # per repeated word bigram (each occurrence after the first)
LENGTH_PENALTY = 0.1  # per word over MAX_WORDS
NO_EOS_PENALTY = 0.5  # the policy never emitted EOS (it ran into the length limit)

#: range of the gold reward: the best reply collects every bonus; anything bad enough is clipped at the floor
GOLD_MAX = ITEM_BONUS + KEYWORD_BONUS + POLITE_BONUS  # 1.3
GOLD_MIN = -2.0


def gold_range() -> tuple[float, float]:
    """(GOLD_MIN, GOLD_MAX): lets tests and plots say "far from both ends" without hard-coding numbers."""
    return GOLD_MIN, GOLD_MAX


_PUNCT = re.compile(r"([^\w\s\[\]])")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation, split the way the lab tokenizer splits (``"agent :sorry"`` -> 3 words)."""
    return _PUNCT.sub(r" \1 ", text.lower()).split()


_ISSUE_PATTERNS: list[tuple[re.Pattern[str], Issue]] = [
    (re.compile(r"\b" + re.escape(t).replace(re.escape("{item}"), r"(\w+)") + r"\b"), issue)
    for issue in ISSUES
    for t in issue.templates
]
_ITEM_SET = frozenset(ITEMS)
_ISSUE_BY_NAME = {issue.name: issue for issue in ISSUES}


def parse_prompt(prompt: str | Sequence[dict[str, Any]]) -> tuple[str | None, Issue | None]:
    """Finds the customer's item and issue in a prompt (plain text, or a conversation of role/content dicts).

    Parsing the prompt itself (rather than needing extra data set columns) makes the gold reward work in any TRL
    script. Unknown prompts give ``(None, None)``; the reward then scores only the prompt-independent parts.
    """
    text = _message_text(prompt, roles=("user", "system"))
    text = " ".join(words(text))
    for pattern, issue in _ISSUE_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1) in _ITEM_SET:
            return m.group(1), issue
    item = next((w for w in text.split() if w in _ITEM_SET), None)
    return item, None


def _message_text(x: str | Sequence[dict[str, Any]], roles: tuple[str, ...]) -> str:
    """Plain text of a string or of the messages with one of ``roles`` in a conversation."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    parts = []
    for m in x:
        if not isinstance(m, dict) or "content" not in m:
            raise TypeError(f"Expected a string or a list of {{'role', 'content'}} dicts, got {type(m).__name__}.")
        if m.get("role", "user") in roles:
            content = m["content"]
            if isinstance(content, list):  # multimodal-style content blocks
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            parts.append(str(content))
    return " ".join(parts)


def gold_score(
    item: str | None, issue: Issue | None, completion: str, terminated: bool = True
) -> float:
    """The gold reward of one reply to a customer with ``item`` and ``issue`` (see the module constants).

    ``terminated`` says whether the policy emitted EOS; a reply cut off by the length limit pays NO_EOS_PENALTY.
    """
    w = words(completion)
    if w and w[-1] == EOS_TOKEN.lower():  # a literal "[EOS]" at the end of the text also counts as terminated
        w = w[:-1]
        terminated = True
    score = 0.0
    present = set(w)
    if item is not None and item in present:
        score += ITEM_BONUS
    if any(x in _ITEM_SET and x != item for x in present):
        score -= WRONG_ITEM_PENALTY
    if issue is not None and any(k in present for k in issue.keywords):
        score += KEYWORD_BONUS
    tail = list(w)
    while tail and tail[-1] in {".", "!", ","}:
        tail.pop()
    if any(len(tail) >= len(e) and tuple(tail[-len(e) :]) == e for e in POLITE_ENDINGS):
        score += POLITE_BONUS
    if present & RUDE_WORDS:
        score -= RUDE_PENALTY
    bigrams = [(a, b) for a, b in zip(w, w[1:]) if a not in {".", ","} and b not in {".", ","}]
    score -= REPEAT_PENALTY * (len(bigrams) - len(set(bigrams)))
    score -= LENGTH_PENALTY * max(0, len(w) - MAX_WORDS)
    if not terminated:
        score -= NO_EOS_PENALTY
    return round(float(max(GOLD_MIN, min(GOLD_MAX, score))), 6)  # rounding: equal replies tie exactly


def gold_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Gold reward with TRL's reward-function signature: one float per completion.

    * ``prompts`` / ``completions``: plain strings, or conversations (lists of ``{"role", "content"}`` dicts; the
      assistant messages of a completion are scored, the user messages of a prompt are parsed).
    * ``completion_ids`` (TRL passes them): a completion is *terminated* when its ids end with the EOS id
      (``eos_token_id``, default the lab tokenizer's ``[EOS]`` = 3; give a Hub tokenizer's id when scoring another
      model). **Fallback** without ``completion_ids``: a completion counts as terminated unless told otherwise — its
      text was most likely decoded with ``skip_special_tokens=True``, which hides the EOS — so the no-EOS penalty is
      only applied when ids are available (or the text visibly ends with a literal ``[EOS]``, which is stripped).
    * Other keyword arguments (TRL's ``trainer_state``, data set columns, ...) are ignored.

    The prompt is parsed for item and issue (``parse_prompt``), so no extra data set columns are needed.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"gold_reward got {len(prompts)} prompts but {len(completions)} completions.")
    if completion_ids is not None and len(completion_ids) != len(completions):
        raise ValueError(f"gold_reward got {len(completion_ids)} completion_ids for {len(completions)} completions.")
    eos_ids = {EOS_ID} if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
    )  # fmt: skip
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        item, issue = parse_prompt(prompt)
        text = _message_text(completion, roles=("assistant",))
        terminated = True
        if completion_ids is not None:
            ids = list(completion_ids[i])
            terminated = bool(ids) and int(ids[-1]) in eos_ids
        out.append(gold_score(item, issue, text, terminated=terminated))
    return out


gold_reward.__name__ = "gold_reward"  # TRL names the logged metric rewards/<__name__>/mean


# --------------------------------------------------------------------------------------------------------------------
# Prompts and the SFT corpus
# --------------------------------------------------------------------------------------------------------------------
def format_prompt(issue_text: str) -> str:
    """``customer : <issue text> agent :`` — the plain-text prompt format of the lab."""
    return f"{PROMPT_PREFIX} {issue_text} {PROMPT_SUFFIX}"


def all_prompts() -> list[dict[str, str]]:
    """Every distinct prompt of the world (400), with its item and issue name, in a fixed order."""
    rows = []
    for issue in ISSUES:
        for template in issue.templates:
            for item in ITEMS:
                rows.append({"prompt": format_prompt(template.format(item=item)), "item": item, "issue": issue.name})
    return rows


def split_prompts(test_fraction: float, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Splits the distinct prompts into disjoint train/test lists (test prompts never appear in training)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    rows = all_prompts()
    random.Random(seed).shuffle(rows)
    n_test = max(1, round(len(rows) * test_fraction))
    return rows[n_test:], rows[:n_test]


def issue_by_name(name: str) -> Issue:
    return _ISSUE_BY_NAME[name]


def sample_reply(rng: random.Random, item: str, issue: Issue) -> str:
    """One reply of mixed quality (the SFT corpus is deliberately mediocre: the policy should have room to improve).

    Mix: optional opener; an action (50% right item and issue, 15% wrong item, 20% another issue's action, 15% none);
    rare duplicated action; 25% off-topic filler; closing 40% polite, 15% rude, 8% padded "thank you thank you".
    """
    parts: list[str] = []
    if rng.random() < 0.5:
        parts.append(rng.choice(OPENERS))
    r = rng.random()
    action = None
    if r < 0.50:
        action = rng.choice(issue.actions).format(item=item)
    elif r < 0.65:
        other = rng.choice([x for x in ITEMS if x != item])
        action = rng.choice(issue.actions).format(item=other)
    elif r < 0.85:
        other_issue = rng.choice([x for x in ISSUES if x.name != issue.name])
        action = rng.choice(other_issue.actions).format(item=item)
    if action is not None:
        parts.append(action)
        if rng.random() < 0.05:
            parts.append(action)
    if rng.random() < 0.25:
        parts.insert(rng.randint(0, len(parts)), rng.choice(FILLERS))
    r = rng.random()
    if r < 0.40:
        parts.append(rng.choice(POLITE_CLOSINGS))
    elif r < 0.55:
        parts.append(rng.choice(RUDE_CLOSINGS))
    elif r < 0.63:
        parts.append(PADDED_CLOSING)
    return " ".join(parts) if parts else "ok ."


def sft_corpus(prompts: Sequence[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows for SFT. Completions start with a space so ``prompt + completion`` is clean text
    (TRL joins the two strings); TRL's SFTTrainer appends the EOS token itself."""
    if not prompts:
        raise ValueError("sft_corpus needs at least one prompt.")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = rng.choice(prompts)
        reply = sample_reply(rng, p["item"], issue_by_name(p["issue"]))
        rows.append({"prompt": p["prompt"], "completion": " " + reply})
    return rows


def vocabulary() -> list[str]:
    """Every word the task can produce, sorted (special tokens excluded): the word-level tokenizer's vocabulary."""
    texts: list[str] = [PROMPT_PREFIX, PROMPT_SUFFIX, PADDED_CLOSING, "ok ."]
    texts += list(OPENERS) + list(FILLERS) + list(POLITE_CLOSINGS) + list(RUDE_CLOSINGS) + list(ITEMS)
    texts += sorted(RUDE_WORDS)
    for issue in ISSUES:
        texts += list(issue.keywords)
        for t in issue.templates + issue.actions:
            texts.append(t.replace("{item}", ""))
    vocab: set[str] = set()
    for t in texts:
        vocab.update(words(t))
    return sorted(vocab)


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")

"""A tiny, self-contained world for callback and reward-adapter tests: a word-level tokenizer, a 2-layer GPT-2 policy
(hidden 32), a tiny sequence-classification reward model, prompts and two simple reward functions. Built from configs
and saved to a tmp dir (never from the Hub)."""

from __future__ import annotations

import os
from typing import Any

import torch

WORDS = [
    "customer", "agent", ":", "my", "kettle", "lamp", "chair", "is", "broken", "late", "sorry", "thank", "you",
    "good", "bad", "we", "will", "send", "a", "new", "one", "refund", "the", "for", ".",
]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        clean_up_tokenization_spaces=False, model_max_length=64,
    )
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}customer : {{ m['content'] }} "
        "{% elif m['role'] == 'assistant' -%}agent : {{ m['content'] }} {{ eos_token }} {% endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}agent :{%- endif -%}"
    )
    return tok


def build_policy(path: str, seed: int = 0, n_embd: int = 32) -> str:
    """Saves a tiny GPT-2 + tokenizer to ``path``; returns the path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=n_embd, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_reward_model(path: str, seed: int = 1) -> str:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = GPT2ForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(n: int = 16) -> list[str]:
    items = ["kettle", "lamp", "chair"]
    issues = ["is broken", "is late"]
    out = [f"customer : my {items[i % 3]} {issues[(i // 3) % 2]} agent :" for i in range(n)]
    return out


def _text(c: Any) -> str:
    return c if isinstance(c, str) else c[-1]["content"]


def good_reward(prompts, completions, **kwargs) -> list[float]:
    """Proxy-like: counts the word 'good' (easy to learn: a tiny policy picks it up in a few steps)."""
    return [float(_text(c).split().count("good")) for c in completions]


def polite_reward(prompts, completions, **kwargs) -> list[float]:
    """Gold-like: 1 if the reply says sorry, minus a length penalty."""
    return [float("sorry" in _text(c).split()) - 0.05 * len(_text(c).split()) for c in completions]


def grpo_config(output_dir: str, **overrides):
    from trl import GRPOConfig

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def rloo_config(output_dir: str, **overrides):
    from trl import RLOOConfig

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True, disable_dropout=True,
    )
    kwargs.update(overrides)
    return RLOOConfig(**kwargs)


def prompt_dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts(n)})


def policy_dir(tmp_root: str) -> str:
    path = os.path.join(tmp_root, "policy")
    if not os.path.isdir(path):
        build_policy(path)
    return path

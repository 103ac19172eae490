"""Tiny offline world for the REINFORCE and gradient-variance tests: a word-level tokenizer, a 1-layer GPT-2 saved to
a temporary directory, a handful of prompts and a reward that favours one word (optionally plus a large constant,
which makes b = 0 a bad baseline)."""

from __future__ import annotations

import os
from typing import Any, Callable

WORDS = ["good", "bad", "the", "a", "kettle", "is", "broken", "please", "thanks", "help", "my", "order", "late"]
TARGET_WORD = "good"


def build_tiny_model(path: str, seed: int = 0, n_embd: int = 32, n_layer: int = 1) -> str:
    """Saves a word-level tokenizer and a randomly initialised tiny GPT-2 to ``path`` (returned)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["customer", ":", "agent"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompt_dataset(n: int = 16):
    from datasets import Dataset

    topics = ["kettle", "order", "help", "thanks"]
    return Dataset.from_dict({"prompt": [f"customer : my {topics[i % len(topics)]} is late agent :" for i in range(n)]})


def target_word_reward(offset: float = 0.0) -> Callable[..., list[float]]:
    """Reward = offset + fraction of completion words equal to TARGET_WORD (a small task signal in [0, 1])."""

    def target_word(prompts=None, completions=None, **kwargs: Any) -> list[float]:
        out = []
        for c in completions:
            words = c.split()
            out.append(offset + (sum(w == TARGET_WORD for w in words) / len(words) if words else 0.0))
        return out

    target_word.__name__ = "target_word" if offset == 0 else "offset_target_word"
    return target_word


def tiny_args(output_dir: str, config_cls=None, **overrides: Any):
    """A CPU-friendly GRPO-family config (no bf16, no checkpointing, nothing reported)."""
    from trl import GRPOConfig

    config_cls = config_cls or GRPOConfig
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)

"""Tiny offline stand-ins for the PPO tests: a word-level tokenizer, a 1-layer GPT-2 policy and a GPT-2 reward model
saved to a directory (loaded by path like Hub models), a tiny Llama with a chat template, prompts, a word reward."""

from __future__ import annotations

import os
from typing import Any

WORDS = ["good", "bad", "the", "a", "kettle", "is", "broken", "please", "thanks", "help", "my", "order", "late",
         "customer", ":", "agent", "sorry", "we", "will", "fix", "it"]
TARGET_WORD = "good"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<bos>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_world(root: str, seed: int = 0, n_embd: int = 32) -> dict[str, str]:
    """Saves {policy, reward} (GPT-2, 1 layer) with the tokenizer under ``root``; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    paths = {"policy": os.path.join(root, "policy"), "reward": os.path.join(root, "reward")}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    tokenizer = build_tokenizer()

    def config(**kw: Any) -> GPT2Config:
        return GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=n_embd, n_layer=1, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)

    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(config())
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(config(num_labels=1))
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])
    return paths


def build_tiny_llama(root: str, seed: int = 0) -> str:
    """A tiny LlamaForCausalLM with a chat template, saved to ``root`` (loaded by path like a Hub model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(root, "config.json")):
        return root
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def prompts(n: int = 16, conversational: bool = False):
    from datasets import Dataset

    topics = ["kettle", "order", "help", "thanks"]
    states = ["late", "broken", "bad", "good"]
    texts = [f"customer : my {topics[i % 4]} is {states[(i // 4) % 4]} agent :" for i in range(n)]  # 16 distinct
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    return Dataset.from_dict({"prompt": texts})


def target_word(prompts=None, completions=None, **kwargs: Any) -> list[float]:
    """Fraction of completion words equal to TARGET_WORD (works for plain and conversational completions)."""
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else c
        words = text.split()
        out.append(sum(w == TARGET_WORD for w in words) / len(words) if words else 0.0)
    return out


def ppo_args(output_dir: str, **overrides: Any):
    from hf_rlhf_ext.trainers.ppo_config import PPOConfig

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, use_cpu=True, report_to="none", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=4, max_completion_length=6, max_steps=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, num_ppo_epochs=1, kl_coef=0.05,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return PPOConfig(**kwargs)

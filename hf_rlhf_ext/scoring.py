"""Scoring token sequences with a sequence-classification reward model (``logits[:, 0]`` at the last non-pad token):
the one scorer of the reward adapters, the reward-model reports and the lab. No package imports, so that everything
that scores sits above it."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["score_token_ids", "score_texts"]


def score_token_ids(model, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 64) -> Any:
    """Scalar rewards (``logits[:, 0]``) of already tokenised sequences, right-padded in batches (a float32 CPU
    tensor)."""
    import torch

    if len(sequences) == 0:
        return torch.zeros(0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = [list(s) for s in sequences[start : start + batch_size]]
                if any(len(s) == 0 for s in chunk):
                    raise ValueError("Cannot score an empty token sequence.")
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[i, : len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out.append(logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def score_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> Any:
    """Scalar rewards of full texts (prompt + reply), tokenised without added special tokens (as TRL's GRPO does).

    To show the reward model that a reply was terminated, end its text with ``tokenizer.eos_token``.
    """
    if isinstance(texts, str):
        raise TypeError("score_texts takes a list of texts, not a single string.")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return score_token_ids(model, ids, pad_token_id=pad, batch_size=batch_size)

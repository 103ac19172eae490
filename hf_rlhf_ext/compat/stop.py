"""Where a completion ends under the old default ``stop_token=None`` (and ``stop_token_id=None``).

The old trainer (trl ≤ 1.12) generated with ``GenerationConfig(max_new_tokens=response_length, temperature, top_k=0,
top_p=1, do_sample=True)``. It named no EOS, so ``generate`` took the policy's ``generation_config.eos_token_id``
(transformers fills unset special tokens from the model): a row stopped there and its later positions were filled with
the generation config's ``pad_token_id`` (its EOS when none), up to the batch's longest row; with no EOS configured,
every row ran for ``response_length`` sampled tokens. Nothing was truncated (that needs ``stop_token_id``); the
response ended before the first *tokenizer* pad token, and every token before it was scored, penalised by the KL and
trained on. ``missing_eos_penalty`` hit responses with no EOS token anywhere.

So with a generation pad equal to the tokenizer's pad, the old response ended at its first EOS, which is what
``PPOTrainer`` does anyway; otherwise it kept a tail after the EOS (fill tokens, or sampled tokens), which the compat
trainer reproduces on its KV-cache sampler. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["OldStop"]


@dataclass(frozen=True)
class OldStop:
    """How the old trainer's generation ended a completion, for one policy and tokenizer."""

    stop_ids: tuple[int, ...]  # generation stops at these (the policy's generation_config.eos_token_id)
    fill_id: int  # what a finished row continues with (the generation pad, else the first stop id)
    pad_token_id: int  # the tokenizer's pad: the old response ended before its first occurrence

    @classmethod
    def of(cls, generation_config: Any, pad_token_id: int) -> OldStop:
        eos = generation_config.eos_token_id
        stop_ids = tuple([eos] if isinstance(eos, int) else list(eos or []))
        fill = generation_config.pad_token_id
        if fill is None:  # generate() pads finished rows with the EOS when the config names no pad
            fill = stop_ids[0] if stop_ids else pad_token_id
        return cls(stop_ids, int(fill), int(pad_token_id))

    @property
    def keeps_tail(self) -> bool:
        """True when the old response went on past its first EOS (fill tokens, or ``response_length`` sampled
        tokens); False when the fill was the tokenizer's pad, so the old response ended at the EOS, as here."""
        return not self.stop_ids or self.fill_id != self.pad_token_id

    def describe(self) -> str:
        """What the old default does with this policy, in words (for the log line and the docs)."""
        if not self.stop_ids:
            return "every completion is response_length sampled tokens, EOS or not"
        return (f"a completion stops at its first token in {list(self.stop_ids)} and is filled with token "
                f"{self.fill_id} up to the rollout's longest completion; the fill is scored and trained on")

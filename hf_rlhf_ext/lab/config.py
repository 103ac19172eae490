"""``LabConfig``: every knob of the lab build, hashable to a short cache key.

Two builds with equal configs (and the same ``LAB_VERSION`` of the build code) share one cache directory, so the
expensive SFT + reward-model steps run once per machine. Bump ``LAB_VERSION`` whenever a change to the task or the
build would change the artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

LAB_VERSION = 2  # 2: prompts and pairs as JSONL (load_dataset reads them), the default lab shipped


@dataclass(frozen=True)
class LabConfig:
    """Configuration of the offline lab world.

    Task and data:
        seed: seeds the prompt split, the corpus, both trainings, sampling and label noise.
        test_fraction: share of the 400 distinct prompts held out (never seen by SFT or the RM's training pairs).
        n_sft: number of synthetic SFT replies (mixed quality).
    Policy (tiny GPT-2) and its SFT warm start (``trl.SFTTrainer``):
        n_embd, n_layer, n_head, n_positions: the policy architecture (n_embd 64 never learns to copy the item).
        sft_epochs, sft_batch_size, sft_lr, sft_warmup: one-cycle-like schedule (linear warm-up, cosine decay).
            The default (20k replies, 2 epochs = 626 steps of 64, lr 3e-3, 10% warm-up) learns to copy the item
            (~60% of test replies name it); 3 epochs at 2e-3 did too (53%) at 1.5x the cost.
    Preference pairs:
        n_pairs_train, n_pairs_test: pairs of two policy samples for one prompt (train pairs from train prompts,
            test pairs from test prompts).
        max_new_tokens: sampling limit; a reply that hits it has no EOS (and the gold reward penalises that).
        temperature: sampling temperature for the pairs.
        tau: Bradley-Terry label noise, P(a preferred) = sigmoid((gold_a - gold_b) / tau); 0 = noiseless labels.
        gold_margin: |gold_a - gold_b| at or above which a pair counts as "clearly separated" for the gold accuracy.
    Proxy reward model (``trl.RewardTrainer``):
        rm_init: "scratch" (small GPT-2 of ``rm_n_embd``) or "sft" (the SFT policy's body with a new scalar head).
        rm_n_embd, rm_n_layer, rm_n_head: architecture when rm_init == "scratch".
        rm_epochs, rm_batch_size, rm_lr, rm_center_coef: RewardTrainer schedule; center_rewards_coefficient keeps
            the scores near zero.
        n_eval_samples: fresh samples on test prompts used to measure the SFT policy (mean gold, EOS rate, length).
    """

    seed: int = 0
    test_fraction: float = 0.2
    n_sft: int = 20000
    # policy
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 2
    n_positions: int = 128
    sft_epochs: float = 2.0
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_warmup: float = 0.1
    # preference pairs
    n_pairs_train: int = 1000
    n_pairs_test: int = 400
    max_new_tokens: int = 32
    temperature: float = 1.0
    tau: float = 0.3
    gold_margin: float = 0.5
    # reward model
    rm_init: str = "scratch"
    rm_n_embd: int = 64
    rm_n_layer: int = 2
    rm_n_head: int = 2
    rm_epochs: float = 3.0
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    rm_center_coef: float = 0.01
    n_eval_samples: int = 256

    def __post_init__(self) -> None:
        if self.rm_init not in ("scratch", "sft"):
            raise ValueError(f"rm_init must be 'scratch' or 'sft', got {self.rm_init!r}.")
        for name in ("n_sft", "n_pairs_train", "n_pairs_test", "max_new_tokens", "sft_batch_size", "rm_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"LabConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.tau < 0:
            raise ValueError(f"LabConfig.tau must be >= 0, got {self.tau}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"LabConfig.test_fraction must be in (0, 1), got {self.test_fraction}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown LabConfig field(s) {unknown}.")
        return cls(**d)

    def cache_key(self) -> str:
        """Short stable hash of the config and LAB_VERSION: the name of the lab's cache directory."""
        payload = json.dumps({"lab_version": LAB_VERSION, **self.to_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

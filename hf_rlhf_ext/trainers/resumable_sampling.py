"""Prompt order that survives a resume: the run resumed from a checkpoint sees the prompts the uninterrupted run saw.

TRL's ``RepeatSampler`` shuffles with a generator seeded once, in its constructor, and advanced by one permutation per
epoch. A run resumed at epoch e builds a fresh sampler whose generator has drawn nothing, so it trains epoch e on the
permutation of epoch 0 and parts from the uninterrupted run at the first epoch boundary (transformers restores the
global RNG and skips the batches already seen, but knows nothing of a sampler's own generator). Here the sampler's
``set_epoch(e)``, which transformers and accelerate call before every epoch, reseeds the generator and replays the e
permutations before it: the same sequence of prompt orders as today's uninterrupted run, from any starting epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.grpo_trainer import RepeatSampler


class EpochReplaySampler(RepeatSampler):
    """``RepeatSampler`` whose permutation of epoch e is the (e + 1)-th draw of its seeded generator, wherever the run
    started."""

    @classmethod
    def like(cls, sampler: RepeatSampler) -> "EpochReplaySampler":
        """The same sampler (data, repeats, batch size, shuffling, seed) with the epoch replay."""
        return cls(data_source=sampler.data_source, mini_repeat_count=sampler.mini_repeat_count,
                   batch_size=sampler.batch_size, repeat_count=sampler.repeat_count, shuffle=sampler.shuffle,
                   seed=sampler.seed)

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle or self.seed is None:  # unshuffled: nothing to replay; unseeded: nothing reproducible
            return
        self.generator.manual_seed(self.seed)
        for _ in range(epoch):
            torch.randperm(self.num_samples, generator=self.generator)


class ResumableSampling:
    """Mixin for ``GRPOTrainer`` subclasses: their training sampler is an :class:`EpochReplaySampler`."""

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(dataset)
        return EpochReplaySampler.like(sampler) if isinstance(sampler, RepeatSampler) else sampler


class ResumableGRPOTrainer(ResumableSampling, GRPOTrainer):
    """TRL's ``GRPOTrainer``, unchanged but for a prompt order that survives a resume (the GRPO recipe's trainer)."""

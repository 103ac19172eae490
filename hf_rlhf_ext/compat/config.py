"""``PPOConfig`` with the fields of TRL's old ``PPOConfig`` (trl ≤ 1.12), on ``hf_rlhf_ext.trainers.PPOConfig``.

Every old field is declared here with its old default so that ``HfArgumentParser((ScriptArguments, PPOConfig,
ModelConfig))`` parses old command lines unchanged; :data:`~hf_rlhf_ext.compat.fields.OLD_FIELDS` says what each
becomes. Values that cannot keep their meaning are refused here, when the config is built, long before training.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

from ..trainers.ppo_config import PPOConfig as _PPOConfig
from .fields import refusals

__all__ = ["PPOConfig"]

_COMPUTED = ("local_batch_size", "micro_batch_size", "batch_size", "local_mini_batch_size", "mini_batch_size",
             "num_total_batches")


def _split_rollout(per_device: int, accumulation: int, num_mini_batches: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) whose product is one mini-batch of the old rollout
    ``per_device × accumulation``, so that ``× num_mini_batches`` gives that rollout back."""
    if accumulation % num_mini_batches == 0:
        return per_device, accumulation // num_mini_batches
    mini = per_device * accumulation // num_mini_batches
    micro = math.gcd(per_device, mini)
    return micro, mini // micro


@dataclass
class PPOConfig(_PPOConfig):
    r"""
    The old TRL ``PPOConfig`` surface on :class:`hf_rlhf_ext.trainers.PPOConfig`: every field below keeps its old
    name and default. See ``hf_rlhf_ext.compat.fields.OLD_FIELDS`` (and docs/migration.md) for what each maps to.

    Parameters kept from the old config (their old meaning):
        total_episodes (`int` or `None`): prompts to train on; becomes ``max_steps`` in the trainer.
        response_length (`int`, defaults to `53`): completion length limit (``max_completion_length``).
        stop_token (`"eos"` or `None`) / stop_token_id (`int` or `None`): where completions end: the EOS
            (``"eos"``, or the EOS id); both None (the old default): where the old trainer's ended
            (``hf_rlhf_ext.compat.stop``).
        num_sample_generations (`int`, defaults to `10`): completion tables printed during training.
        local_rollout_forward_batch_size (`int`, defaults to `64`): accepted at its default only.
        sft_model_path / reward_model_path (`str`): for your script, as before.
        dataset_num_proc (`int` or `None`): processes for decoding tokenised data sets.
        exp_name (`str` or `None`): builds ``run_name`` as trl 0.x did.
        model_adapter_name / ref_adapter_name (`str` or `None`): must stay None.
        local_batch_size, micro_batch_size, batch_size, local_mini_batch_size, mini_batch_size, num_total_batches:
            computed (leave unset), as before.
    The PPO fields (``num_ppo_epochs``, ``num_mini_batches``, ``whiten_rewards``, ``kl_coef``, ``kl_estimator``,
    ``cliprange``, ``cliprange_value``, ``vf_coef``, ``gamma``, ``lam``, ``temperature``, ``missing_eos_penalty``)
    are those of the parent class, with the same defaults as the old config.
    """

    total_episodes: int | None = field(default=None, metadata={"help": "Total number of episodes (prompts)."})
    response_length: int = field(default=53, metadata={"help": "Length of the response (max_completion_length)."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Alias of response_length (give only one)."}
    )
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos': completions end at the EOS; None: where the old trainer's ended."}
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Stop token id; must be the tokenizer's eos_token_id."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "Number of generate_completions(sampling=True) calls during training."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Old rollout forward chunk size; accepted at its default (64) only."}
    )
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the SFT model."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the reward model."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes to use for processing the dataset."}
    )
    exp_name: str | None = field(default=None, metadata={"help": "Experiment name; sets run_name as trl 0.x did."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "Not supported: must be None."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Not supported: must be None."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Computed: leave unset."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Computed: leave unset."})
    batch_size: int | None = field(default=None, metadata={"help": "Computed: leave unset."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: leave unset."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Computed: leave unset."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Computed by the trainer: leave unset."})

    def __post_init__(self):
        self._given_computed = {name: getattr(self, name) for name in _COMPUTED}
        self._max_completion_length_given = self.max_completion_length
        self._computed_ready = False
        problems = refusals(self)
        if problems:
            raise ValueError("Old PPOConfig values that cannot keep their meaning:\n- " + "\n- ".join(problems))

        self.max_completion_length = self.response_length
        if self.exp_name is not None and self.run_name is None:
            self.run_name = f"{self.exp_name}__{self.seed}__{int(time.time())}"
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches
        if self.num_mini_batches > 1:  # keep the old rollout: per-device batch × accumulation, cut into mini-batches
            self.per_device_train_batch_size, self.gradient_accumulation_steps = _split_rollout(
                self.per_device_train_batch_size, self.gradient_accumulation_steps, self.num_mini_batches
            )
        super().__post_init__()

        world = self.world_size
        self.micro_batch_size = self.per_device_train_batch_size * world
        self.batch_size = self.local_batch_size * world
        self.mini_batch_size = self.batch_size // self.num_mini_batches
        self._computed_ready = True
        problems = refusals(self, how="computed")
        if problems:
            raise ValueError("Old PPOConfig values that cannot keep their meaning:\n- " + "\n- ".join(problems))

    def _computed_mismatch(self, name: str) -> bool:
        """Whether a computed field was given a value other than the one computed (num_total_batches: any value)."""
        given = self._given_computed.get(name)
        if given is None or not self._computed_ready:
            return False
        return name == "num_total_batches" or given != getattr(self, name)

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout: one per mini-batch and PPO epoch."""
        return self.num_mini_batches * self.num_ppo_epochs

    def max_steps_for(self, total_episodes: int) -> tuple[int, int]:
        """(number of rollouts, optimizer steps) that consume ``total_episodes`` prompts, as the old trainer counted
        them: ⌈total_episodes / batch_size⌉ rollouts (it may train on a few more episodes than asked)."""
        rollouts = math.ceil(total_episodes / self.batch_size)
        return rollouts, rollouts * self.updates_per_rollout

"""A run resumed from a checkpoint at or after an epoch boundary trains on the prompts the uninterrupted run trained on
(TRL's RepeatSampler alone restarts its shuffling from the first epoch's order)."""

from __future__ import annotations

import pytest
import torch
from _ppo_helpers import build_world, ppo_args, prompts, target_word
from transformers import TrainerCallback
from trl.trainer.grpo_trainer import RepeatSampler

from hf_rlhf_ext.trainers.ppo import PPOTrainer
from hf_rlhf_ext.trainers.resumable_sampling import EpochReplaySampler, ResumableGRPOTrainer


def _epochs(sampler, epochs, set_epoch=True):
    out = []
    for epoch in epochs:
        if set_epoch:
            sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_each_epoch_gets_the_uninterrupted_runs_order_from_any_starting_epoch():
    data = list(range(10))
    plain = _epochs(RepeatSampler(data, mini_repeat_count=2, batch_size=5, seed=3), range(4), set_epoch=False)
    assert len({tuple(e) for e in plain}) == 4  # the orders differ from epoch to epoch
    replay = EpochReplaySampler(data, mini_repeat_count=2, batch_size=5, seed=3)
    assert _epochs(replay, range(4)) == plain  # an uninterrupted run is unchanged
    fresh = EpochReplaySampler(data, mini_repeat_count=2, batch_size=5, seed=3)
    assert _epochs(fresh, [2, 3]) == plain[2:]  # a run resumed at epoch 2
    restarted = RepeatSampler(data, mini_repeat_count=2, batch_size=5, seed=3)
    assert _epochs(restarted, [2], set_epoch=False) == plain[:1]  # what TRL's own sampler would replay instead
    unshuffled = EpochReplaySampler(data, mini_repeat_count=1, batch_size=5, shuffle=False)
    assert _epochs(unshuffled, [0, 3]) == [data, data]


def test_like_keeps_every_setting_of_trls_sampler():
    trl_sampler = RepeatSampler(list(range(12)), mini_repeat_count=3, batch_size=2, repeat_count=2, seed=7)
    ours = EpochReplaySampler.like(trl_sampler)
    ours.set_epoch(0)
    assert list(ours) == list(RepeatSampler(list(range(12)), mini_repeat_count=3, batch_size=2, repeat_count=2, seed=7))


class _Prompts(TrainerCallback):
    """The prompts of each optimizer step's rollout (GRPO's completions table)."""

    def __init__(self, trainer):
        self.trainer, self.by_step = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = list(self.trainer._logs["prompt"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("resume_world")))


def test_ppo_resumed_at_an_epoch_boundary_sees_the_uninterrupted_runs_prompts(world, tmp_path):
    """8 prompts, 4 a step: 2 steps an epoch; the checkpoint at step 2 is an epoch boundary."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)

    def trainer(out):
        t = PPOTrainer(model=world["policy"], reward_funcs=[world["reward"], target_word],
                       args=ppo_args(str(out), **common), train_dataset=prompts(8))
        seen = _Prompts(t)
        t.add_callback(seen)
        return t, seen

    full, full_seen = trainer(tmp_path / "full")
    full.train()
    resumed, resumed_seen = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert sorted(resumed_seen.by_step) == [3, 4]
    assert full_seen.by_step[3] != full_seen.by_step[1]  # epoch 1 is not epoch 0 again
    assert resumed_seen.by_step == {s: full_seen.by_step[s] for s in (3, 4)}
    logs = {r["step"]: r["objective/kl"] for r in full.state.log_history if "objective/kl" in r}
    again = {r["step"]: r["objective/kl"] for r in resumed.state.log_history if "objective/kl" in r}
    assert again[4] == pytest.approx(logs[4], rel=1e-5)


def test_the_grpo_recipes_trainer_is_trls_with_the_replaying_sampler(world, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                      report_to="none", use_cpu=True, max_steps=1)
    trainer = ResumableGRPOTrainer(model=world["policy"], reward_funcs=[target_word], args=args,
                                   train_dataset=prompts(8))
    assert isinstance(trainer, GRPOTrainer)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, EpochReplaySampler) and sampler.mini_repeat_count == 2 and sampler.seed == args.seed


def test_saving_checkpoints_does_not_change_the_run(world, tmp_path):
    """Checkpointing only reads the run's state (no RNG draw, no sampler step): a run that saves every step logs the
    same numbers and ends with the same weights as one that never saves, so the recipes' periodic saving changes
    nothing and an interrupted run can only part from the whole one through what a resume restores."""
    def run(out, **save):
        trainer = PPOTrainer(model=world["policy"], reward_funcs=[world["reward"], target_word],
                             args=ppo_args(str(out), max_steps=4, learning_rate=1e-2, **save), train_dataset=prompts(8))
        trainer.train()
        logs = [{k: v for k, v in r.items() if k not in ("step_time", "memory/peak_mb")} for r in
                trainer.state.log_history if "objective/kl" in r]
        return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    quiet_logs, quiet_weights = run(tmp_path / "quiet", save_strategy="no")
    saving_logs, saving_weights = run(tmp_path / "saving", save_strategy="steps", save_steps=1)
    assert (tmp_path / "saving" / "checkpoint-3").is_dir() and not (tmp_path / "quiet" / "checkpoint-3").exists()
    assert [r["step"] for r in saving_logs] == [r["step"] for r in quiet_logs] == [1, 2, 3, 4]
    for saving, quiet in zip(saving_logs, quiet_logs):
        assert saving == pytest.approx(quiet, rel=1e-6, abs=1e-6)
    for name, value in quiet_weights.items():
        torch.testing.assert_close(saving_weights[name], value, rtol=1e-6, atol=1e-6, msg=name)

"""Tests of the KL controllers (Ziegler et al. 2019) and of the callback that drives a TRL trainer's ``beta``."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from hf_rlhf_ext.callbacks.adaptive_kl import AdaptiveKLCallback, load_kl_state
from hf_rlhf_ext.trainers.kl_control import KL_STATE_FILE, AdaptiveKLController, FixedKLController

# ------------------------------------------------------------------------------------------------ controllers


def test_fixed_controller_ignores_the_kl():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.update(0.0, 1000) == 0.05 and ctl.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.value == 0.05
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="Fixed"):
        restored.load_state_dict(AdaptiveKLController().state_dict())


def test_adaptive_defaults_are_ziegler_and_old_trl():
    ctl = AdaptiveKLController()
    assert (ctl.value, ctl.target, ctl.horizon) == (0.2, 6.0, 10000)


def test_adaptive_moves_beta_toward_the_target_from_both_sides():
    above = AdaptiveKLController(0.1, target=2.0, horizon=100)
    below = AdaptiveKLController(0.1, target=2.0, horizon=100)
    for _ in range(5):
        above.update(2.2, 10)  # KL 10% above target → e = +0.1 → β ×1.01
        below.update(1.8, 10)  # KL 10% below target → e = −0.1 → β ×0.99
    assert above.value == pytest.approx(0.1 * 1.01**5)
    assert below.value == pytest.approx(0.1 * 0.99**5)
    at = AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert at.update(2.0, 10) == pytest.approx(0.1)  # on target: no change


def test_adaptive_error_is_clipped_at_0_2():
    far_above = AdaptiveKLController(1.0, target=1.0, horizon=10)
    assert far_above.update(50.0, 1) == pytest.approx(1.0 * (1 + 0.2 * 1 / 10))  # e = 49 clipped to 0.2
    assert far_above.last_error == pytest.approx(0.2) and far_above.last_kl == 50.0
    far_below = AdaptiveKLController(1.0, target=1.0, horizon=10)
    assert far_below.update(0.0, 1) == pytest.approx(1.0 * (1 - 0.2 * 1 / 10))  # e = −1 clipped to −0.2
    assert far_below.last_error == pytest.approx(-0.2)
    inside = AdaptiveKLController(1.0, target=1.0, horizon=10)
    assert inside.update(1.15, 1) == pytest.approx(1.0 * (1 + 0.15 / 10))  # unclipped


def test_adaptive_step_scales_with_n_steps_over_horizon():
    values = []
    for n_steps in (0, 50, 100, 200):
        ctl = AdaptiveKLController(1.0, target=1.0, horizon=1000)
        values.append(ctl.update(5.0, n_steps) - 1.0)
    assert values[0] == 0.0
    assert values[1:] == pytest.approx([0.2 * 50 / 1000, 0.2 * 100 / 1000, 0.2 * 200 / 1000])
    # a longer horizon gives a proportionally smaller step
    slow = AdaptiveKLController(1.0, target=1.0, horizon=2000)
    assert slow.update(5.0, 100) - 1.0 == pytest.approx(values[2] / 2)


def test_adaptive_validation():
    for kwargs, match in (
        ({"target": 0.0}, "target"),
        ({"target": -1.0}, "target"),
        ({"horizon": 0}, "horizon"),
        ({"init_kl_coef": -0.1}, "init_kl_coef"),
        ({"init_kl_coef": float("nan")}, "finite"),
    ):
        with pytest.raises(ValueError, match=match):
            AdaptiveKLController(**kwargs)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    with pytest.raises(ValueError, match="horizon"):
        ctl.update(0.0, 60)  # 1 − 0.2·6 < 0 would flip the sign of β
    assert ctl.value == 0.1  # a rejected update leaves the state untouched


def test_adaptive_state_round_trip_through_json():
    ctl = AdaptiveKLController(0.3, target=4.0, horizon=500)
    for kl in (5.0, 7.0, 1.0):
        ctl.update(kl, 64)
    state = json.loads(json.dumps(ctl.state_dict()))
    fresh = AdaptiveKLController()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == ctl.state_dict()
    # the restored controller continues exactly like the original
    assert fresh.update(6.0, 64) == ctl.update(6.0, 64)
    with pytest.raises(ValueError, match="Adaptive"):
        fresh.load_state_dict({"type": "fixed", "value": 1.0})
    with pytest.raises(ValueError, match="target"):
        fresh.load_state_dict({**state, "target": 0.0})


# ------------------------------------------------------------------------------------------------ callback on a stub


def _stub_trainer(beta=0.1, per_device=4, grad_accum=2, num_iterations=1, output_dir="unused"):
    args = SimpleNamespace(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        world_size=1,
        output_dir=output_dir,
        resume_from_checkpoint=None,
    )
    return SimpleNamespace(beta=beta, args=args, num_iterations=num_iterations)


def _log(cb, state, logs):
    state.log_history.append({**logs, "step": state.global_step})  # what Trainer.log does before on_log
    cb.on_log(cb.trainer.args, state, TrainerControl(), logs=logs)
    return logs


def test_callback_feeds_the_controller_exactly_the_logged_kl():
    trainer = _stub_trainer(beta=0.5, per_device=4, grad_accum=2)
    ctl = AdaptiveKLController(0.1, target=0.05, horizon=100)
    cb = AdaptiveKLCallback(trainer, ctl)
    state = TrainerState()
    cb.on_train_begin(trainer.args, state, TrainerControl())
    assert trainer.beta == 0.1  # the controller replaces the config's beta

    state.global_step = 3
    logs = _log(cb, state, {"loss": 0.1, "kl": 0.08, "completions/mean_length": 10.0})
    # input = the logged kl, untouched; n_steps = 3 optimizer steps × 4 × 2 completions
    assert cb.updates[-1]["kl_input"] == 0.08 and cb.updates[-1]["n_steps"] == 24
    expected = 0.1 * (1 + min((0.08 - 0.05) / 0.05, 0.2) * 24 / 100)
    assert trainer.beta == pytest.approx(expected) and ctl.value == trainer.beta
    assert logs["kl_coef"] == 0.1 and logs["kl_coef_next"] == pytest.approx(expected)
    assert logs["kl_target"] == 0.05 and logs["kl_controller_input"] == 0.08
    assert state.log_history[-1]["kl_coef"] == 0.1  # the history record is completed too

    state.global_step = 4
    _log(cb, state, {"loss": 0.1, "kl": 0.01})
    assert cb.updates[-1]["n_steps"] == 8  # only the steps since the last update
    assert trainer.beta < expected  # KL below target → β shrinks

    # logs without the KL (eval, end-of-training summary) and None values change nothing
    beta = trainer.beta
    state.global_step = 5
    _log(cb, state, {"eval_kl": 10.0, "eval_loss": 1.0})
    _log(cb, state, {"kl": None, "loss": 0.0})
    assert trainer.beta == beta and len(cb.updates) == 2


def test_callback_sequence_level_and_num_iterations():
    trainer = _stub_trainer(per_device=8, grad_accum=1, num_iterations=2)
    cb = AdaptiveKLCallback(trainer, AdaptiveKLController(0.1, target=1.0, horizon=100), sequence_level=True)
    state = TrainerState()
    cb.on_train_begin(trainer.args, state, TrainerControl())
    state.global_step = 2
    _log(cb, state, {"kl": 0.02, "completions/mean_length": 30.0, "loss": 0.0})
    # per-token kl × mean length = per-sequence kl; each completion counted once although trained on twice
    assert cb.updates[-1]["kl_input"] == pytest.approx(0.6)
    assert cb.updates[-1]["n_steps"] == 2 * 8 / 2
    with pytest.raises(KeyError, match="mean_length"):
        state.global_step = 3
        _log(cb, state, {"kl": 0.02, "loss": 0.0})


def test_callback_rejects_trainers_without_beta_and_beta_zero():
    with pytest.raises(TypeError, match="beta"):
        AdaptiveKLCallback(SimpleNamespace(args=None), AdaptiveKLController())
    with pytest.raises(TypeError, match="controller"):
        AdaptiveKLCallback(_stub_trainer(), object())
    trainer = _stub_trainer(beta=0.0)
    cb = AdaptiveKLCallback(trainer, AdaptiveKLController())
    with pytest.raises(ValueError, match="beta is 0"):
        cb.on_train_begin(trainer.args, TrainerState(), TrainerControl())
    trainer = _stub_trainer(beta=0.1)
    cb = AdaptiveKLCallback(trainer, FixedKLController(0.0))
    with pytest.raises(ValueError, match="non-positive"):
        cb.on_train_begin(trainer.args, TrainerState(), TrainerControl())


def test_callback_refuses_ppo_which_owns_its_kl_controller(tmp_path):
    """PPO puts β·KL in the per-token reward from its own controller: a callback writing `beta` would change nothing
    PPO trains on and overwrite its logged kl_coef, so it is refused with the PPO settings to use instead."""
    from _ppo_helpers import build_world, ppo_args, prompts, target_word

    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    world = build_world(str(tmp_path / "world"))
    trainer = PPOTrainer(
        model=world["policy"], reward_funcs=[target_word], args=ppo_args(str(tmp_path / "out"), max_steps=1),
        train_dataset=prompts(),
    )
    with pytest.raises(TypeError, match=r"PPOConfig\(kl_coef=.*kl_target="):
        AdaptiveKLCallback(trainer, AdaptiveKLController(0.1, target=1.0))
    assert not any(isinstance(cb, AdaptiveKLCallback) for cb in trainer.callback_handler.callbacks)


def test_callback_is_the_one_writer_of_beta_and_refuses_transformers_callback_restore(tmp_path):
    trainer = _stub_trainer(beta=0.5, output_dir=str(tmp_path))
    cb = AdaptiveKLCallback(trainer, FixedKLController(0.25))
    writes = []
    cb._set_beta = lambda value: writes.append(value)
    cb.on_train_begin(trainer.args, TrainerState(), TrainerControl())
    assert writes == [0.25] and trainer.beta == 0.5  # every write of beta goes through _set_beta
    trainer.args.restore_callback_states_from_checkpoint = True
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint=False"):
        callback = AdaptiveKLCallback(trainer, FixedKLController(0.25))
        callback.on_train_begin(trainer.args, TrainerState(), TrainerControl())


def test_callback_save_and_restore_on_a_stub(tmp_path):
    trainer = _stub_trainer(output_dir=str(tmp_path))
    cb = AdaptiveKLCallback(trainer, AdaptiveKLController(0.1, target=0.05, horizon=100))
    state = TrainerState()
    cb.on_train_begin(trainer.args, state, TrainerControl())
    state.global_step = 2
    _log(cb, state, {"kl": 0.2, "loss": 0.0})
    os.makedirs(tmp_path / "checkpoint-2")
    # what Trainer._save_checkpoint does: the stateful callbacks' state() goes into trainer_state.json
    TrainerState(global_step=2, stateful_callbacks=[cb]).save_to_json(str(tmp_path / "checkpoint-2" / KL_STATE_FILE))
    saved = load_kl_state(str(tmp_path / "checkpoint-2"))
    assert saved["global_step"] == 2 and saved["beta"] == trainer.beta and saved["last_update_step"] == 2

    # a new run resumed at step 2 with a fresh controller picks the saved state up
    trainer2 = _stub_trainer(beta=0.1, output_dir=str(tmp_path))
    cb2 = AdaptiveKLCallback(trainer2, AdaptiveKLController(0.1, target=0.05, horizon=100))
    state2 = TrainerState.load_from_json(str(tmp_path / "checkpoint-2" / KL_STATE_FILE))  # as Trainer.train does
    state2.global_step = 2
    cb2.on_train_begin(trainer2.args, state2, TrainerControl())
    assert trainer2.beta == trainer.beta != 0.1
    assert cb2.controller.state_dict() == cb.controller.state_dict()
    state2.global_step = 3
    _log(cb2, state2, {"kl": 0.2, "loss": 0.0})
    assert cb2.updates[-1]["n_steps"] == 8  # counted from the restored last update, not from 0


# ------------------------------------------------------------------------------------------------ real GRPOTrainer

WORDS = ["hello", "world", "good", "bad", "yes", "no", "the", "a", "cat", "dog", "runs", "sits"]


def _tiny_model_and_tokenizer(path):
    """A word-level tokenizer and a 2-layer GPT-2 built from a config, saved so that TRL can reload a reference."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def _count_cat(completions, **kwargs):
    return [float(c.split().count("cat")) for c in completions]


def _grpo_trainer(model_path, tokenizer, output_dir, max_steps):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hf_rlhf_ext.results import ResultsCallback

    prompts = Dataset.from_dict({"prompt": ["the cat", "a dog", "hello world", "the dog runs"] * 4})
    config = GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, learning_rate=5e-3, beta=0.3, logging_steps=1, save_steps=2, seed=0,
        disable_dropout=True,
        bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return GRPOTrainer(
        model=model_path, reward_funcs=_count_cat, args=config, train_dataset=prompts, processing_class=tokenizer,
        callbacks=[ResultsCallback()],
    )


def test_callback_on_a_real_grpo_trainer_with_checkpoint_and_resume(tmp_path):
    model_path, tokenizer = _tiny_model_and_tokenizer(tmp_path / "model")
    out = tmp_path / "run"
    trainer = _grpo_trainer(model_path, tokenizer, out, max_steps=4)
    # target far below the KL a lr of 5e-3 produces, a short horizon: β must move visibly
    cb = AdaptiveKLCallback(trainer, AdaptiveKLController(0.2, target=1e-4, horizon=40))
    trainer.add_callback(cb)
    trainer.train()

    train_logs = [r for r in trainer.state.log_history if "kl" in r]
    assert len(train_logs) == 4 and len(cb.updates) == 4
    for record, update in zip(train_logs, cb.updates):
        # the controller was fed exactly TRL's logged kl, with 4 completions per step
        assert update["kl_input"] == record["kl"] and update["n_steps"] == 4
        assert record["kl_coef"] == update["beta_before"] and record["kl_target"] == 1e-4
    assert cb.updates[0]["beta_before"] == 0.2
    assert trainer.beta == cb.controller.value != 0.2
    # the first KL is ≈ 0 (policy = reference, no dropout), later ones above the target: β went down, then up
    assert cb.updates[0]["kl_input"] < 1e-6 and cb.updates[0]["beta_after"] < 0.2
    assert any(u["kl_input"] > 1e-4 and u["beta_after"] > u["beta_before"] for u in cb.updates[1:])

    saved = load_kl_state(str(out / "checkpoint-2"))
    assert saved is not None and os.path.isfile(out / "checkpoint-4" / KL_STATE_FILE)
    assert saved["beta"] == pytest.approx(cb.updates[1]["beta_after"]) and saved["last_update_step"] == 2
    assert saved["beta"] != pytest.approx(0.2, rel=1e-3)  # so that a restore is distinguishable from a fresh start

    # resume from step 2 with a fresh controller: it restarts from the saved state, not from its own init
    os.remove(out / "log_history.jsonl")
    trainer2 = _grpo_trainer(model_path, tokenizer, out, max_steps=4)
    cb2 = AdaptiveKLCallback.attach(trainer2, AdaptiveKLController(0.2, target=1e-4, horizon=40))
    assert trainer2.callback_handler.callbacks[0] is cb2
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert [u["step"] for u in cb2.updates] == [3, 4]
    assert cb2.updates[0]["beta_before"] == pytest.approx(saved["beta"])
    assert cb2.controller.num_updates == 4
    assert math.isfinite(trainer2.beta) and trainer2.beta > 0
    # attached first, so ResultsCallback's log_history.jsonl carries the controller's numbers
    from hf_rlhf_ext.results import read_log_history

    records = [r for r in read_log_history(str(out)) if "kl" in r]
    assert [r["kl_coef"] for r in records] == pytest.approx([u["beta_before"] for u in cb2.updates])

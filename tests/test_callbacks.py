"""The monitoring callbacks on vanilla TRL trainers (tiny stand-in models, a few steps) and on synthetic logs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from _callbacks_helpers import (
    build_policy,
    good_reward,
    grpo_config,
    polite_reward,
    prompt_dataset,
    prompts,
    rloo_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return build_policy(str(tmp_path_factory.mktemp("cb") / "policy"))


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")


def _grpo(policy_path, out, reward_funcs=None, peft=False, cls=None, **cfg):
    from trl import GRPOTrainer

    cls = cls or GRPOTrainer
    return cls(
        model=policy_path,
        reward_funcs=reward_funcs or [good_reward],
        args=grpo_config(str(out), **cfg),
        train_dataset=prompt_dataset(),
        peft_config=_lora() if peft else None,
    )


def _logged(trainer, key):
    return [(r["step"], r[key]) for r in trainer.state.log_history if key in r]


# ----------------------------------------------------------------------------------------------------------------------
# Trainer checks


def test_callbacks_reject_unsupported_trainers(policy_path, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_rlhf_ext.callbacks import (
        GroupAdvantageCheckCallback,
        KLToReferenceCallback,
        OveroptimizationCallback,
        UnsupportedTrainerError,
    )

    plain = Trainer(
        model=AutoModelForCausalLM.from_pretrained(policy_path),
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
    )
    with pytest.raises(UnsupportedTrainerError, match="GRPOTrainer and trl.RLOOTrainer"):
        KLToReferenceCallback(plain, prompts(4), allow_reference_copy=True)
    with pytest.raises(UnsupportedTrainerError, match="Trainer"):
        GroupAdvantageCheckCallback(plain)
    with pytest.raises(UnsupportedTrainerError):
        OveroptimizationCallback(plain, gold="x")
    with pytest.raises(UnsupportedTrainerError, match="needs the trainer"):
        KLToReferenceCallback(None, prompts(4))


# ----------------------------------------------------------------------------------------------------------------------
# KL to the reference


def test_kl_callback_lora_zero_at_start_positive_after_training(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import KLToReferenceCallback

    torch.manual_seed(0)
    trainer = _grpo(policy_path, tmp_path, peft=True, max_steps=6, learning_rate=5e-2)
    cb = KLToReferenceCallback(trainer, prompts(8), every_n_steps=3, num_samples=16)
    assert cb.reference.kind == "peft_adapter_disabled"
    trainer.add_callback(cb)
    trainer.train()
    # measured at start and every 3 steps only: nothing in between
    assert [h["step"] for h in cb.history] == [0, 3, 6]
    start = cb.history[0]
    assert abs(start["kl_ref/k1_seq"]) < 1e-6 and abs(start["kl_ref/k3_seq"]) < 1e-6  # adapter initialised to 0
    logged = _logged(trainer, "kl_ref/k3_seq")
    assert [s for s, _ in logged] == [3, 6]
    assert logged[-1][1] == pytest.approx(cb.history[-1]["kl_ref/k3_seq"])
    assert logged[-1][1] > 1e-4  # the LoRA policy moved away from its base
    assert cb.history[-1]["kl_ref/completion_length"] > 0
    assert not any("kl_ref/k1_seq" in r for r in trainer.state.log_history if r["step"] in (1, 2, 4, 5))


def test_exact_kl_is_the_whole_vocabulary_kl_of_each_sampled_position(policy_path, tmp_path):
    """One-token completions: the position's exact KL is KL(π(·|prompt) ‖ π_ref(·|prompt)), whatever token was drawn;
    computed here by hand from one forward pass of each model over the prompts. k1 and k3 estimate it from the
    drawn token alone (unbiased over draws, not equal per completion)."""
    from hf_rlhf_ext.callbacks import KLToReferenceCallback

    torch.manual_seed(0)
    trainer = _grpo(policy_path, tmp_path, max_steps=1, temperature=0.7)
    cb = KLToReferenceCallback(trainer, prompts(8), num_samples=8, allow_reference_copy=True, max_new_tokens=1)
    cb.reference.snapshot()
    with torch.no_grad():  # move the policy away from the frozen reference copy
        for p in trainer.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    stats = cb.measure(step=1)
    tok = trainer.processing_class
    tok.padding_side = "left"
    enc = tok(prompts(8), return_tensors="pt", padding=True, add_special_tokens=False)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), cb.reference.model(trainer.model) as ref:
        logq = torch.log_softmax(ref(**enc, position_ids=position_ids).logits[:, -1].float() / 0.7, -1)
    with torch.no_grad():
        logp = torch.log_softmax(trainer.model(**enc, position_ids=position_ids).logits[:, -1].float() / 0.7, -1)
    by_hand = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert by_hand > 1e-3
    assert stats["kl_ref/exact_seq"] == pytest.approx(by_hand, rel=1e-4)
    assert stats["kl_ref/k1_seq"] != pytest.approx(by_hand, rel=1e-3)  # a single-draw estimate differs


@pytest.mark.parametrize("batch_size", [8, 3])
def test_exact_kl_of_whole_completions_equals_brute_force(policy_path, tmp_path, batch_size):
    """Multi-token completions (left-padded prompts, rows ending at different steps): ``exact_seq`` equals the
    brute-force sum over completion positions of KL(π(·|s_t) ‖ π_ref(·|s_t)) from one full forward pass of each
    model — read off the sampler's own log-softmax (all completions in one micro-batch, batch_size 8) and from the
    policy's forward pass (three micro-batches)."""
    from hf_rlhf_ext.callbacks import KLToReferenceCallback
    from hf_rlhf_ext.sampling import completion_log_softmax

    torch.manual_seed(0)
    trainer = _grpo(policy_path, tmp_path, max_steps=1, temperature=0.7)
    mixed = prompts(6) + ["customer : my lamp agent :", "customer : lamp broken sorry thank you good agent :"]
    cb = KLToReferenceCallback(trainer, mixed, num_samples=8, allow_reference_copy=True, max_new_tokens=10,
                               batch_size=batch_size)
    cb.reference.snapshot()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    with cb.sampler.policy_for_generation() as policy:
        b = cb.sampler.sample(policy, 1, full_log_probs=True)
        assert (b.log_probs is not None) == (batch_size == 8)
        stats = cb.measure(step=1)  # the same seed: the same completions
        with torch.no_grad(), cb.reference.model(policy) as ref:
            logq = completion_log_softmax(ref, b.prompt_ids, b.prompt_mask, b.completion_ids, 0.7)
        with torch.no_grad():
            logp = completion_log_softmax(policy, b.prompt_ids, b.prompt_mask, b.completion_ids, 0.7)
    lengths = b.completion_mask.sum(1)
    assert b.prompt_mask.min() == 0 and lengths.min() < lengths.max()
    per_position = (logp.exp() * (logp - logq)).sum(-1) * b.completion_mask
    by_hand = float(per_position.sum(-1).mean())
    assert by_hand > 1e-2
    assert stats["kl_ref/exact_seq"] == pytest.approx(by_hand, rel=1e-4)
    assert stats["kl_ref/completion_length"] == pytest.approx(float(lengths.float().mean()))


@pytest.mark.parametrize("peft", [False, True])
def test_held_out_sampler_kv_cache_matches_forward_log_probs(policy_path, tmp_path, peft):
    """The KV-cache sampler's log-probs are those of a full forward pass at the same positions (left-padded prompts
    of different lengths); it starts with the same draws as generate() with the same seed; the seed follows the step."""
    from hf_rlhf_ext.callbacks._trainer_access import HeldOutSampler
    from hf_rlhf_ext.sampling import per_token_logps

    trainer = _grpo(policy_path, tmp_path, peft=peft, max_steps=1, temperature=0.7)
    mixed = prompts(6) + ["customer : my lamp agent :", "customer : lamp broken sorry thank you good agent :"]
    fast = HeldOutSampler(trainer, mixed, num_samples=8, batch_size=5, max_new_tokens=12)
    slow = HeldOutSampler(trainer, mixed, num_samples=8, batch_size=5, max_new_tokens=12, use_kv_cache=False)
    with fast.policy_for_generation() as policy:
        a, b = fast.sample(policy, step=3), slow.sample(policy, step=3)
        again, other = fast.sample(policy, step=3), fast.sample(policy, step=4)
        forward = per_token_logps(policy, a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask, 0.7)
    assert b.logps is None and a.logps is not None
    # the first chunk's first draws come before any row has left the batch (later chunks follow other RNG draws)
    assert torch.equal(a.completion_ids[:5, 0], b.completion_ids[:5, 0])
    assert again.completion_ids_list == a.completion_ids_list and other.completion_ids_list != a.completion_ids_list
    assert a.prompt_mask.min() == 0  # padding was exercised
    lengths = a.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows finished at different steps
    assert a.logps.shape == forward.shape
    torch.testing.assert_close(a.logps, forward, atol=1e-5, rtol=0)
    assert (a.logps[a.completion_mask == 0] == 0).all()
    assert float(a.logps.sum()) < -1.0  # genuine log-probs, not zeros
    assert [len(c) for c in a.completion_ids_list] == lengths.tolist()


def test_kl_callback_needs_reference_or_permission(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import KLToReferenceCallback

    trainer = _grpo(policy_path, tmp_path, max_steps=4, learning_rate=5e-2)  # beta = 0, no PEFT: no reference
    with pytest.raises(ValueError, match="allow_reference_copy=True"):
        KLToReferenceCallback(trainer, prompts(4))
    cb = KLToReferenceCallback(trainer, prompts(4), every_n_steps=2, num_samples=8, allow_reference_copy=True)
    trainer.add_callback(cb)
    trainer.train()
    assert cb.reference.kind == "frozen_copy"
    assert abs(cb.history[0]["kl_ref/k1_seq"]) < 1e-6
    ref = cb.reference._copy
    assert all(not p.requires_grad for p in ref.parameters())
    # the copy is the *initial* policy: the trained policy's weights differ from it ...
    trained = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in ref.named_parameters())
    # ... and its forward runs its own weights (a deep copy of TRL's wrapped forward would run the live policy's)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert not torch.allclose(ref(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
    assert cb.history[-1]["kl_ref/k3_seq"] > 1e-3


def test_resuming_with_a_frozen_copy_as_reference_is_refused(policy_path, tmp_path):
    """The copy is taken at train begin: after a resume it would be the resumed policy, and the KL would restart at
    0."""
    from transformers import TrainerControl, TrainerState

    from hf_rlhf_ext.callbacks import KLToReferenceCallback

    trainer = _grpo(policy_path, tmp_path, max_steps=4)  # beta = 0, no PEFT: only a copy can be the reference
    cb = KLToReferenceCallback(trainer, prompts(4), num_samples=4, allow_reference_copy=True, measure_at_start=False)
    trainer.add_callback(cb)
    with pytest.raises(ValueError, match="frozen copy"):
        cb.on_train_begin(trainer.args, TrainerState(global_step=2), TrainerControl())
    cb.on_train_begin(trainer.args, TrainerState(global_step=0), TrainerControl())  # a fresh start takes the copy
    assert cb.reference._copy is not None


def test_kl_callback_uses_trl_reference_when_beta_positive(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import KLToReferenceCallback

    trainer = _grpo(policy_path, tmp_path, max_steps=2, beta=0.1)
    cb = KLToReferenceCallback(trainer, prompts(4), every_n_steps=2, num_samples=8, measure_at_start=False)
    assert cb.reference.kind == "trainer_ref_model"
    trainer.add_callback(cb)
    trainer.train()
    assert [h["step"] for h in cb.history] == [2]
    assert cb.history[0]["kl_ref/k3_seq"] > 1e-5  # two updates moved the policy away from TRL's frozen reference


# ----------------------------------------------------------------------------------------------------------------------
# Group advantages


@pytest.mark.parametrize(
    "cfg",
    [{}, {"scale_rewards": "batch"}, {"scale_rewards": "none"}, {"multi_objective_aggregation": "normalize_then_sum"}],
)
def test_group_check_passes_on_vanilla_grpo(policy_path, tmp_path, cfg):
    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback

    trainer = _grpo(policy_path, tmp_path, reward_funcs=[good_reward, polite_reward], max_steps=3, **cfg)
    cb = GroupAdvantageCheckCallback(trainer, on_violation="raise")
    trainer.add_callback(cb)
    trainer.train()
    assert len(cb.history) == 3 and not cb.violations
    logged = _logged(trainer, "adv_check/max_abs_diff")
    assert [s for s, _ in logged] == [1, 2, 3]
    assert all(v < 1e-5 for _, v in logged)
    assert all(v < 1e-5 for _, v in _logged(trainer, "adv_check/max_abs_group_mean"))
    assert all(v == 0 for _, v in _logged(trainer, "adv_check/sign_mismatch_frac"))
    assert all(0 <= v <= 4 for _, v in _logged(trainer, "adv_check/zero_std_groups"))
    if cfg == {}:  # group scaling: |A| <= (G - 1) / sqrt(G) = 1.5 for G = 4
        assert all(v <= 1.5 + 1e-3 for _, v in _logged(trainer, "adv_check/max_abs_adv"))
    # the wrapper is removed after training
    assert "_generate_and_score_completions" not in vars(trainer)


def test_group_check_on_rloo_with_kl_in_reward(policy_path, tmp_path):
    from trl import RLOOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback

    trainer = RLOOTrainer(
        model=policy_path, reward_funcs=[good_reward, polite_reward],
        args=rloo_config(str(tmp_path), max_steps=3, beta=0.05, learning_rate=2e-2), train_dataset=prompt_dataset(),
    )
    cb = GroupAdvantageCheckCallback(trainer, on_violation="raise")
    trainer.add_callback(cb)
    trainer.train()
    assert cb.method == "rloo" and not cb.violations and len(cb.history) == 3
    assert all(v < 1e-4 for _, v in _logged(trainer, "adv_check/max_abs_diff"))
    # a wrong KL term would be caught: recomputing without it misses the logged advantages
    from hf_rlhf_ext.callbacks.group_advantage import expected_advantages

    names = trainer.reward_func_names
    rpf = torch.tensor([list(trainer._logs["rewards"][n]) for n in names]).T
    no_kl, _ = expected_advantages(rpf, trainer.reward_weights, 4, method="rloo", beta=0.0)
    logged = torch.tensor(list(trainer._logs["advantages"]))
    assert (no_kl - logged).abs().max() > 1e-4


def _unscaled_grpo_class():
    """A GRPO trainer with a silent bug: it trains on r − mean (no division by the std) although
    scale_rewards='group' is configured — group means stay 0 and signs stay right."""
    from trl import GRPOTrainer

    class Unscaled(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            names = self.reward_func_names
            n = out["advantages"].shape[0]
            r = torch.tensor([list(self._logs["rewards"][k])[-n:] for k in names]).T
            r = (r * self.reward_weights).sum(1)
            adv = r - r.view(-1, self.num_generations).mean(1).repeat_interleave(self.num_generations)
            adv = adv * 3.0  # large enough to differ from the scaled version
            out["advantages"] = adv
            for i in range(n):
                self._logs["advantages"][len(self._logs["advantages"]) - n + i] = float(adv[i])
            return out

    return Unscaled


def test_group_check_catches_missing_scaling(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback, GroupAdvantageViolation

    trainer = _grpo(policy_path, tmp_path, cls=_unscaled_grpo_class(), max_steps=3, reward_funcs=[polite_reward])
    trainer.add_callback(GroupAdvantageCheckCallback(trainer, on_violation="raise"))
    with pytest.raises(GroupAdvantageViolation, match="recompute|exceed"):
        trainer.train()


def test_group_check_warns_on_flipped_advantages(policy_path, tmp_path):
    """Corrupts the advantages the loss uses (sign flipped) but not the logs: caught as used ≠ logged."""
    from trl import GRPOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback

    class Flipped(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            out["advantages"] = -out["advantages"]
            return out

    trainer = _grpo(policy_path, tmp_path, cls=Flipped, max_steps=2, reward_funcs=[polite_reward])
    cb = GroupAdvantageCheckCallback(trainer, on_violation="warn")
    trainer.add_callback(cb)
    with pytest.warns(RuntimeWarning, match="used_vs_logged"):
        trainer.train()
    assert {v["kind"] for v in cb.violations} == {"used_vs_logged"}
    assert all(v > 0.1 for _, v in _logged(trainer, "adv_check/used_vs_logged_diff"))
    assert all(v >= 1 for _, v in _logged(trainer, "adv_check/violations"))


def test_group_check_catches_corrupted_logged_signs(policy_path, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback

    class Shifted(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            out["advantages"] = out["advantages"] + 0.5  # a bad baseline: group means no longer 0
            n = out["advantages"].shape[0]
            for i in range(n):
                self._logs["advantages"][len(self._logs["advantages"]) - n + i] += 0.5
            return out

    trainer = _grpo(policy_path, tmp_path, cls=Shifted, max_steps=2, reward_funcs=[polite_reward])
    cb = GroupAdvantageCheckCallback(trainer, on_violation="warn")
    trainer.add_callback(cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    kinds = {v["kind"] for v in cb.violations}
    assert {"group_mean", "recompute"} <= kinds
    assert all(v == pytest.approx(0.5, abs=1e-4) for _, v in _logged(trainer, "adv_check/max_abs_group_mean"))


def test_group_check_rejects_per_token_advantages(policy_path, tmp_path):
    from trl import GRPOTrainer

    from hf_rlhf_ext.callbacks import GroupAdvantageCheckCallback, UnsupportedTrainerError

    class PerToken(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            out["advantages"] = out["advantages"].unsqueeze(1).expand_as(out["completion_mask"]).clone()
            return out

    trainer = _grpo(policy_path, tmp_path, cls=PerToken, max_steps=1)
    trainer.add_callback(GroupAdvantageCheckCallback(trainer))
    with pytest.raises(UnsupportedTrainerError, match="per-token"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------------
# Over-optimisation: synthetic log sequences


def _feed(cb, series, output_dir):
    """Feeds (step, proxy, gold) through on_log as the trainer would; returns the control flags seen."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    stops = []
    cb.on_train_begin(args, state, control)
    for step, proxy, gold in series:
        state.global_step = step
        cb.on_log(args, state, control, logs={"reward": proxy, "rewards/gold/mean": gold, "loss": 0.0})
        stops.append((step, control.should_training_stop))
    cb.on_log(args, state, control, logs={"train_runtime": 1.0})  # summary record: ignored
    cb.on_train_end(args, state, control)
    return stops


def _hump(step: int) -> float:
    return 1.0 - ((step - 25) / 25.0) ** 2


def test_overoptimization_finds_peak_and_stops(tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    series = [(s, 0.02 * s, _hump(s)) for s in range(0, 80, 5)]
    cb = OveroptimizationCallback(
        proxy="reward", gold="gold", smoothing="window", window=1, patience=3, min_delta=0.01,
        stop_on_overoptimization=True, save_peak=False,
    )
    with pytest.warns(RuntimeWarning, match="over-optimisation"):
        stops = _feed(cb, series, tmp_path)
    f = cb.findings()
    assert f.detected and f.gold_fell and f.stopped
    assert f.peak_step == 25 and f.peak_gold == pytest.approx(1.0)
    assert f.first_flag_step == 30
    assert f.detected_step == 40  # three measurements after the peak
    assert [s for s, stop in stops if stop][0] == 40
    assert f.final_gold < f.peak_gold and f.final_proxy > f.proxy_at_peak
    saved = json.loads((tmp_path / "overoptimization.json").read_text())
    assert saved["findings"]["peak_step"] == 25 and len(saved["points"]) == len(series)
    assert (tmp_path / "overoptimization.png").stat().st_size > 1000


def test_overoptimization_ema_smoothing_tolerates_noise(tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(20, generator=gen) - 0.5) * 0.2
    series = [(s, 0.02 * s, _hump(s) + float(noise[i])) for i, s in enumerate(range(0, 100, 5))]
    cb = OveroptimizationCallback(proxy="reward", gold="gold", ema_alpha=0.5, patience=3, min_delta=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _feed(cb, series, tmp_path)
    f = cb.findings()
    assert f.detected
    assert 20 <= f.peak_step <= 35
    assert f.peak_gold > f.final_gold + 0.5


def test_overoptimization_ema_weights_the_newest_value_by_alpha(tmp_path):
    """smoothed_t = α·x_t + (1 − α)·smoothed_{t−1}, with α = 0.2 so that swapping α and 1 − α shows."""
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    cb = OveroptimizationCallback(proxy="reward", gold="gold", ema_alpha=0.2, min_delta=0.0, save_peak=False)
    _feed(cb, [(0, 0.0, 0.0), (5, 1.0, 1.0), (10, 1.0, 1.0)], tmp_path)
    assert [p["gold_smooth"] for p in cb.points] == pytest.approx([0.0, 0.2, 0.36])
    assert [p["proxy_smooth"] for p in cb.points] == pytest.approx([0.0, 0.2, 0.36])


def test_overoptimization_a_rise_below_min_delta_does_not_move_the_peak(tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    series = [(0, 0.0, 0.0), (5, 0.1, 1.0), (10, 0.2, 1.03), (15, 0.3, 1.04), (20, 0.4, 1.07)]
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, min_delta=0.05,
                                  save_peak=False)
    _feed(cb, series[:4], tmp_path)
    assert cb.findings().peak_step == 5  # +0.03 and +0.04 are inside min_delta: not a new peak
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, min_delta=0.05,
                                  save_peak=False)
    _feed(cb, series, tmp_path)
    assert cb.findings().peak_step == 20  # +0.07 over the peak is


def test_overoptimization_not_flagged_when_gold_keeps_rising(tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    series = [(s, 0.02 * s, 0.01 * s) for s in range(0, 80, 5)]
    cb = OveroptimizationCallback(proxy="reward", gold="gold", stop_on_overoptimization=True, save_peak=False)
    stops = _feed(cb, series, tmp_path)
    f = cb.findings()
    assert not f.detected and not f.gold_fell and not any(s for _, s in stops)
    assert f.peak_step == 75 and f.first_flag_step is None


def test_overoptimization_gold_falls_with_proxy_is_not_goodhart(tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    series = [(s, _hump(s), _hump(s)) for s in range(0, 80, 5)]  # both fall: collapse, not reward hacking
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False)
    _feed(cb, series, tmp_path)
    f = cb.findings()
    assert f.gold_fell and not f.detected and f.first_flag_step is None


def test_overoptimization_missing_key_is_a_clear_error(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    cb = OveroptimizationCallback(proxy="reward", gold="gold_reward")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(KeyError, match="rewards/gold_reward/mean"):
        cb.on_log(args, TrainerState(), TrainerControl(), logs={"reward": 1.0, "rewards/proxy/mean": 1.0})


def test_overoptimization_writes_only_on_main_process(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    cb = OveroptimizationCallback(proxy="reward", gold="gold")
    cb.update(1, 0.1, 0.2)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=False)
    cb.on_train_end(args, state, TrainerControl())
    assert not (tmp_path / "out" / "overoptimization.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Over-optimisation on real trainers


def test_overoptimization_logs_mode_on_grpo(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    trainer = _grpo(
        policy_path, tmp_path, reward_funcs=[good_reward, polite_reward], reward_weights=[1.0, 0.0], max_steps=4,
    )
    with pytest.raises(ValueError, match="not one of the trainer's reward functions"):
        OveroptimizationCallback(trainer, gold=lambda prompts, completions, **kw: [0.0] * len(completions))
    cb = OveroptimizationCallback(trainer)  # defaults: proxy = the weighted function, gold = the weight-0 one
    assert (cb.proxy_key, cb.gold_key) == ("rewards/good_reward/mean", "rewards/polite_reward/mean")
    trainer.add_callback(cb)
    trainer.train()
    f = cb.findings()
    assert f.num_points == 4 and f.gold_name == "polite_reward"
    golds = [v for _, v in _logged(trainer, "rewards/polite_reward/mean")]
    assert [p["gold"] for p in cb.points] == pytest.approx(golds)
    assert _logged(trainer, "overopt/gold")  # logged (one record later)
    peak_dir = tmp_path / "gold_peak"
    assert (peak_dir / "config.json").exists() and (peak_dir / "tokenizer.json").exists()
    assert json.loads((peak_dir / "peak_info.json").read_text())["step"] == f.peak_step
    assert (tmp_path / "overoptimization.json").exists() and (tmp_path / "overoptimization.png").exists()


def test_overoptimization_one_kl_series_aligned_with_its_steps(policy_path, tmp_path):
    """β > 0 (TRL logs its training `kl` every step) and a KL monitor measuring held-out k3 every 2 steps: the default
    monitor tracks the held-out k3 only, at the steps it was measured; one given kl_key="kl" tracks the training KL
    only. Each monitor's overopt/* values sit in the log record of the rewards they come from."""
    from hf_rlhf_ext.callbacks import KLToReferenceCallback, OveroptimizationCallback

    trainer = _grpo(
        policy_path, tmp_path, reward_funcs=[good_reward, polite_reward], reward_weights=[1.0, 0.0], max_steps=4,
        beta=0.04, learning_rate=5e-2,
    )
    kl_monitor = KLToReferenceCallback(trainer, prompts(8), every_n_steps=2, num_samples=8)
    held_out = OveroptimizationCallback(trainer, save_peak=False)
    training = OveroptimizationCallback(trainer, kl_key="kl", save_peak=False, output_dir=str(tmp_path / "train_kl"))
    for cb in (kl_monitor, held_out, training):
        trainer.add_callback(cb)
    trainer.train()

    measured = {h["step"]: h["kl_ref/k3_seq"] for h in kl_monitor.history}
    assert held_out.kl_source == "held_out_k3"
    assert [(p["step"], p["kl"]) for p in held_out.points] == [
        (1, None), (2, pytest.approx(measured[2])), (3, None), (4, pytest.approx(measured[4]))
    ]
    f = held_out.findings()
    assert f.kl_source == "held_out_k3" and f.final_kl == pytest.approx(measured[4]) and f.final_kl_step == 4
    saved = json.loads((tmp_path / "overoptimization.json").read_text())
    assert saved["findings"]["kl_source"] == "held_out_k3" and saved["settings"]["kl_source"] == "held_out_k3"

    train_kl = dict(_logged(trainer, "kl"))
    assert training.kl_source == "training_kl" and training.findings().kl_source == "training_kl"
    assert [(p["step"], p["kl"]) for p in training.points] == [(s, pytest.approx(train_kl[s])) for s in (1, 2, 3, 4)]

    records = [r for r in trainer.state.log_history if "rewards/polite_reward/mean" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("overopt/gold" in r for r in records)  # same record, not the next one
    assert records[0]["overopt/gold"] == pytest.approx(records[0]["rewards/polite_reward/mean"])  # EMA starts at raw
    assert [r["overopt/gold"] for r in records] == pytest.approx([p["gold_smooth"] for p in training.points])


def test_overoptimization_kl_from_logs_never_mixes_keys(tmp_path):
    """Synthetic logs with the training `kl` every step and the held-out `kl_ref/*` every other step: the series keeps
    the one key asked for (no sawtooth between quantities), at the steps it was logged."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    default, held_out = (
        OveroptimizationCallback(proxy="reward", gold="gold", save_peak=False, plot=False, **kw)
        for kw in ({}, {"kl_key": "kl_ref/k3_seq"})
    )
    for cb in (default, held_out):
        state, control = TrainerState(), TrainerControl()
        cb.on_train_begin(args, state, control)
        for step in range(1, 7):
            state.global_step = step
            logs = {"reward": 0.1 * step, "rewards/gold/mean": 0.1, "kl": 0.01 * step}
            if step % 2 == 0:
                logs.update({"kl_ref/k1_seq": 1.0 * step, "kl_ref/k3_seq": 2.0 * step})
            cb.on_log(args, state, control, logs=logs)
            assert logs["overopt/gold"] == pytest.approx(0.1)  # added to the record being logged
    assert default.kl_source == "training_kl"
    assert [p["kl"] for p in default.points] == pytest.approx([0.01 * s for s in range(1, 7)])
    assert held_out.kl_source == "held_out_k3"
    assert [p["kl"] for p in held_out.points] == [None, 4.0, None, 8.0, None, 12.0]
    f = held_out.findings()
    assert (f.kl_at_peak, f.kl_at_peak_step, f.final_kl, f.final_kl_step) == (None, None, 12.0, 6)  # peak at step 1


def test_overoptimization_with_an_ensemble_judge_as_gold(policy_path, tmp_path):
    """No gold reward: a held-out judge (an ensemble penalised by its disagreement) tracked at weight 0 stands in."""
    from hf_rlhf_ext.callbacks import OveroptimizationCallback
    from hf_rlhf_ext.rewards import ensemble_judge, tracking

    judge = ensemble_judge([polite_reward, tracking(good_reward, "good_again")], penalty=0.5, name="judge")
    trainer = _grpo(
        policy_path, tmp_path, reward_funcs=[good_reward, judge], reward_weights=[1.0, 0.0], max_steps=3,
    )
    cb = OveroptimizationCallback(trainer, save_peak=False)
    assert cb.gold_key == "rewards/judge/mean"
    trainer.add_callback(cb)
    trainer.train()
    assert cb.findings().gold_name == "judge" and len(cb.points) == 3
    assert [p["gold"] for p in cb.points] == pytest.approx([v for _, v in _logged(trainer, "rewards/judge/mean")])
    assert all(v >= 0 for _, v in _logged(trainer, "judge/disagreement"))
    assert len(_logged(trainer, "judge/disagreement")) == 3


def test_overoptimization_needs_a_gold(policy_path, tmp_path):
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    trainer = _grpo(policy_path, tmp_path, reward_funcs=[good_reward], max_steps=1)
    with pytest.raises(ValueError, match="Say which reward is the gold"):
        OveroptimizationCallback(trainer)


def test_overoptimization_sample_mode_on_rloo(policy_path, tmp_path):
    from trl import RLOOTrainer

    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    trainer = RLOOTrainer(
        model=policy_path, reward_funcs=[good_reward], args=rloo_config(str(tmp_path), max_steps=4),
        train_dataset=prompt_dataset(),
    )
    cb = OveroptimizationCallback(
        trainer, proxy="good_reward", gold=polite_reward, eval_prompts=prompts(8), every_n_steps=2, num_samples=8,
    )
    assert cb.mode == "sample" and cb.reference is not None  # RLOO's beta > 0: TRL's ref model is reused
    trainer.add_callback(cb)
    trainer.train()
    assert [p["step"] for p in cb.points] == [0, 2, 4]
    assert all(p["gold"] is not None and p["kl"] is not None for p in cb.points)
    assert abs(cb.points[0]["kl"]) < 1e-6
    assert [s for s, _ in _logged(trainer, "overopt/gold")] == [2, 4]
    # measuring does not change the training samples (sampling under a forked RNG)
    trainer2 = RLOOTrainer(
        model=policy_path, reward_funcs=[good_reward], args=rloo_config(str(tmp_path / "b"), max_steps=4),
        train_dataset=prompt_dataset(),
    )
    trainer2.train()
    assert _logged(trainer, "rewards/good_reward/mean") == _logged(trainer2, "rewards/good_reward/mean")


# ----------------------------------------------------------------------------------------------------------------------
# End to end on the lab: GRPO with a too-small β over-optimises the proxy RM


@pytest.mark.slow
def test_overoptimization_end_to_end_on_lab(tmp_path):
    """GRPO, lr 3e-4, 32 completions/step, G = 8, β = 0.02: the gold reward peaks early and falls while
    the proxy keeps rising. The callback (held-out sampling every 5 steps) must find the peak, flag the fall while the
    proxy rises, and keep a checkpoint that is better on gold than the final model on fresh held-out samples."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from hf_rlhf_ext.callbacks import OveroptimizationCallback
    from hf_rlhf_ext.lab import build_lab
    from hf_rlhf_ext.lab.build import policy_quality
    from hf_rlhf_ext.lab.rewards import lab_gold_reward, lab_proxy_reward

    torch.set_num_threads(1)
    lab = build_lab()
    data = lab.load_prompts()
    held_out = list(data["test"]["prompt"])
    trainer = GRPOTrainer(
        model=lab.policy_path,
        reward_funcs=[lab_proxy_reward, lab_gold_reward],
        args=GRPOConfig(
            output_dir=str(tmp_path), reward_weights=[1.0, 0.0], beta=0.02, learning_rate=3e-4,
            per_device_train_batch_size=32, num_generations=8, max_completion_length=32, max_steps=150,
            logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            gradient_checkpointing=False, seed=0, disable_tqdm=True, log_level="error",
        ),
        train_dataset=data["train"],
    )
    sampled = OveroptimizationCallback(
        trainer, proxy=lab_proxy_reward, gold=lab_gold_reward, eval_prompts=held_out, every_n_steps=5,
        num_samples=64, patience=3, min_delta=0.02,
    )
    from_logs = OveroptimizationCallback(trainer, save_peak=False, output_dir=str(tmp_path / "logs_mode"))
    trainer.add_callback(sampled)
    trainer.add_callback(from_logs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    f = sampled.findings()
    # fresh held-out evaluation of the kept checkpoint and of the final model (other seed, 4 samples per prompt)
    tok = lab.load_tokenizer()
    peak_model = AutoModelForCausalLM.from_pretrained(f.checkpoint_dir)
    final_model = trainer.model
    eval_prompts = held_out * 4
    peak_q = policy_quality(peak_model, tok, eval_prompts, lab.config, seed=123)
    final_q = policy_quality(final_model, tok, eval_prompts, lab.config, seed=123)
    init_q = policy_quality(AutoModelForCausalLM.from_pretrained(lab.policy_path), tok, eval_prompts, lab.config, 123)
    numbers = {
        "sampled": f.to_dict(), "from_logs": from_logs.findings().to_dict(),
        "gold_initial": init_q["gold_mean"], "gold_at_checkpoint": peak_q["gold_mean"],
        "gold_final": final_q["gold_mean"],
    }
    print(json.dumps(numbers, indent=2))
    assert f.detected and f.first_flag_step is not None
    assert 0 < f.peak_step < 100
    assert f.final_proxy > f.proxy_at_peak  # the proxy still rose after the gold peak
    assert f.final_gold < f.peak_gold - 0.1
    assert f.checkpoint_step == f.peak_step
    assert peak_q["gold_mean"] > final_q["gold_mean"] + 0.1
    assert peak_q["gold_mean"] > init_q["gold_mean"]  # the checkpoint kept the real improvement
    assert os.path.isfile(tmp_path / "overoptimization.png")

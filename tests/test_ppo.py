"""PPOTrainer on tiny stand-in models: where the KL and the score land, the value loss, what trains and what must not,
G = 1 and 2, LoRA (with and without a critic on the shared base), checkpoints, reload, a chat model, bad settings."""

from __future__ import annotations

import pytest
import torch
from _ppo_helpers import build_tiny_llama, build_world, ppo_args, prompts, target_word

from hf_rlhf_ext.objectives import clipped_value_loss, kl_estimate, token_level_rewards
from hf_rlhf_ext.persisted_state import read_checkpoint_state
from hf_rlhf_ext.trainers.critic import VALUE_MODEL_DIR
from hf_rlhf_ext.trainers.kl_control import AdaptiveKLController
from hf_rlhf_ext.trainers.ppo import PPOTrainer
from hf_rlhf_ext.trainers.ppo_config import PPOConfig
from hf_rlhf_ext.trainers.value_model import ValueModel


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("ppo_world")))


def _trainer(world, out, reward_funcs=None, **overrides):
    peft_config = overrides.pop("peft_config", None)
    dataset = overrides.pop("train_dataset", None) or prompts()
    args = ppo_args(str(out), **overrides)
    funcs = reward_funcs if reward_funcs is not None else [world["reward"], target_word]
    return PPOTrainer(model=world["policy"], reward_funcs=funcs, args=args, train_dataset=dataset,
                      peft_config=peft_config)


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM", **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
def test_config_maps_ppo_names_onto_grpo_fields(tmp_path):
    args = ppo_args(str(tmp_path), kl_coef=0.1, cliprange=0.3, num_ppo_epochs=3, num_mini_batches=2,
                    gradient_accumulation_steps=2)
    assert (args.beta, args.epsilon, args.num_iterations) == (0.1, 0.3, 3)
    assert args.num_generations == 1 and args.steps_per_generation == 4
    assert args.generation_batch_size == 4 * 4  # per-device batch × steps per generation
    if not torch.cuda.is_available():
        cpu_default = PPOConfig(output_dir=str(tmp_path), report_to="none")
        assert cpu_default.bf16 is False and cpu_default.gradient_checkpointing is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"beta": 0.3}, "kl_coef"),
        ({"num_iterations": 2}, "num_ppo_epochs"),
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"kl_target": 6.0, "kl_coef": 0.0}, "kl_target"),
        ({"loss_type": "cispo"}, "bnpo"),
        ({"per_device_train_batch_size": 1}, "at least 2 completions"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ppo_args(str(tmp_path), **overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Rewards, values, losses
# ----------------------------------------------------------------------------------------------------------------------
def test_token_level_rewards_put_kl_everywhere_and_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.1, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, non_score = token_level_rewards(scores, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, -0.1, -0.15, -0.2], [-0.25, 0.05, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15, 1.8], [-0.25, -0.95, 0.0, 0.0]]))


def test_token_loss_aggregations_match_their_definitions():
    from hf_rlhf_ext.objectives import aggregate_token_loss

    loss = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(aggregate_token_loss(loss, mask, "bnpo")) == pytest.approx(10.0 / 4)  # token mean
    assert float(aggregate_token_loss(loss, mask, "grpo")) == pytest.approx((2.0 + 4.0) / 2)  # mean of row means
    assert float(aggregate_token_loss(loss, mask, "dr_grpo", max_length=5)) == pytest.approx(10.0 / (2 * 5))
    assert float(aggregate_token_loss(loss, mask, "dapo", num_tokens=8.0)) == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError, match="max_length"):
        aggregate_token_loss(loss, mask, "dr_grpo")


def test_rollout_rewards_and_returns_follow_the_kl_shaped_reward(world, tmp_path):
    """End to end on one rollout: r_t = −β·k1_t plus the weighted score at the last token, and (γ = λ = 1, V ≡ 0)
    the return at each token is the reward-to-go."""
    trainer = _trainer(world, tmp_path, gamma=1.0, lam=1.0, kl_coef=0.5, reward_weights=[1.0, 2.0],
                       missing_eos_penalty=1.5, max_completion_length=8)
    with torch.no_grad():  # move the policy away from the reference so that the KL is not ~0
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    r = trainer.last_rollout
    mask = out["completion_mask"].float()
    kl = kl_estimate(r.logps, r.ref_logps, "k1") * mask
    assert kl.abs().sum() > 1e-3
    torch.testing.assert_close(r.kl, kl)
    # the score: weighted sum of the two reward functions, minus the penalty where no EOS was produced
    rewards = r.rewards_per_func
    has_eos = (out["completion_ids"] == trainer.processing_class.eos_token_id).any(dim=1)
    expected_scores = rewards[:, 0] + 2.0 * rewards[:, 1] - 1.5 * (~has_eos).float()
    torch.testing.assert_close(r.scores, expected_scores)
    last = mask.sum(1).long() - 1
    expected = -0.5 * kl
    expected[torch.arange(4), last] += expected_scores
    torch.testing.assert_close(r.token_rewards, expected)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(expected, [1]), 1), [1]) * mask
    assert torch.count_nonzero(r.values) == 0  # zero-initialised critic
    torch.testing.assert_close(out["returns"], reward_to_go)
    assert out["advantages"].shape == mask.shape  # (B, T) token advantages, whitened
    assert abs(float((out["advantages"] * mask).sum() / mask.sum())) < 1e-5
    # the completions table shows PPO's advantages, not GRPO's group ones
    table = list(trainer._logs["advantages"])[-4:]
    torch.testing.assert_close(torch.tensor(table), (out["advantages"] * mask).sum(1) / mask.sum(1))


def _hand_gae(rewards, values, mask, gamma, lam):
    """GAE written out per completion, independently of ``objectives.gae``: δ_t = r_t + γ·V_{t+1} − V_t,
    A_t = δ_t + γ·λ·A_{t+1}, nothing after the last valid token."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        n, next_v, next_a = int(mask[b].sum()), 0.0, 0.0
        for t in reversed(range(n)):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            advantages[b, t], next_v = next_a, float(values[b, t])
    return advantages, (advantages + values) * mask


def test_rollout_returns_are_gae_with_gamma_and_lambda_in_their_places(world, tmp_path):
    """γ ≠ λ and a critic that predicts non-zero values: γ discounts V_{t+1} in δ_t, only the product γ·λ carries
    A_{t+1}, so swapping the two (or dropping either) changes the returns."""
    trainer = _trainer(world, tmp_path, gamma=0.9, lam=0.5, kl_coef=0.5, max_completion_length=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.value_model.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    r, mask = trainer.last_rollout, out["completion_mask"].float()
    assert float(r.values[mask.bool()].abs().min()) > 1e-3 and int(mask.sum(1).max()) >= 3
    _, returns = _hand_gae(r.token_rewards, r.values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(out["returns"], returns, rtol=1e-5, atol=1e-5)
    _, swapped = _hand_gae(r.token_rewards, r.values, mask, gamma=0.5, lam=0.9)
    assert float((swapped - returns).abs().max()) > 1e-2  # the test can tell the two apart


def test_loss_adds_the_clipped_value_loss_and_no_grpo_kl(world, tmp_path):
    trainer = _trainer(world, tmp_path, vf_coef=1.0, cliprange_value=0.2)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    mask = batch["completion_mask"].float()
    # rollout-time values far from the returns: clipping must change the value loss
    batch["old_values"] = (batch["returns"] + 1.0) * mask
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        total = trainer._compute_loss(trainer.model, batch)
        trainer.args.vf_coef = 0.0
        policy_only = trainer._compute_loss(trainer.model, batch)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        values = trainer.value_model(ids, att, completion_length=mask.size(1))
    clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], 0.2, mask)
    unclipped = 0.5 * ((values - batch["returns"]) ** 2 * mask).sum() / mask.sum()
    assert float(clipped) > float(unclipped) + 0.1
    torch.testing.assert_close(total - policy_only, clipped, rtol=1e-4, atol=1e-6)
    assert trainer.beta == 0.05  # restored after GRPO's loss ran with β = 0


def test_loss_is_the_clipped_surrogate_computed_by_hand_when_the_ratio_moved(world, tmp_path):
    """Second pass over a rollout (π_θ ≠ π_old): the loss with vf_coef = 0 is −Σ_t min(ρ_t·A_t, clip(ρ_t, 1 − ε,
    1 + ε)·A_t)·m_t / Σ_t m_t, and the logged clip fraction counts the tokens where the clip binds."""
    trainer = _trainer(world, tmp_path, vf_coef=0.0, cliprange=0.1, num_ppo_epochs=2, max_completion_length=8)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    assert "old_per_token_logps" in batch  # π_old of the rollout, kept for the later passes
    with torch.no_grad():  # one "optimizer step" later: the policy has moved
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)

    P, T = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, P - 1 : P + T - 1] / 0.7  # temperature
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].float()
    ratio = torch.exp(logps - batch["old_per_token_logps"])
    adv = batch["advantages"]
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 0.9, 1.1) * adv)
    expected = -(per_token * mask).sum() / mask.sum()
    binds = (((adv > 0) & (ratio > 1.1)) | ((adv < 0) & (ratio < 0.9))).float()
    clipfrac = float((binds * mask).sum() / mask.sum())
    assert float(((ratio - 1).abs() * mask).max()) > 0.1 and 0.0 < clipfrac < 1.0  # some tokens clipped, not all
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert trainer._metrics["train"]["policy/clipfrac_avg"][-1] == pytest.approx(clipfrac)
    trainer.current_gradient_accumulation_steps = 3  # the Trainer does not scale this loss: the trainer does
    torch.testing.assert_close(trainer._compute_loss(trainer.model, batch).detach(), expected / 3, rtol=1e-4, atol=1e-6)
    expected = float((ratio * mask).sum() / mask.sum())
    assert trainer._metrics["train"]["val/ratio"][-1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{"delta": 2.0}, {"off_policy_mask_threshold": 0.5}, {"top_entropy_quantile": 0.5},
     {"use_adaptive_entropy": True}, {"use_vllm": True, "vllm_importance_sampling_correction": True}],
)
def test_config_refuses_grpo_loss_settings_that_ppo_does_not_implement(tmp_path, overrides):
    name = next(k for k in overrides if k != "use_vllm")
    with pytest.raises(ValueError, match=f"GRPO loss settings \\['{name}'\\]"):
        ppo_args(str(tmp_path), **overrides)


def test_critic_trains_policy_trains_reference_stays(world, tmp_path):
    trainer = _trainer(world, tmp_path, max_steps=2, learning_rate=1e-2)
    critic0 = {n: p.detach().clone() for n, p in trainer.value_model.named_parameters()}
    policy0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ref0 = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    moved = {n: float((p - critic0[n]).abs().max()) for n, p in trainer.value_model.named_parameters()}
    assert moved["value_head.weight"] > 0 and max(v for n, v in moved.items() if n.startswith("backbone")) > 0
    assert max(float((p - policy0[n]).abs().max()) for n, p in trainer.model.named_parameters()) > 0
    assert all(torch.equal(p, ref0[n]) for n, p in trainer.ref_model.named_parameters())
    # the critic's parameters are groups of the one optimizer, scheduled with the policy's
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in trainer.value_model.parameters())
    logs = [h for h in trainer.state.log_history if "loss/value_avg" in h]
    assert len(logs) == 2
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "kl_coef", "val/explained_variance",
                "memory/peak_mb", "val/grad_norm"):
        assert key in logs[0], key
    assert logs[0]["val/ratio"] == pytest.approx(1.0)  # one epoch: the ratio is exactly 1


def test_policy_receives_no_critic_gradient(world, tmp_path):
    trainer = _trainer(world, tmp_path, peft_config=_lora(), critic_shares_base=True)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    trainer.model.zero_grad(set_to_none=True)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    values = trainer.value_model_wrapped(ids, att, completion_length=batch["completion_ids"].size(1))
    clipped_value_loss(values, batch["old_values"], batch["returns"] + 1.0, 0.2,
                       batch["completion_mask"].float()).backward()
    assert all(p.grad is None for p in trainer.model.parameters())
    critic_grads = [p.grad for n, p in trainer.value_model.named_parameters() if p.requires_grad]
    assert critic_grads and all(g is not None for g in critic_grads)


@pytest.mark.parametrize("num_generations", [1, 2])
def test_num_generations_one_and_two_run(world, tmp_path, num_generations):
    trainer = _trainer(world, tmp_path, num_generations=num_generations, max_steps=1)
    trainer.train()
    assert trainer.args.num_generations == num_generations
    prompts_seen = list(trainer._logs["prompt"])
    assert len(prompts_seen) == 4 and len(set(prompts_seen)) == 4 // num_generations
    # without groups GRPO's share of zero-std groups is 1 by construction: not logged
    assert ("frac_reward_zero_std" in trainer.state.log_history[0]) == (num_generations > 1)


def test_ppo_epochs_reuse_the_rollout_and_move_the_ratio(world, tmp_path):
    trainer = _trainer(world, tmp_path, num_ppo_epochs=3, max_steps=3, learning_rate=3e-2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "val/ratio" in h]
    assert len(logs) == 3
    assert logs[0]["val/ratio"] == pytest.approx(1.0, abs=1e-4)  # first pass: π = π_old (up to rounding)
    assert abs(logs[2]["val/ratio"] - 1.0) > 1e-4 and logs[2]["policy/approxkl_avg"] > 1e-6  # epochs 2-3 moved π
    assert "objective/kl" in logs[0] and "objective/kl" not in logs[1]  # one rollout for three optimizer steps


@pytest.mark.parametrize("shares_base", [False, True])
def test_lora_policy_with_and_without_a_shared_base_critic(world, tmp_path, shares_base):
    trainer = _trainer(world, tmp_path, peft_config=_lora(), critic_shares_base=shares_base, max_steps=2,
                       learning_rate=1e-2)
    assert trainer.ref_model is None  # the reference is the adapter-disabled base
    critic = trainer.value_model
    assert critic.is_peft == shares_base
    policy_base = trainer.model.get_base_model().transformer
    if shares_base:
        assert critic.backbone.get_base_model().h[0].attn.c_attn.base_layer.weight is \
            policy_base.h[0].attn.c_attn.base_layer.weight
    trainable0 = {n: p.detach().clone() for n, p in critic.named_parameters() if p.requires_grad}
    trainer.train()
    first = next(h for h in trainer.state.log_history if "objective/kl" in h)
    assert abs(first["objective/kl"]) < 1e-4  # first rollout: LoRA B = 0, policy = reference
    moved = [float((p - trainable0[n]).abs().max()) for n, p in critic.named_parameters() if n in trainable0]
    assert max(moved) > 0
    if shares_base:
        frozen = [p for n, p in critic.named_parameters() if "lora" not in n and "value_head" not in n]
        assert all(not p.requires_grad for p in frozen)
        assert policy_base.wte.weight.requires_grad is False


def test_resume_restores_policy_critic_optimizer_and_kl_controller(world, tmp_path):
    """An interrupted run resumed from its checkpoint ends where the uninterrupted run ends."""
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "kl_target": 0.5, "kl_horizon": 50,
              "learning_rate": 1e-2}
    full = _trainer(world, tmp_path / "full", **common)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / VALUE_MODEL_DIR / "value_head.safetensors").is_file()
    assert read_checkpoint_state(str(ckpt), "KLControllerState")["type"] == "adaptive"  # in trainer_state.json
    # the checkpoint's critic is the trained one, not the initial zero head
    assert float(ValueModel.from_pretrained(str(ckpt / VALUE_MODEL_DIR)).value_head.weight.abs().max()) > 0

    resumed = _trainer(world, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=f"policy {n}")
    for (n, a), b in zip(full.value_model.named_parameters(), resumed.value_model.parameters()):
        torch.testing.assert_close(a, b, msg=f"critic {n}")
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, rel=1e-6)
    assert full.kl_ctl.value != pytest.approx(0.05)  # the adaptive β really moved
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    critic_slot = len(sa) - 1  # the last parameter is in the critic's groups
    torch.testing.assert_close(sa[critic_slot]["exp_avg"], sb[critic_slot]["exp_avg"])


def test_saved_policy_and_critic_reload(world, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(world, tmp_path, max_steps=1, learning_rate=1e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    critic = ValueModel.from_pretrained(str(tmp_path / "final" / VALUE_MODEL_DIR))
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, trainer.model(ids).logits)
        torch.testing.assert_close(critic(ids), trainer.value_model(ids))


def test_tiny_llama_with_chat_template_and_conversational_prompts(tmp_path):
    path = build_tiny_llama(str(tmp_path / "llama"))
    args = ppo_args(str(tmp_path / "out"), max_steps=1)
    trainer = PPOTrainer(model=path, reward_funcs=target_word, args=args,
                         train_dataset=prompts(8, conversational=True))
    trainer.train()
    completions = list(trainer._logs["completion"])
    assert completions and completions[0][0]["role"] == "assistant"
    assert type(trainer.value_model.backbone).__name__ == "LlamaModel"  # no RM: the critic is built on the policy
    assert "objective/kl" in trainer.state.log_history[0]


def test_default_critic_is_the_reward_model_body(world, tmp_path):
    trainer = _trainer(world, tmp_path, reward_funcs=[world["reward"]])
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(world["reward"])
    torch.testing.assert_close(trainer.value_model.backbone.wte.weight, rm.transformer.wte.weight)
    only_func = _trainer(world, tmp_path / "f", reward_funcs=[target_word])
    policy = only_func.model.transformer.wte.weight
    assert torch.equal(only_func.value_model.backbone.wte.weight, policy)
    assert only_func.value_model.backbone.wte.weight.data_ptr() != policy.data_ptr()


def test_adaptive_kl_controller_is_fed_the_sequence_kl(world, tmp_path):
    """The controller sees Σ_t k1_t averaged over the rollout's completions (old TRL PPO's objective/kl), not a token
    mean. Checked on the value fed, recomputed from the rollout's log-probs: β itself cannot tell, since with a target
    this small the controller's error clip (±0.2) saturates for any value fed."""
    fed = []

    class Recording(AdaptiveKLController):
        def update(self, current_kl, n_steps):
            fed.append((current_kl, n_steps))
            return super().update(current_kl, n_steps)

    trainer = _trainer(world, tmp_path, kl_target=0.01, kl_horizon=10, kl_coef=0.2, max_steps=1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.kl_ctl.__class__ = Recording
    trainer.train()
    r = trainer.last_rollout
    mask = r.mask.float()
    seq_kl = float(((r.logps - r.ref_logps) * mask).sum(1).mean())
    token_mean = float(((r.logps - r.ref_logps) * mask).sum() / mask.sum())
    assert len(fed) == 1 and fed[0][1] == 4
    assert fed[0][0] == pytest.approx(seq_kl, rel=1e-5)
    assert abs(seq_kl) > 1.5 * abs(token_mean)  # a token mean would be told apart
    logged = trainer.state.log_history[0]
    assert logged["kl_coef"] == pytest.approx(0.2)  # β used for this rollout
    assert logged["objective/kl"] == pytest.approx(seq_kl, rel=1e-5)
    assert trainer.kl_ctl.value == pytest.approx(AdaptiveKLController(0.2, target=0.01, horizon=10).update(seq_kl, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Settings that must fail loudly
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{"top_k": 50}, {"top_p": 0.9}, {"repetition_penalty": 1.2}, {"generation_kwargs": {"min_new_tokens": 4}}],
)
def test_sampling_settings_that_break_the_kl_are_refused(world, tmp_path, overrides):
    with pytest.raises(ValueError, match="change the sampling distribution"):
        _trainer(world, tmp_path, **overrides)


def test_model_generation_config_defaults_are_checked_too(world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["policy"])
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        PPOTrainer(model=model, reward_funcs=target_word, args=ppo_args(str(tmp_path)), train_dataset=prompts())


def test_fixed_length_generation_without_a_logits_processor(world, tmp_path):
    trainer = _trainer(world, tmp_path, generation_kwargs={"eos_token_id": None}, max_completion_length=6)
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    assert trainer._metrics["train"]["completions/max_length"][-1] == 6


def test_other_misuse_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="peft_config"):
        _trainer(world, tmp_path, critic_shares_base=True)
    with pytest.raises(NotImplementedError, match="tools"):
        PPOTrainer(model=world["policy"], reward_funcs=target_word, args=ppo_args(str(tmp_path)),
                   train_dataset=prompts(), tools=[len])
    with pytest.raises(TypeError, match="PPOConfig"):
        from trl import GRPOConfig

        PPOTrainer(model=world["policy"], reward_funcs=target_word, train_dataset=prompts(),
                   args=GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False))
    trainer = _trainer(world, tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    import shutil

    shutil.rmtree(ckpt / VALUE_MODEL_DIR)
    with pytest.raises(FileNotFoundError, match="value_model"):
        _trainer(world, tmp_path / "again", max_steps=2).train(resume_from_checkpoint=str(ckpt))


def test_logprobs_from_sampling_match_a_forward_pass(world, tmp_path):
    trainer = _trainer(world, tmp_path, max_completion_length=8)
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    sampled = trainer.last_rollout.logps
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        n_completion = ids.size(1) - out["prompt_ids"].size(1)
        forward, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, n_completion)
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(sampled[mask], forward[mask], atol=1e-4, rtol=1e-4)


def test_sampling_logprobs_are_checked_against_the_forward_pass(world, tmp_path, monkeypatch):
    """Left-padded prompts on GPT-2 (absolute positions) through TRL's fused LM head, which passes no position ids:
    generate() and that forward pass disagree, so the shortcut must switch itself off and the first-rollout KL
    (policy = reference) must be ~0, not biased."""
    from datasets import Dataset

    from hf_rlhf_ext.trainers import rollout

    texts = ["customer : my kettle is late agent :", "help agent :", "customer : my order is broken please agent :",
             "thanks agent :"] * 4
    monkeypatch.setattr(rollout, "PLAIN_LOGITS_MAX_ELEMENTS", 0)  # TRL's head, not ours
    trainer = _trainer(world, tmp_path, max_steps=1, train_dataset=Dataset.from_dict({"prompt": texts}))
    trainer.train()
    assert trainer.sampler_check.passed is False
    first = trainer.state.log_history[0]
    assert first["sampling/logp_max_diff"] > 1e-3
    assert abs(first["objective/kl"]) < 1e-4
    # equal-length prompts: the shortcut holds and is kept
    same = _trainer(world, tmp_path / "same", max_steps=1)
    same.train()
    assert same.sampler_check.passed is True and same.state.log_history[0]["sampling/logp_max_diff"] < 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# fast_generation (KV-cache sampler) and the reused rollout critic pass
# ----------------------------------------------------------------------------------------------------------------------
_PADDED = ["customer : my kettle is late agent :", "help agent :", "customer : my order is broken please agent :",
           "thanks agent :"]


def _sample(trainer, texts, seed):
    prompt_ids = trainer._tokenize_prompts(list(texts))[0]
    torch.manual_seed(seed)
    completions, logps = trainer._generate_single_turn(prompt_ids, None, {}, 1)
    if logps is not None:  # one list per completion, as GRPO takes them: pad into a (B, T) tensor
        from trl.trainer.utils import pad

        logps = pad([torch.tensor(row) for row in logps], padding_value=0.0, padding_side="right")
    return prompt_ids, completions, logps


@pytest.mark.parametrize("texts", [prompts(8)["prompt"], _PADDED * 2], ids=["equal_length", "left_padded"])
@pytest.mark.parametrize("eos", [True, False], ids=["eos_stops", "fixed_length"])
def test_fast_generation_draws_the_same_tokens_as_generate(world, tmp_path, texts, eos):
    kw = {} if eos else {"generation_kwargs": {"eos_token_id": None}}
    fast = _trainer(world, tmp_path / "fast", max_completion_length=10, **kw)
    slow = _trainer(world, tmp_path / "slow", max_completion_length=10, fast_generation=False, **kw)
    assert fast._fast_generation and not slow._fast_generation
    fast.model.train(), slow.model.train()
    for seed in range(3):
        _, got, _ = _sample(fast, texts, seed)
        _, want, _ = _sample(slow, texts, seed)
        assert got == want  # same RNG draws from the same distribution: the same tokens


def test_fast_generation_logprobs_equal_the_training_forward(world, tmp_path):
    trainer = _trainer(world, tmp_path, max_completion_length=10)
    trainer.model.train()
    prompt_ids, completions, logps = _sample(trainer, prompts(8)["prompt"], 0)
    from trl.trainer.utils import pad

    ids = pad([torch.tensor(p + c) for p, c in zip(prompt_ids, completions)], padding_value=0, padding_side="right")
    att = pad([torch.ones(len(p) + len(c), dtype=torch.long) for p, c in zip(prompt_ids, completions)],
              padding_value=0, padding_side="right")
    T = ids.size(1) - len(prompt_ids[0])
    with torch.no_grad():
        forward, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T)
    mask = att[:, -T:].bool()
    assert logps.shape[1] >= T
    torch.testing.assert_close(logps[:, :T][mask], forward[mask], atol=1e-5, rtol=0)


def test_fast_generation_samples_softmax_of_logits_over_temperature(world, tmp_path):
    """The first sampled token's frequencies over many draws match softmax(logits / T) of the policy."""
    trainer = _trainer(world, tmp_path, max_completion_length=1, temperature=1.3,
                       generation_kwargs={"eos_token_id": None})
    trainer.model.train()
    text = prompts(1)["prompt"][0]
    n = 4000
    prompt_ids, completions, _ = _sample(trainer, [text] * n, 0)
    counts = torch.bincount(torch.tensor([c[0] for c in completions]), minlength=trainer.model.config.vocab_size)
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor(prompt_ids[:1])).logits[0, -1]
    probs = torch.softmax(logits / 1.3, dim=-1)
    assert float((counts / n - probs).abs().max()) < 4 * float((probs * (1 - probs) / n).sqrt().max())


def test_fast_generation_on_left_padding_keeps_the_check_and_an_unbiased_first_kl(world, tmp_path, monkeypatch):
    from datasets import Dataset

    from hf_rlhf_ext.trainers import rollout

    # our plain head passes position ids from the mask, as the sampler does: left padding agrees to rounding
    plain = _trainer(world, tmp_path / "plain", max_steps=1, train_dataset=Dataset.from_dict({"prompt": _PADDED * 4}))
    plain.train()
    assert plain.sampler_check.passed is True and plain.state.log_history[0]["sampling/logp_max_diff"] < 1e-5
    assert abs(plain.state.log_history[0]["objective/kl"]) < 1e-4
    # TRL's fused head passes none: the mismatch is detected
    monkeypatch.setattr(rollout, "PLAIN_LOGITS_MAX_ELEMENTS", 0)
    trainer = _trainer(world, tmp_path, max_steps=1, train_dataset=Dataset.from_dict({"prompt": _PADDED * 4}))
    assert trainer._fast_generation
    trainer.train()
    first = trainer.state.log_history[0]
    # generate()'s positions (from the mask) differ from the forward pass's: detected, forward log-probs used
    assert trainer.sampler_check.passed is False and first["sampling/logp_max_diff"] > 1e-3
    assert abs(first["objective/kl"]) < 1e-4
    same = _trainer(world, tmp_path / "same", max_steps=1)
    same.train()
    assert same.sampler_check.passed is True and same.state.log_history[0]["sampling/logp_max_diff"] < 1e-5
    assert abs(same.state.log_history[0]["objective/kl"]) < 1e-4


def test_fast_generation_steps_aside_for_settings_it_does_not_cover(world, tmp_path):
    assert not _trainer(world, tmp_path, generation_kwargs={"output_scores": True})._fast_generation
    assert not _trainer(world, tmp_path, generation_kwargs={"cache_implementation": "static"})._fast_generation
    assert _trainer(world, tmp_path, generation_kwargs={"eos_token_id": None})._fast_generation


def test_rollout_critic_pass_is_reused_by_the_first_step_only(world, tmp_path):
    """One mini-batch: the first step backpropagates through the rollout's critic pass; the gradients equal those
    of a fresh critic forward. Later PPO epochs on the same rollout run their own forward."""
    trainer = _trainer(world, tmp_path, num_ppo_epochs=2)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    cached = trainer.last_rollout.critic_pass
    assert cached.requires_grad
    mask = batch["completion_mask"].float()
    torch.testing.assert_close(cached.detach() * mask, batch["old_values"])
    with torch.no_grad():  # give the head a non-zero weight so that every critic parameter gets a gradient
        trainer.value_model.value_head.weight.normal_()
    batch2 = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    rollout2 = trainer.last_rollout
    fresh = {k: v for k, v in batch2.items() if k != "rollout_row"}  # no link to the rollout's critic pass

    def grads(b):
        trainer.value_model.zero_grad(set_to_none=True)
        trainer.model.zero_grad(set_to_none=True)
        trainer._compute_loss(trainer.model, b).backward()
        return [p.grad.clone() for p in trainer.value_model.parameters() if p.grad is not None]

    reused = grads(batch2)
    assert rollout2.critic_pass is None  # consumed: a second PPO epoch recomputes
    for a, b in zip(reused, grads(fresh)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    grads(batch2)  # no stale graph is reused (it would raise "backward through the graph a second time")
    trainer.args.steps_per_generation = 2  # several micro-batches per rollout: no reuse
    trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    assert trainer.last_rollout.critic_pass is None


def test_plain_lm_head_matches_grpos_fused_head(world, tmp_path):
    """Small logits: log-probs and entropies from the plain LM head equal GRPO's fused head (rounding only), with 0
    on padded positions, and so do the policy gradients; large ones (or bf16) go through the fused head."""
    from trl import GRPOTrainer

    import hf_rlhf_ext.trainers.rollout as ppo_module

    trainer = _trainer(world, tmp_path, max_completion_length=8)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    att[0, -3:] = 0  # a shorter completion
    T = batch["completion_ids"].size(1)

    def run(fn):
        trainer.model.zero_grad(set_to_none=True)
        logps, ent, _ = fn(trainer, trainer.model, ids, att, T, batch_size=2, compute_entropy=True)
        (logps * att[:, -T:]).sum().backward()
        return logps.detach(), ent.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    plain = run(PPOTrainer._get_per_token_logps_and_entropies)
    fused = run(GRPOTrainer._get_per_token_logps_and_entropies)
    torch.testing.assert_close(plain[0], fused[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(plain[1], fused[1], atol=1e-5, rtol=0)
    assert float(plain[0][0, -3:].abs().max()) == 0.0 and float(plain[1][0, -3:].abs().max()) == 0.0
    for a, b in zip(plain[2], fused[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    limit = ppo_module.PLAIN_LOGITS_MAX_ELEMENTS
    try:  # above the size limit: GRPO's fused head, bit for bit
        ppo_module.PLAIN_LOGITS_MAX_ELEMENTS = 0
        torch.testing.assert_close(run(PPOTrainer._get_per_token_logps_and_entropies)[0], fused[0], atol=0, rtol=0)
    finally:
        ppo_module.PLAIN_LOGITS_MAX_ELEMENTS = limit


def test_deepspeed_and_fsdp1_refuse_the_critic_naming_fsdp2(world, tmp_path):
    from hf_rlhf_ext.trainers.critic import prepare_critic

    critic = ValueModel.from_backbone_path(world["policy"])
    args = ppo_args(str(tmp_path))
    with pytest.raises(NotImplementedError, match="DeepSpeed.*FSDP2"):
        prepare_critic(critic, args, accelerator=None, deepspeed=True)
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        prepare_critic(critic, args, accelerator=None, fsdp_version=1)


def test_the_rollout_reads_in_one_method_and_passes_its_values_explicitly(world, tmp_path):
    """The rollout is one short method; GRPO's hooks it reaches through are not overridden to stash values on the
    trainer (the rewards come back from _calculate_rewards, the sampler's extras with its completions); a rollout
    leaves no state on the trainer but its record, ``last_rollout``."""
    import inspect

    source = inspect.getsource(PPOTrainer._generate_and_score_completions)
    assert len(source.splitlines()) <= 60
    assert "_calculate_rewards" not in vars(PPOTrainer)
    trainer = _trainer(world, tmp_path, value_head_on_policy=True, max_completion_length=6)
    trainer.model.train()
    before = set(vars(trainer))
    trainer._generate_and_score_completions([{"prompt": p} for p in prompts(4)["prompt"]])
    assert set(vars(trainer)) - before <= {"last_rollout"}

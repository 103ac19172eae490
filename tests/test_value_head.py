"""PPOConfig(value_head_on_policy=True): a value head on the policy's own last hidden states, read in the policy's
forward pass — its values against a hand computation, one forward per loss, training, save/reload and resume."""

from __future__ import annotations

import pytest
import torch
from _ppo_helpers import build_world, ppo_args, prompts, target_word

from hf_rlhf_ext.objectives import clipped_value_loss
from hf_rlhf_ext.trainers.ppo import PPOTrainer
from hf_rlhf_ext.trainers.value_model import PolicyValueHead, policy_backbone


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("vhead_world")))


def _trainer(world, out, peft_config=None, **overrides):
    args = ppo_args(str(out), value_head_on_policy=True, **overrides)
    return PPOTrainer(model=world["policy"], reward_funcs=[world["reward"], target_word], args=args,
                      train_dataset=prompts(), peft_config=peft_config)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")


def _randomise_head(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.value_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _hand_values(policy, batch):
    """w·h_t + b on hidden_states[-1] of a plain forward with output_hidden_states (no hook), at the positions that
    predict each completion token."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    hidden = policy(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
    return hidden, ids, att


def _rollout(trainer, n=4):
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompts(n)["prompt"]])


def _head_values(trainer, batch):
    """w·h + b on the hidden states of a fresh full forward, at the positions that predict each completion token."""
    T = batch["completion_ids"].size(1)
    hidden, _, _ = _hand_values(trainer.model, batch)
    w, b = trainer.value_model.value_head.weight[0], trainer.value_model.value_head.bias[0]
    return (hidden[:, -T - 1 : -1] @ w + b) * batch["completion_mask"]


def _rollout_counting_full_passes(trainer):
    """A rollout, and how many forwards of the policy's body saw whole prompt + completion rows (not the sampler's
    prefill and decoding steps)."""
    shapes = []
    handle = policy_backbone(trainer.model).register_forward_hook(
        lambda m, a, out: shapes.append(out.last_hidden_state.size(1)))
    try:
        batch = _rollout(trainer)
    finally:
        handle.remove()
    full_length = batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)
    return batch, sum(length == full_length for length in shapes)


@pytest.mark.parametrize("source, overrides", [
    ("sampler", {}),  # the KV-cache sampler's own forwards: no pass at all
    ("forward", {"logprobs_from_sampling": False}),  # the forward pass that computes log π_old
    ("body", {"fast_generation": False}),  # generate() with recorded log-probs: one pass of the body alone
])
def test_rollout_values_are_the_head_on_the_policys_last_hidden_states(world, tmp_path, source, overrides):
    trainer = _trainer(world, tmp_path, **overrides)
    _randomise_head(trainer)
    first = _rollout(trainer)
    with torch.no_grad():
        torch.testing.assert_close(first["old_values"], _head_values(trainer, first), rtol=1e-5, atol=1e-5)
    batch, full_passes = _rollout_counting_full_passes(trainer)  # after the first rollout's sampler check
    with torch.no_grad():
        want = _head_values(trainer, batch)
    assert float(want.abs().max()) > 0.1  # a random head: values far from the zero init
    torch.testing.assert_close(batch["old_values"], want, rtol=1e-5, atol=1e-5)
    assert not batch["old_values"].requires_grad
    rollout = trainer.last_rollout
    assert full_passes == (0 if source == "sampler" else 1)
    assert (rollout.policy_pass_values is not None) == (source == "forward")
    assert (rollout.sampler_values is not None) == (source != "body")  # read, but the forward pass's are used


def test_values_come_from_grpos_old_logprob_pass_not_the_reference_pass(world, tmp_path):
    """Several PPO epochs without the sampler's log-probs: GRPO computes π_old with a forward pass (then π_ref with
    the LoRA adapter disabled); the values are read in the first, with the adapter on."""
    trainer = _trainer(world, tmp_path, peft_config=_lora(), num_ppo_epochs=2, logprobs_from_sampling=False)
    _randomise_head(trainer)
    with torch.no_grad():  # a LoRA update that moves the policy away from its reference (the base)
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch, full_passes = _rollout_counting_full_passes(trainer)
    assert "old_per_token_logps" in batch and full_passes == 2  # π_old and π_ref; no third pass for the values
    T, mask = batch["completion_mask"].size(1), batch["completion_mask"].float()
    with torch.no_grad():
        hidden, _, _ = _hand_values(trainer.model, batch)
        with trainer.model.disable_adapter():
            ref_hidden, _, _ = _hand_values(trainer.model, batch)
        w, b = trainer.value_model.value_head.weight[0], trainer.value_model.value_head.bias[0]
        want, ref = (hidden[:, -T - 1 : -1] @ w + b) * mask, (ref_hidden[:, -T - 1 : -1] @ w + b) * mask
    assert float((want - ref).abs().max()) > 0.1
    torch.testing.assert_close(batch["old_values"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lm_head", ["plain", "grpo_fused"])
def test_loss_reads_policy_and_values_from_one_forward_pass(world, tmp_path, monkeypatch, lm_head):
    if lm_head == "grpo_fused":  # GRPO's chunked, fused LM head (large vocabularies, bf16) instead of the plain one
        monkeypatch.setattr("hf_rlhf_ext.trainers.ppo.use_plain_head", lambda *a, **k: False)
    trainer = _trainer(world, tmp_path, vf_coef=1.0, peft_config=_lora())
    _randomise_head(trainer)
    batch = _rollout(trainer)
    mask = batch["completion_mask"].float()
    batch["old_values"] = (batch["returns"] + 1.0) * mask  # far from the returns: the value clip binds
    trainer.current_gradient_accumulation_steps = 1
    backbone = policy_backbone(trainer.model)
    calls = []
    handle = backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        total = trainer._compute_loss(trainer.model, batch)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward of the policy's body for the policy loss and the value loss
    with torch.no_grad():
        trainer.args.vf_coef = 0.0
        policy_only = trainer._compute_loss(trainer.model, batch)
        hidden, _, _ = _hand_values(trainer.model, batch)
        T = mask.size(1)
        w, b = trainer.value_model.value_head.weight[0], trainer.value_model.value_head.bias[0]
        values = hidden[:, -T - 1 : -1] @ w + b
    want = clipped_value_loss(values, batch["old_values"], batch["returns"], trainer.args.cliprange_value, mask)
    torch.testing.assert_close(total.detach() - policy_only, want, rtol=1e-4, atol=1e-6)
    # the value loss reaches the head and, through the shared trunk, the policy's LoRA adapter
    trainer.model.zero_grad(set_to_none=True)
    trainer.args.vf_coef = 1.0
    total.backward()
    assert trainer.value_model.value_head.weight.grad.abs().max() > 0
    lora = [p for n, p in trainer.model.named_parameters() if "lora" in n]
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora)


def test_head_is_an_optimizer_group_with_the_critic_learning_rate_and_trains(world, tmp_path):
    trainer = _trainer(world, tmp_path, max_steps=2, learning_rate=1e-3, critic_learning_rate=5e-2,
                       lr_scheduler_type="constant")
    policy0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups
              if any(p is trainer.value_model.value_head.weight for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(5e-2)
    assert float(trainer.value_model.value_head.weight.abs().max()) > 0  # moved from the zero init
    assert max(float((p - policy0[n]).abs().max()) for n, p in trainer.model.named_parameters()) > 0
    assert not hasattr(trainer.value_model, "backbone")  # no critic body
    logs = [h for h in trainer.state.log_history if "loss/value_avg" in h]
    assert len(logs) == 2 and "val/grad_norm" in logs[0] and "val/explained_variance" in logs[0]


def _split_key_bias(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2's fused q, k, v bias as (q and v, k). The key bias adds q·b_k to every attention logit of a query, which
    the softmax ignores: its gradient is float noise (measured 6e-12), and Adam divides that by its ε (1e-8) into an
    update of about lr·|g|/ε per step (measured 6e-6 at lr 1e-2) whose digits depend on the CPU's kernels. A straight
    run and a resumed one agree on it only to that size (bounded for noise up to 1e-10); every other parameter, to
    float precision."""
    q, k, v = bias.detach().chunk(3)
    return torch.cat([q, v]), k


def test_saved_head_reloads_beside_the_policy_and_resume_restores_it(world, tmp_path):
    from transformers import AutoModelForCausalLM

    common = dict(max_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=1)
    full = _trainer(world, tmp_path / "full", **common)
    full.train()
    full.save_model(str(tmp_path / "final"))
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    head = PolicyValueHead.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        reloaded = head(policy(ids, output_hidden_states=True).hidden_states[-1])
        trained = full.value_model(full.model(ids, output_hidden_states=True).hidden_states[-1])
    assert float(trained.abs().max()) > 0
    torch.testing.assert_close(reloaded, trained)

    resumed = _trainer(world, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        if n.endswith("attn.c_attn.bias"):  # its key third has no gradient: see _split_key_bias
            (a, a_key), (b, b_key) = _split_key_bias(a), _split_key_bias(b)
            noise_bound = 2 * common["max_steps"] * common["learning_rate"] * 1e-10 / 1e-8  # both runs, every step
            assert float((a_key - b_key).abs().max()) <= noise_bound, n
        torch.testing.assert_close(a, b, msg=f"policy {n}")
    torch.testing.assert_close(full.value_model.value_head.weight, resumed.value_model.value_head.weight)


@pytest.mark.parametrize("overrides, message", [
    ({"critic_shares_base": True}, "drop critic_shares_base"),
    ({"value_model_name_or_path": "some/critic"}, "drop critic_shares_base"),
])
def test_config_refuses_a_second_critic_with_the_value_head(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ppo_args(str(tmp_path), value_head_on_policy=True, **overrides)


def test_value_head_under_deepspeed_or_fsdp_is_refused_naming_the_alternatives():
    from types import SimpleNamespace

    from hf_rlhf_ext.trainers.critic import prepare_policy_value_head

    one_process = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="critic_shares_base"):
        prepare_policy_value_head(PolicyValueHead(8), one_process, sharded=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm > 0"):
        prepare_policy_value_head(PolicyValueHead(8), SimpleNamespace(num_processes=2, device=torch.device("cpu")),
                                  sharded=False, max_grad_norm=0.0)
    assert prepare_policy_value_head(PolicyValueHead(8), one_process, sharded=False, max_grad_norm=0.0) is not None


def test_reading_a_separate_critics_head_as_a_policy_head_is_refused(world, tmp_path):
    trainer = PPOTrainer(model=world["policy"], reward_funcs=[world["reward"], target_word],
                         args=ppo_args(str(tmp_path)), train_dataset=prompts())
    trainer.save_model(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="ValueModel.from_pretrained"):
        PolicyValueHead.from_pretrained(str(tmp_path / "out" / "value_model"))
    with pytest.raises(FileNotFoundError, match="value_head_on_policy"):
        PolicyValueHead.from_pretrained(str(tmp_path / "out"))


@pytest.mark.slow
def test_value_head_learns_the_returns_on_the_lab(tmp_path):
    """30 steps of the lab run (seed 0) with the head's own learning rate: the value loss falls and the explained
    variance rises from ≈ 0 (the zero head) — the head learns more than the mean return."""
    from _recipe_helpers import run_recipe

    from hf_rlhf_ext.results import read_log_history

    run_recipe("ppo", ["--output_dir", str(tmp_path), "--value_head_on_policy", "true",
                       "--critic_learning_rate", "1e-2",
                       "--max_steps", "30", "--logging_steps", "5", "--num_eval_prompts", "0", "--monitor", "none",
                       "--disable_tqdm", "true"])
    logs = [r for r in read_log_history(str(tmp_path)) if "loss/value_avg" in r]
    assert len(logs) == 6
    value_loss = [r["loss/value_avg"] for r in logs]
    explained = [r["val/explained_variance"] for r in logs]
    assert value_loss[-1] < 0.8 * value_loss[0], value_loss
    assert sum(explained[-3:]) / 3 > explained[0] + 0.04, explained
    assert (tmp_path / "value_head.safetensors").is_file() and not (tmp_path / "value_model").exists()


@pytest.mark.multiprocess
def test_value_head_under_ddp_on_two_ranks_stays_identical(tmp_path):
    """Each rank trains on its own prompts; the head lives outside the DDP-wrapped policy, so only the averaging of
    its gradients keeps the two ranks' heads equal."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    world = build_world(str(tmp_path / "world"))
    probe = Path(__file__).parent / "_value_head_ddp_probe.py"
    out = subprocess.run([sys.executable, str(probe), os.path.dirname(world["policy"]), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = {rank: json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert ranks[0]["ddp"] == ranks[1]["ddp"] == "DistributedDataParallel"
    assert ranks[0]["local_returns"] != pytest.approx(ranks[1]["local_returns"])  # different data on each rank
    assert max(abs(v) for v in ranks[0]["head"]) > 1e-3  # the head trained
    assert ranks[0]["head"] == pytest.approx(ranks[1]["head"], abs=1e-7)
    assert ranks[0]["policy"] == pytest.approx(ranks[1]["policy"], rel=1e-9)

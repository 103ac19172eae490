"""GradientVarianceCallback / measure_gradient_variance: the numbers equal a brute-force computation, measuring
leaves training untouched, the callback measures at the chosen steps only, works on vanilla TRL trainers, and
refuses what it cannot measure."""

from __future__ import annotations

import pytest
import torch
from _reinforce_helpers import build_tiny_model, prompt_dataset, target_word_reward, tiny_args

from hf_rlhf_ext.callbacks.grad_variance import (
    GradientVarianceCallback,
    concat_generation_batch,
    measure_gradient_variance,
    select_samples,
)
from hf_rlhf_ext.trainers.reinforce import ReinforceConfig, ReinforceTrainer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("gradvar_model") / "policy"))


def reinforce_trainer(model_path: str, output_dir: str, **overrides) -> ReinforceTrainer:
    args = tiny_args(output_dir, config_cls=ReinforceConfig, **overrides)
    return ReinforceTrainer(
        model=model_path, reward_funcs=target_word_reward(1.0), args=args, train_dataset=prompt_dataset()
    )


def fresh_batch(trainer) -> dict:
    prompts = prompt_dataset(trainer.args.generation_batch_size // trainer.num_generations)["prompt"]
    trainer.model.train()
    inputs = [{"prompt": p} for p in prompts for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(inputs)


def test_measurement_equals_brute_force(model_path, tmp_path):
    """Per-slice textbook REINFORCE gradients, stacked: tr Cov (K−1) and ‖mean‖² must match the streamed numbers."""
    torch.manual_seed(0)
    trainer = reinforce_trainer(model_path, str(tmp_path), baseline="none", per_device_train_batch_size=16)
    batch = fresh_batch(trainer)
    m = measure_gradient_variance(trainer, batch, num_estimates=4)

    model = trainer.model
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for idx in torch.arange(16).tensor_split(4):
        ids = torch.cat([batch["prompt_ids"][idx], batch["completion_ids"][idx]], 1)
        att = torch.cat([batch["prompt_mask"][idx], batch["completion_mask"][idx]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, batch["completion_ids"].size(1))
        loss = -(batch["advantages"][idx] * (logps * batch["completion_mask"][idx]).sum(1)).mean()
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    G = torch.stack(grads).double()
    mean = G.mean(0)
    total = ((G - mean) ** 2).sum(1).sum().item() / 3
    assert m.num_estimates == 4 and m.samples_per_estimate == 4
    assert m.num_params == sum(p.numel() for p in params)
    assert m.total == pytest.approx(total, rel=1e-4)
    assert m.mean_grad_sq_norm == pytest.approx(mean.pow(2).sum().item(), rel=1e-4)
    assert m.snr == pytest.approx(m.mean_grad_sq_norm / m.total)
    assert m.signal_sq_norm == pytest.approx(m.mean_grad_sq_norm - m.total / 4)


def test_measurement_leaves_grads_params_metrics_and_rng_alone(model_path, tmp_path):
    torch.manual_seed(0)
    trainer = reinforce_trainer(model_path, str(tmp_path), baseline="group")
    batch = fresh_batch(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    grad_values = [g.clone() for g in grads]
    param_values = [p.detach().clone() for p in params]
    metrics_before = {k: list(v) for k, v in trainer._metrics["train"].items()}
    rng = torch.get_rng_state()

    m = measure_gradient_variance(trainer, batch, num_estimates=4)

    assert m.total > 0
    assert all(p.grad is g for p, g in zip(params, grads))  # the very same tensors, put back
    assert all(torch.equal(g, v) for g, v in zip(grads, grad_values))
    assert all(torch.equal(p, v) for p, v in zip(params, param_values))
    assert {k: list(v) for k, v in trainer._metrics["train"].items()} == metrics_before
    assert torch.equal(torch.get_rng_state(), rng)
    assert trainer.model.training  # mode restored


def _train(model_path, output_dir, trainer_cls, config_cls, with_callback, **overrides):
    torch.manual_seed(0)
    args = tiny_args(output_dir, config_cls=config_cls, **{"max_steps": 3, **overrides})
    trainer = trainer_cls(
        model=model_path, reward_funcs=target_word_reward(5.0), args=args, train_dataset=prompt_dataset()
    )
    callback = None
    if with_callback:
        callback = GradientVarianceCallback(trainer, every_n_steps=1, num_estimates=4)
        trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def test_callback_does_not_change_training(model_path, tmp_path):
    """Vanilla GRPO with dropout on (training draws random numbers every step): same seed, with and without the
    callback measuring at every step → bit-identical parameters and losses."""
    from trl import GRPOConfig, GRPOTrainer

    plain, _ = _train(model_path, str(tmp_path / "a"), GRPOTrainer, GRPOConfig, False)
    measured, cb = _train(model_path, str(tmp_path / "b"), GRPOTrainer, GRPOConfig, True)
    assert len(cb.measurements) == 3
    for (n1, p1), (n2, p2) in zip(plain.model.named_parameters(), measured.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    losses = lambda t: [(h["loss"], h["grad_norm"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(plain) == losses(measured)


def test_callback_measures_every_n_steps_and_logs(model_path, tmp_path):
    torch.manual_seed(0)
    trainer = reinforce_trainer(model_path, str(tmp_path), baseline="none", max_steps=4)
    cb = GradientVarianceCallback(trainer, every_n_steps=2, num_estimates=4)
    trainer.add_callback(cb)
    trainer.train()
    assert [m.step for m in cb.measurements] == [0, 2]
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert "grad_var/total" in logged[1] and "grad_var/total" in logged[3]
    assert "grad_var/total" not in logged[2] and "grad_var/total" not in logged[4]
    assert logged[1]["grad_var/total"] == pytest.approx(cb.measurements[0].total)
    assert logged[3]["grad_var/snr"] == pytest.approx(cb.measurements[1].snr)
    summary = cb.summary()
    assert summary["grad_var/num_measurements"] == 2
    assert summary["grad_var/total"] == pytest.approx((cb.measurements[0].total + cb.measurements[1].total) / 2)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_callback_works_with_vanilla_trl_trainers(model_path, tmp_path, kind):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cls, cfg = (GRPOTrainer, GRPOConfig) if kind == "grpo" else (RLOOTrainer, RLOOConfig)
    trainer, cb = _train(model_path, str(tmp_path), cls, cfg, True, max_steps=1)
    (m,) = cb.measurements
    assert 0 < m.total < float("inf") and m.mean_grad_sq_norm > 0 and 0 < m.snr < float("inf")
    assert trainer.state.log_history[0]["grad_var/total"] == pytest.approx(m.total)


def test_clear_errors(model_path, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_rlhf_ext.callbacks._trainer_access import UnsupportedTrainerError

    plain = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none"),
    )
    with pytest.raises(UnsupportedTrainerError, match="GradientVarianceCallback.*GRPOTrainer"):
        GradientVarianceCallback(plain)
    trainer = reinforce_trainer(model_path, str(tmp_path / "r"))
    with pytest.raises(ValueError, match="at least 2"):
        GradientVarianceCallback(trainer, num_estimates=1)
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientVarianceCallback(trainer, every_n_steps=0)
    with pytest.raises(ValueError, match="fewer than num_estimates=16"):
        GradientVarianceCallback(trainer, num_estimates=16)  # 8 completions per generation batch
    with pytest.raises(ValueError, match="no buffered generation batch"):
        measure_gradient_variance(trainer)


def test_concat_and_select_keep_batch_level_entries():
    chunks = [
        {"completion_ids": torch.tensor([[1, 2], [3, 4]]), "advantages": torch.tensor([0.5, -0.5]),
         "num_items_in_batch": torch.tensor(7), "names": ["a", "b"]},
        {"completion_ids": torch.tensor([[5, 6], [7, 8]]), "advantages": torch.tensor([1.0, 2.0]),
         "num_items_in_batch": torch.tensor(7), "names": ["c", "d"]},
    ]
    batch = concat_generation_batch(chunks)
    assert batch["completion_ids"].shape == (4, 2) and batch["names"] == ["a", "b", "c", "d"]
    assert batch["num_items_in_batch"].item() == 7
    part = select_samples(batch, torch.tensor([1, 3]))
    assert torch.equal(part["advantages"], torch.tensor([-0.5, 2.0])) and part["names"] == ["b", "d"]
    assert part["num_items_in_batch"].item() == 7


def test_callback_works_with_our_ppo_trainer_and_leaves_the_critic_alone(model_path, tmp_path):
    """PPO's loss includes the critic's value loss: measuring must not write gradients into the critic either."""
    from hf_rlhf_ext.trainers.ppo import PPOTrainer
    from hf_rlhf_ext.trainers.ppo_config import PPOConfig

    def run(with_callback: bool):
        torch.manual_seed(0)
        args = tiny_args(str(tmp_path / str(with_callback)), config_cls=PPOConfig, max_steps=2, num_ppo_epochs=1,
                         kl_coef=0.05, num_generations=1, per_device_train_batch_size=8)
        trainer = PPOTrainer(model=model_path, reward_funcs=target_word_reward(5.0), args=args,
                             train_dataset=prompt_dataset())
        cb = GradientVarianceCallback(trainer, every_n_steps=1, num_estimates=4) if with_callback else None
        if cb:
            trainer.add_callback(cb)
        trainer.train()
        return trainer, cb

    plain, _ = run(False)
    measured, cb = run(True)
    assert len(cb.measurements) == 2 and all(0 < m.total < float("inf") for m in cb.measurements)
    for a, b in zip(plain.value_model.parameters(), measured.value_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.model.parameters(), measured.model.parameters()):
        assert torch.equal(a, b)

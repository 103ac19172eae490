"""REINFORCE: advantages for each baseline, the on-policy config checks, the loss being exactly the REINFORCE
estimator, the running mean surviving a resume, the chapter's experiment (a baseline cuts the gradient variance on a
reward with a large constant offset) and learning on a simple task."""

from __future__ import annotations

import os

import pytest
import torch
from _reinforce_helpers import build_tiny_model, prompt_dataset, target_word_reward, tiny_args

from hf_rlhf_ext.objectives import group_advantages
from hf_rlhf_ext.persisted_state import read_checkpoint_state
from hf_rlhf_ext.trainers.reinforce import (
    ReinforceConfig,
    ReinforceTrainer,
    RunningMeanBaseline,
    RunningMeanBaselineState,
    leave_one_out_baseline,
    reinforce_advantages,
)

NAN = float("nan")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("reinforce_model") / "policy"))


def make_trainer(model_path: str, output_dir: str, reward_offset: float = 0.0, **overrides) -> ReinforceTrainer:
    args = tiny_args(output_dir, config_cls=ReinforceConfig, **overrides)
    return ReinforceTrainer(
        model=model_path, reward_funcs=target_word_reward(reward_offset), args=args, train_dataset=prompt_dataset()
    )


# ------------------------------------------------------------------------------------------------------------------
# Advantages on hand-made rewards
# ------------------------------------------------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 1.0, 3.0])  # two groups of 4


def test_no_baseline_advantage_is_the_reward():
    adv, b = reinforce_advantages(REWARDS, 4, "none")
    assert torch.equal(adv, REWARDS)
    assert torch.equal(b, torch.zeros(8))


def test_running_mean_baseline_subtracts_the_given_value_or_the_batch_mean():
    adv, b = reinforce_advantages(REWARDS, 4, "running_mean", running_mean=2.5)
    assert torch.allclose(adv, REWARDS - 2.5)
    assert torch.allclose(b, torch.full((8,), 2.5))
    adv, b = reinforce_advantages(REWARDS, 4, "running_mean", running_mean=None)  # no past yet: the batch mean
    assert torch.allclose(b, torch.full((8,), 3.25))
    assert abs(adv.sum().item()) < 1e-5


def test_group_baseline_is_leave_one_out():
    adv, b = reinforce_advantages(REWARDS, 4, "group")
    # first group [1, 2, 3, 6]: b_0 = (2 + 3 + 6) / 3
    expected_b = torch.tensor([11 / 3, 10 / 3, 3.0, 2.0, 3.0, 3.0, 13 / 3, 11 / 3])
    assert torch.allclose(b, expected_b)
    assert torch.allclose(adv, REWARDS - expected_b)
    # RLOO = G/(G−1) × (Dr. GRPO's r − group mean), from objectives.group_advantages
    assert torch.allclose(adv, group_advantages(REWARDS, 4, scale="none") * 4 / 3)
    # within a group the leave-one-out advantages sum to zero
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)


def test_group_baseline_with_unscorable_rewards():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN, 4.0, NAN, NAN])
    adv, b = reinforce_advantages(rewards, 4, "group")
    # group 1: scorable {1, 3, 5}; b_0 = (3 + 5) / 2 = 4, b_2 = 3, b_3 = 2; the NaN sample gets advantage 0
    assert torch.allclose(adv[:4], torch.tensor([-3.0, 0.0, 0.0, 3.0]))
    assert torch.isnan(b[1])
    # group 2: a single scorable sample has no "other" sample: advantage 0, not ±inf
    assert torch.equal(adv[4:], torch.zeros(4))
    assert torch.allclose(leave_one_out_baseline(REWARDS, 4), reinforce_advantages(REWARDS, 4, "group")[1])


def test_unscorable_rewards_get_zero_advantage_for_every_baseline():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0])
    for baseline in ("none", "running_mean"):
        adv, _ = reinforce_advantages(rewards, 2, baseline)
        assert adv[1].item() == 0.0 and torch.isfinite(adv).all()
    _, b = reinforce_advantages(rewards, 2, "running_mean")
    assert torch.allclose(b, torch.full((4,), 3.0))  # the batch mean ignores the NaN


def test_unknown_baseline_and_bad_groups_raise():
    with pytest.raises(ValueError, match="Unknown REINFORCE baseline 'mean'"):
        reinforce_advantages(REWARDS, 4, "mean")
    with pytest.raises(ValueError, match="at least 2 completions"):
        reinforce_advantages(REWARDS, 1, "group")
    with pytest.raises(ValueError, match="do not split into groups"):
        leave_one_out_baseline(REWARDS, 3)


def test_running_mean_is_bias_corrected_and_round_trips():
    rm = RunningMeanBaseline(decay=0.5)
    assert rm.value is None
    rm.update(4.0)
    assert rm.value == pytest.approx(4.0)  # not 0.5 × 4: bias-corrected
    rm.update(2.0)
    # m = 0.5·(0.5·4) + 0.5·2 = 2.0; corrected by 1 − 0.25 → 8/3 (weights 1/3 on 4, 2/3 on 2)
    assert rm.value == pytest.approx(8 / 3)
    rm.update(NAN)  # a batch with no scorable sample changes nothing
    assert rm.num_updates == 2
    other = RunningMeanBaseline(decay=0.9)
    other.load_state_dict(rm.state_dict())
    assert other.value == pytest.approx(rm.value) and other.decay == 0.5
    with pytest.raises(ValueError, match="baseline_decay"):
        RunningMeanBaseline(decay=1.0)


# ------------------------------------------------------------------------------------------------------------------
# Config checks
# ------------------------------------------------------------------------------------------------------------------
def test_config_maps_aggregation_to_loss_type(tmp_path):
    assert tiny_args(str(tmp_path), config_cls=ReinforceConfig).loss_type == "luspo"
    assert tiny_args(str(tmp_path), config_cls=ReinforceConfig, aggregation="token").loss_type == "dapo"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"baseline": "average"}, "Unknown REINFORCE baseline 'average'"),
        ({"aggregation": "sum"}, "Unknown aggregation 'sum'"),
        ({"baseline_decay": 1.5}, "baseline_decay"),
        ({"num_iterations": 2}, "on-policy: num_iterations must be 1"),
        ({"loss_type": "grpo"}, "sets loss_type from aggregation"),
        ({"steps_per_generation": 2}, "multiple of steps_per_generation"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "sum_then_normalize"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_args(str(tmp_path), config_cls=ReinforceConfig, **overrides)


def test_trainer_needs_a_reinforce_config(model_path, tmp_path):
    with pytest.raises(TypeError, match="needs a ReinforceConfig"):
        ReinforceTrainer(
            model=model_path, reward_funcs=target_word_reward(), args=tiny_args(str(tmp_path)),
            train_dataset=prompt_dataset(),
        )


# ------------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------------
def generation_batch(trainer: ReinforceTrainer, offset: int = 0) -> dict:
    """One generation batch in TRL's layout (each prompt repeated num_generations times), scored and with advantages."""
    num_prompts = trainer.args.generation_batch_size // trainer.num_generations
    prompts = prompt_dataset(num_prompts + offset)["prompt"][offset:]
    inputs = [{"prompt": p} for p in prompts for _ in range(trainer.num_generations)]
    trainer.model.train()
    return trainer._generate_and_score_completions(inputs)


@pytest.mark.parametrize("baseline", ["none", "running_mean", "group"])
def test_trainer_uses_reinforce_advantages_and_logs_them(model_path, tmp_path, baseline):
    torch.manual_seed(0)
    trainer = make_trainer(model_path, str(tmp_path), reward_offset=1.0, baseline=baseline)
    first = generation_batch(trainer)
    rewards = torch.tensor(list(trainer._logs["rewards"]["offset_target_word"]))
    expected, b = reinforce_advantages(rewards, 4, baseline, running_mean=None)
    assert torch.allclose(first["advantages"], expected, atol=1e-6)
    assert torch.allclose(torch.tensor(list(trainer._logs["advantages"])), expected, atol=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["reinforce/baseline"][-1] == pytest.approx(b.mean().item(), abs=1e-6)
    assert metrics["reinforce/advantage_mean"][-1] == pytest.approx(expected.mean().item(), abs=1e-6)
    if baseline == "running_mean":
        # the second batch uses the mean of the first (no sample of its own), then folds its own mean in
        second = generation_batch(trainer, offset=2)
        rewards2 = torch.tensor(list(trainer._logs["rewards"]["offset_target_word"]))
        assert torch.allclose(second["advantages"], rewards2 - rewards.mean(), atol=1e-5)
        assert trainer.running_baseline.num_updates == 2


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_loss_gradient_is_exactly_the_reinforce_estimator(model_path, tmp_path, aggregation):
    """GRPO's clipped loss at ratio 1 gives −A·∇log π per token; check it against the textbook estimator."""
    torch.manual_seed(0)
    trainer = make_trainer(model_path, str(tmp_path), baseline="group", aggregation=aggregation)
    batch = generation_batch(trainer)
    model = trainer.model
    model.eval()  # no dropout: both computations must see the same function
    params = [p for p in model.parameters() if p.requires_grad]

    loss = trainer.compute_loss(model, batch)
    ours = torch.autograd.grad(loss, params, allow_unused=True)

    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, length)
    mask = batch["completion_mask"]
    seq_logp = (logps * mask).sum(1)  # log π(y | x)
    if aggregation == "sequence":
        textbook = -(batch["advantages"] * seq_logp).mean()
    else:
        textbook = -(batch["advantages"] * seq_logp).sum() / mask.sum()
    ref = torch.autograd.grad(textbook, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(ours, ref) if a is not None or b is not None]
    assert pairs and any(b is not None and b.abs().sum() > 0 for _, b in pairs)
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_beta_adds_the_kl_penalty(model_path, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(model_path, str(tmp_path), baseline="group", beta=0.1, max_steps=2, learning_rate=3e-2)
    assert trainer.ref_model is not None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logs) == 2
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # first batch: policy == reference
    assert logs[1]["kl"] > 0


def test_running_mean_state_survives_save_and_resume(model_path, tmp_path):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.states = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.states[state.global_step] = dict(self.trainer.running_baseline.state_dict())

    def run(output_dir, resume=None):
        rec = Record()
        trainer = make_trainer(
            model_path, output_dir, reward_offset=2.0, baseline="running_mean", baseline_decay=0.8, max_steps=4,
            save_strategy="steps", save_steps=2,
        )
        rec.trainer = trainer
        trainer.add_callback(rec)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rec.states

    full, states = run(str(tmp_path / "full"))
    ckpt = os.path.join(str(tmp_path / "full"), "checkpoint-2")
    saved = read_checkpoint_state(ckpt, RunningMeanBaselineState.__name__)  # trainer_state.json, a stateful callback
    assert saved == states[2] and saved["num_updates"] == 2

    resumed, states2 = run(str(tmp_path / "full"), resume=ckpt)
    assert sorted(states2) == [3, 4]
    # restored, not restarted: a fresh state would have 1 update after step 3
    assert states2[3]["num_updates"] == 3 and states2[4]["num_updates"] == 4
    assert states2[4]["ema"] == pytest.approx(states[4]["ema"], rel=1e-6)
    assert resumed.running_baseline.value == pytest.approx(full.running_baseline.value, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The chapter's experiments
# ------------------------------------------------------------------------------------------------------------------
def test_baseline_cuts_the_gradient_variance(model_path, tmp_path):
    """Reward = 5 + fraction of 'good' words: b = 0 pushes every sample up by ≈ 5·∇log π, so the estimate is mostly
    noise. All baselines are measured on the same generation batch (same samples), so the ratio is the baseline's."""
    from hf_rlhf_ext.callbacks.grad_variance import measure_gradient_variance

    torch.manual_seed(0)
    trainer = make_trainer(
        model_path, str(tmp_path), reward_offset=5.0, baseline="none", per_device_train_batch_size=32
    )
    # the running mean sees two earlier batches of the same policy, as it would during training
    running = RunningMeanBaseline(decay=0.9)
    for i in range(2):
        generation_batch(trainer, offset=8 * i)
        running.update(torch.tensor(list(trainer._logs["rewards"]["offset_target_word"])).mean().item())
    batch = generation_batch(trainer)
    rewards = batch["advantages"].clone()  # with baseline="none" the advantages are the rewards
    assert rewards.min() >= 5.0 and rewards.std() > 0

    variance = {}
    for baseline in ("none", "running_mean", "group"):
        adv, _ = reinforce_advantages(rewards, trainer.num_generations, baseline, running_mean=running.value)
        m = measure_gradient_variance(trainer, dict(batch, advantages=adv), num_estimates=8)
        variance[baseline] = m.total
    assert variance["none"] >= 2 * variance["running_mean"], variance
    assert variance["none"] >= 2 * variance["group"], variance


def test_reinforce_with_a_baseline_learns_a_simple_task(model_path, tmp_path):
    """Reward = fraction of 'good' words in the completion: a few dozen steps with a baseline raise it clearly."""
    torch.manual_seed(0)
    trainer = make_trainer(
        model_path, str(tmp_path), baseline="running_mean", max_steps=40, learning_rate=2e-2,
        per_device_train_batch_size=16,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 40
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.2, (early, late)


# ------------------------------------------------------------------------------------------------------------------
# The recipe, on the lab
# ------------------------------------------------------------------------------------------------------------------
def _load_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "reinforce.py"
    spec = importlib.util.spec_from_file_location("recipe_reinforce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_runs_on_the_lab_and_reports_the_gradient_variance(lab, tmp_path):
    from hf_rlhf_ext.results import read_log_history, read_metrics

    recipe = _load_recipe()
    out = str(tmp_path / "run")
    argv = [
        "--lab_dir", lab.root, "--output_dir", out, "--baseline", "group", "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--max_completion_length", "12", "--num_eval_prompts", "8",
        "--grad_variance_every", "2", "--disable_tqdm", "true", "--reward_offset", "5",
    ]
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(argv)
    assert training_args.baseline == "group"
    recipe.main(script_args, training_args, model_args)

    metrics = read_metrics(out)
    assert metrics["baseline"] == "group" and metrics["global_step"] == 3
    gv = metrics["grad_variance"]
    assert [m["step"] for m in gv["measurements"]] == [0, 2]
    assert gv["grad_var/total"] > 0 and gv["grad_var/num_measurements"] == 2
    assert "proxy_reward_before" in metrics and "proxy_reward_after" in metrics
    history = read_log_history(out)
    measured = [h for h in history if "grad_var/total" in h]
    assert [h["step"] for h in measured] == [1, 3]
    assert measured[0]["grad_var/total"] == pytest.approx(gv["measurements"][0]["total"])
    trained = [h for h in history if "loss" in h]
    assert all("reinforce/baseline" in h for h in trained)
    # the offset is one more reward function: optimised (in "reward"), not evaluated as a task reward
    assert all(h["rewards/reward_offset/mean"] == 5.0 for h in trained)
    assert all(h["reward"] == pytest.approx(h["rewards/proxy_reward/mean"] + 5.0, abs=1e-4) for h in trained)
    assert metrics["reward_offset"] == 5.0 and "reward_offset_after" not in metrics


def test_on_the_lab_a_baseline_matters_when_the_mean_reward_is_far_from_zero(lab, tmp_path):
    """The lab's proxy RM scores are centred near 0, so b = 0 is already a fair baseline there; add 5 to every reward
    and the variance without a baseline explodes while the baselined estimates (leave-one-out group mean, and the
    batch's own mean) do not move. One generation batch (64 completions of the SFT policy), all variants measured on
    it; the running mean of past batches over training is measured in tests/test_reinforce_baselines.py."""
    from hf_rlhf_ext.callbacks.grad_variance import measure_gradient_variance
    from hf_rlhf_ext.rewards import RewardModelFunction

    torch.manual_seed(0)
    args = tiny_args(str(tmp_path), config_cls=ReinforceConfig, baseline="none", per_device_train_batch_size=64,
                     max_completion_length=24, temperature=1.0)
    trainer = ReinforceTrainer(
        model=lab.policy_path, reward_funcs=RewardModelFunction(lab.reward_model_path, name="proxy_reward"),
        args=args, train_dataset=lab.load_prompts()["train"],
    )
    trainer.model.train()
    prompts = list(lab.load_prompts()["train"]["prompt"][:16])
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
    rewards = batch["advantages"].clone()  # baseline "none": the proxy scores
    assert abs(rewards.mean().item()) < 0.5  # centred RM

    def total(r, baseline):
        # running_mean=None: "running_mean" subtracts this batch's own mean (what the running-mean baseline does on
        # its first batch only, when there is no past), not a running mean of past batches
        adv, _ = reinforce_advantages(r, 4, baseline, running_mean=None)
        return measure_gradient_variance(trainer, dict(batch, advantages=adv), num_estimates=8).total

    none0, none5 = total(rewards, "none"), total(rewards + 5.0, "none")
    group5, batch_mean5 = total(rewards + 5.0, "group"), total(rewards + 5.0, "running_mean")
    assert none5 > 10 * none0
    assert none5 >= 2 * group5 and none5 >= 2 * batch_mean5
    assert group5 == pytest.approx(total(rewards, "group"), rel=1e-3)  # a baseline makes the offset irrelevant

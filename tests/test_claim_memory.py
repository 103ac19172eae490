"""The memory that decides "GRPO trains without a critic at lower memory than PPO": the training state each trainer
holds (``compare.training_state_mb``) counts every tensor storage once, exceeds GRPO's under PPO by at least the
critic, its gradients and its Adam moments, and does not move with the seed; the claim decides on it when every run
has it (its control, each method against itself with another seed, then shows nothing) and falls back to peak RSS,
saying so, on results from before it was kept."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_rlhf_ext.experiments import compare
from hf_rlhf_ext.experiments.compare import training_state_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # pipeline_stages is a recipes/ module
import pipeline_stages as stages  # noqa: E402

MB = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# The measure on hand-built modules: each storage once
# ----------------------------------------------------------------------------------------------------------------------
class _Tied(nn.Module):
    """Two 8 → 8 layers, their weights one tensor unless ``tied`` is False, and a 4-float buffer."""

    def __init__(self, tied: bool):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        if tied:
            self.b.weight = self.a.weight
        self.register_buffer("mask", torch.ones(4))


def _sharing(model: _Tied) -> nn.Module:
    """A frozen module of its own whose weight and bias are ``model.a``'s tensors (a reference that shares them)."""
    ref = nn.Linear(8, 8)
    ref.weight = nn.Parameter(model.a.weight.detach(), requires_grad=False)
    ref.bias = nn.Parameter(model.a.bias.detach(), requires_grad=False)
    return ref


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    """One SGD step with momentum: a gradient and a momentum buffer per parameter, each of the parameter's size."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.a(model.b(torch.ones(2, 8))).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("tied, n_floats", [(True, 64 + 8 + 8), (False, 2 * 64 + 8 + 8)])
def test_a_tied_or_shared_tensor_counts_once(tied, n_floats):
    model = _Tied(tied)
    optimizer = _trained(model)
    frozen_rm = nn.Linear(4, 4).requires_grad_(False)  # a reward model: weights only (20 floats)

    def plain(prompts=None, completions=None, **kwargs):
        return [0.0] * len(completions)

    wrapped = SimpleNamespace(optimizer=optimizer)  # accelerate's AcceleratedOptimizer keeps the real one here
    trainer = SimpleNamespace(model=model, ref_model=_sharing(model), value_model=None, optimizer=wrapped)
    expected = (3 * n_floats + 4 + 20) * 4 / MB  # weights, gradients, momentum; the buffer; the reward model
    assert training_state_mb(trainer, [SimpleNamespace(model=frozen_rm), plain]) == pytest.approx(expected)
    unwrapped = SimpleNamespace(model=model, optimizer=optimizer)
    assert training_state_mb(unwrapped) == pytest.approx((3 * n_floats + 4) * 4 / MB)


def test_a_gradient_freed_between_steps_still_counts():
    """``zero_grad(set_to_none=True)`` frees the gradients after a step; a step holds them, so they count."""
    model = _Tied(tied=True)
    optimizer = _trained(model)
    held = training_state_mb(SimpleNamespace(model=model, optimizer=optimizer))
    optimizer.zero_grad(set_to_none=True)
    assert training_state_mb(SimpleNamespace(model=model, optimizer=optimizer)) == held
    model.requires_grad_(False)  # frozen: no gradient in any step
    assert training_state_mb(SimpleNamespace(model=model, optimizer=optimizer)) == pytest.approx(held - 80 * 4 / MB)


# ----------------------------------------------------------------------------------------------------------------------
# The measure on real trainers of the lab (two steps each, built as compare.run_one builds them)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(lab, tmp_path_factory):
    """(trainer, reward functions) after two steps: PPO seed 0, GRPO seeds 0 and 1."""
    out = str(tmp_path_factory.mktemp("state"))
    spec = compare.parse_compare_spec(["--lab_dir", lab.root, "--output_dir", out, "--seeds", "0", "--max_steps", "2",
                                       "--eval_every", "1", "--per_device_train_batch_size", "8",
                                       "--grpo_num_generations", "4"])
    runs = {}
    for name, seed in (("ppo", 0), ("grpo", 0), ("grpo", 1)):
        trainer, setup, _, _ = compare.make_run_trainer(dataclasses.replace(spec, trainer=name, seed=seed))
        trainer.train()
        runs[name, seed] = (trainer, setup.reward_funcs)
    return runs


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_ppo_holds_more_than_grpo_by_at_least_the_critic_its_gradients_and_adam_moments(trained):
    ppo, grpo = trained["ppo", 0], trained["grpo", 0]
    assert getattr(grpo[0], "value_model", None) is None
    critic = ppo[0].value_model
    trainable = _bytes(p for p in critic.parameters() if p.requires_grad)
    assert trainable > 0
    at_least = (_bytes(critic.parameters()) + 3 * trainable) / MB  # weights + gradients + Adam's two moments
    at_most = at_least + (_bytes(critic.buffers()) + 4096) / MB  # + its buffers and Adam's step counters
    difference = training_state_mb(*ppo) - training_state_mb(*grpo)
    assert at_least <= difference <= at_most, (difference, at_least)


def test_the_optimizer_state_behind_accelerates_wrapper_counts(trained):
    trainer, funcs = trained["grpo", 0]
    assert hasattr(trainer.optimizer, "optimizer")  # accelerate's wrapper
    no_optimizer = SimpleNamespace(model=trainer.model, ref_model=trainer.ref_model, optimizer=None)
    adam = 2 * _bytes(p for p in trainer.model.parameters() if p.requires_grad) / MB
    assert training_state_mb(trainer, funcs) - training_state_mb(no_optimizer, funcs) >= adam


def test_the_training_state_does_not_change_with_the_seed(trained):
    (seed0, funcs0), (seed1, funcs1) = trained["grpo", 0], trained["grpo", 1]
    first = [next(seed0.model.parameters()), next(seed1.model.parameters())]
    assert not torch.equal(*first)  # the seeds trained differently
    assert training_state_mb(seed0, funcs0) == training_state_mb(seed1, funcs1)


# ----------------------------------------------------------------------------------------------------------------------
# The claim on the training state
# ----------------------------------------------------------------------------------------------------------------------
ARGS = SimpleNamespace(output_dir="/out")


def _result(ppo_state, grpo_state, ppo_peak, grpo_peak, gains=((0.29, 0.25), (0.33, 0.30))):
    """A ppo_vs_grpo result from per-seed training states and peaks (``*_state`` None: from before it was kept)."""
    runs = []
    for name, states, peaks, g in (("ppo", ppo_state, ppo_peak, gains[0]), ("grpo", grpo_state, grpo_peak, gains[1])):
        for seed, peak in enumerate(peaks):
            run = {"trainer": name, "seed": seed, "gold_start": 0.26, "gold_end": 0.26 + g[seed]}
            runs.append(run | {"peak_memory_mb": peak} | ({} if states is None else {"state_memory_mb": states[seed]}))

    def stats(name, key):
        vals = [x[key] for x in runs if x["trainer"] == name]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    keys = ("gold_start", "gold_end", "peak_memory_mb") + (() if ppo_state is None else ("state_memory_mb",))
    trainers = {name: {k: stats(name, k) for k in keys} | {"memory_method": "peak_rss_above_imports"}
                | {k: {"mean": 1.0} for k in ("gold_peak", "kl_end", "seconds_per_step")} for name in ("ppo", "grpo")}
    return {"trainers": trainers, "seeds": [0, 1], "runs": runs, "plots": []}


# The lab's seed 0: GRPO's peak moved 12 MB between its own seeds against a 21 MB gap to PPO; its state did not move.
NOISY_PEAKS = ([125.0, 127.0], [104.0, 117.0])


def test_with_a_state_the_same_for_every_seed_the_control_shows_nothing_and_the_claim_holds():
    on_peak = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": _result(None, None, *NOISY_PEAKS)})
    assert on_peak.control_holds and on_peak.holds is False  # the peak's noise: GRPO "beats" itself
    result = _result([12.1, 12.1], [10.3, 10.3], *NOISY_PEAKS)  # 15 % below
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": result})
    assert claim.values["memory_measure"] == "state_memory_mb"
    assert claim.control["values"]["memory_measure"] == "state_memory_mb"
    assert claim.holds and claim.control_holds is False
    assert (claim.values["grpo_memory_mb"], claim.values["ppo_memory_mb"]) == (10.3, 12.1)
    assert claim.values["grpo_peak_memory_mb"] == 110.5 and claim.values["ppo_peak_memory_mb"] == 126.0
    selves = claim.control["values"]["self"]
    assert all(c["lower_seed"] != c["higher_seed"] and c["lower_mb"] == c["higher_mb"] for c in selves.values())
    assert "training state" in claim.statistic and "peak memory" in claim.statistic
    text = stages.section_ppo_vs_grpo(ARGS, result).reading
    assert "GRPO needs no critic and holds less training state" in text and "10.3 MB against PPO's 12.1 MB" in text
    assert "neither shows the effect" in text and "NOT" not in text


def test_on_the_real_quick_stage_the_state_decides_and_does_not_move_between_seeds():
    """The --quick stage on the lab (seeds 0, 1): training state PPO 12.1 MB, GRPO 10.3 MB in both seeds; peak RSS
    PPO 132.6 / 131.2 MB, GRPO 115.6 / 108.1 MB."""
    import json

    real = json.loads((Path(__file__).resolve().parent / "data" / "pipeline_ppo_vs_grpo_state_quick.json").read_text())
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": real})
    assert claim.values["memory_measure"] == "state_memory_mb" and claim.holds and claim.control_holds is False
    assert all(v["memory_seed_range_mb"] == 0 for v in claim.values["noise"].values())
    peaks = claim.values["per_seed"]["grpo"]["peak_memory_mb"]
    assert max(peaks) - min(peaks) > 0  # the peak moved between GRPO's seeds; the state did not


@pytest.mark.parametrize("grpo_state", [12.1, 11.0, 13.0])  # equal, 9 % below (under the margin), above
def test_with_grpo_not_below_ppo_by_the_margin_the_claim_does_not_hold(grpo_state):
    result = _result([12.1, 12.1], [grpo_state] * 2, [140.0, 141.0], [100.0, 101.0])  # the peaks would say it does
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": result})
    assert claim.values["memory_measure"] == "state_memory_mb" and claim.holds is False
    assert claim.control_holds is False
    text = stages.section_ppo_vs_grpo(ARGS, result).reading
    assert "GRPO needs no critic, yet does NOT hold less training state" in text
    assert "GRPO needs no critic and holds less training state" not in text


def test_an_old_result_without_state_numbers_falls_back_to_peak_memory_and_says_so():
    old = _result(None, None, [128.0, 127.0], [103.3, 104.1])
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": old})
    assert claim.values["memory_measure"] == "peak_memory_mb" and claim.holds and claim.control_holds is False
    assert claim.values["grpo_memory_mb"] == pytest.approx(103.7) and "grpo_peak_memory_mb" not in claim.values
    assert "peak memory" in claim.statistic and "training state" not in claim.statistic
    text = stages.section_ppo_vs_grpo(ARGS, old).reading
    assert "GRPO needs no critic and peaks lower" in text and "training state" not in text
    partial = _result([12.1, 12.1], [10.3, 10.3], [128.0, 127.0], [103.3, 104.1])
    del partial["runs"][0]["state_memory_mb"]  # one run without it: the measure is not every run's
    assert stages.claim_ppo_vs_grpo({"ppo_vs_grpo": partial}).values["memory_measure"] == "peak_memory_mb"


def test_the_stage_keeps_the_training_state_of_each_trainer_and_run(monkeypatch, tmp_path):
    def row(trainer, seed, peak, state):
        curve = [{"step": 0, "gold": 0.26, "proxy": 0.1, "kl": 0.0, "kl_k1": 0.0},
                 {"step": 5, "gold": 0.5, "proxy": 0.4, "kl": 0.5, "kl_k1": 0.5}]
        g = 1 if trainer == "ppo" else 8
        return {"trainer": trainer, "seed": seed, "beta": 0.1, "prompts_per_step": 32 // g, "completions_per_prompt": g,
                "steps": 5, "curve": curve, **compare.curve_numbers(curve), "peak_memory_mb": peak,
                "memory_method": "peak_rss_above_imports", "state_memory_mb": state, "seconds_per_step": 0.2}

    rows = [row("ppo", 0, 125.0, 12.1), row("grpo", 0, 104.0, 10.3), row("ppo", 1, 127.0, 12.1),
            row("grpo", 1, 117.0, 10.3)]
    monkeypatch.setattr(compare, "run_compare", lambda argv, progress: compare.summarise(rows) | {
        "settings": {"seeds": [0, 1]}})
    args = SimpleNamespace(seed=0, quick=True, on_lab=True, model_name_or_path=None, dataset_name=None,
                           reward_model_name_or_path=None, reward_funcs=None, gold_funcs=None, use_peft=False)
    result = stages.stage_ppo_vs_grpo(args, str(tmp_path))
    assert result["trainers"]["grpo"]["state_memory_mb"]["mean"] == pytest.approx(10.3)
    assert [r["state_memory_mb"] for r in result["runs"]] == [12.1, 10.3, 12.1, 10.3]
    assert stages.claim_ppo_vs_grpo({"ppo_vs_grpo": result}).values["memory_measure"] == "state_memory_mb"
    table = compare.report_markdown(compare.summarise(rows))
    assert "training state (MB)" in table and "| 10.3 ± 0.0 |" in table

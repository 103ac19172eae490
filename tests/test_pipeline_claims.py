"""Falsification tests of the pipeline's experimental claims (recipes/pipeline_stages.py): each claim is fed a real or
constructed stage result and must hold on the effect, NOT hold when its control (replayed from the same numbers)
shows the same, and its section must say the contrary on contrary numbers."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # pipeline_stages is a recipes/ module
import pipeline_stages as stages

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
ARGS = SimpleNamespace(output_dir="/out")


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


# ----------------------------------------------------------------------------------------------------------------------
# KL falls as β rises
# ----------------------------------------------------------------------------------------------------------------------
def _grid(betas, kls_per_seed):
    """A beta_sweep result from per-β lists of per-seed final KLs (the other numbers fixed)."""
    rows = []
    for beta, kls in zip(betas, kls_per_seed):
        stat = {"mean": sum(kls) / len(kls), "min": min(kls), "max": max(kls)}
        rows.append({"beta": beta, "seeds": list(range(len(kls))), "final_kl": stat}
                    | {k: {"mean": 0.5, "min": 0.5, "max": 0.5} for k in ("final_proxy", "final_gold", "peak_gold")})
    means = [row["final_kl"]["mean"] for row in rows]
    from hf_rlhf_ext.experiments.sweeps import spearman

    return {"betas": list(betas), "per_beta": rows, "spearman_beta_final_kl": spearman(list(betas), means),
            "plots": [], "lowest_beta": {"beta": betas[0], "peak_gold": 0.9, "final_gold": 0.5, "proxy_at_peak": 0.7,
                                         "final_proxy": 1.2},
            "highest_beta": {"beta": betas[-1], "final_kl": means[-1]},
            "gao_fit": {"alpha": 1.0, "beta": 0.2, "r2": 0.9, "peak_kl": 2.0, "n_points": 12}}


def test_kl_vs_beta_holds_on_the_real_quick_sweep_and_not_on_its_shuffled_control():
    """The --quick sweep on the lab (β 0, 0.02, 0.2, 1; one seed): KL 3.12 → 0.26 nats, ρ = −1; the rule holds on
    1 of the 24 orderings of the β labels (4% < 5%)."""
    real = _load("pipeline_beta_sweep_quick.json")
    claim = stages.claim_kl_vs_beta({"beta_sweep": real})
    assert claim.holds and claim.control_holds is False and claim.kind == "experiment" and claim.seeds == [0]
    assert claim.control["values"] == {"orderings": 24, "exact": True, "share_rule_holds": pytest.approx(1 / 24)}
    assert claim.values["kl_fall"] == pytest.approx(3.1212 - 0.2612, abs=1e-3)
    assert "not measured (one seed)" in claim.values["noise"]
    shuffled = copy.deepcopy(real)  # the control replayed: the same KLs, β labels in another order
    for row, kl in zip(shuffled["per_beta"], (1.0845, 0.2612, 3.1212, 2.5475)):
        row["final_kl"] = {"mean": kl, "min": kl, "max": kl}
    assert stages.claim_kl_vs_beta({"beta_sweep": shuffled}).holds is False


def test_kl_vs_beta_does_not_hold_on_a_grid_too_small_to_tell_an_ordering_from_chance():
    three = stages.claim_kl_vs_beta({"beta_sweep": _grid([0.0, 0.1, 1.0], [[3.0], [1.0], [0.2]])})
    assert three.control_holds and three.holds is False  # a shuffled 3-point grid is as ordered 1 time in 6
    assert three.control["values"]["share_rule_holds"] == pytest.approx(1 / 6)
    assert "too few β values" in stages.section_beta_sweep(ARGS, _grid([0.0, 0.1, 1.0], [[3.0], [1.0], [0.2]])).reading


def test_kl_vs_beta_needs_the_fall_to_exceed_the_seed_spread_at_one_beta():
    betas = [0.0, 0.02, 0.2, 1.0]
    ok = stages.claim_kl_vs_beta({"beta_sweep": _grid(betas, [[3.0, 3.3, 2.9], [2.4, 2.6, 2.5], [1.1, 1.0, 1.2],
                                                               [0.3, 0.25, 0.2]])})
    assert ok.holds and ok.control_holds is False and ok.seeds == [0, 1, 2]
    assert ok.values["seed_range_at_one_beta"] == pytest.approx(0.4)
    noisy = _grid(betas, [[0.5, 2.5, 0.3], [1.0, 0.2, 2.0], [0.3, 1.5, 1.0], [0.1, 0.4, 0.8]])  # ordered means
    claim = stages.claim_kl_vs_beta({"beta_sweep": noisy})  # 1.1 → 0.43 nats, seeds 0.3 … 2.5 apart at β = 0
    assert claim.values["rho"] == pytest.approx(-1.0) and claim.control_holds is False and claim.holds is False
    assert "within the seed-to-seed range" in stages.section_beta_sweep(ARGS, noisy).reading


def test_kl_vs_beta_does_not_hold_when_the_policy_barely_moved():
    """A learning rate too small for the model orders tiny KLs by β too (ρ = −1 on 1e-7 nats): no leash is shown."""
    betas = [0.0, 0.02, 0.2, 1.0]
    still = _grid(betas, [[4e-7], [3e-7], [2e-7], [1e-8]])
    claim = stages.claim_kl_vs_beta({"beta_sweep": still})
    assert claim.values["rho"] == pytest.approx(-1.0) and claim.control_holds is False and claim.holds is False
    assert "barely moved" in stages.section_beta_sweep(ARGS, still).reading
    moved = _grid(betas, [[0.4], [0.3], [0.2], [0.01]])  # the same ordering with a fall of 0.39 nats
    assert stages.claim_kl_vs_beta({"beta_sweep": moved}).holds


def test_kl_vs_beta_prose_follows_the_direction_of_the_numbers():
    betas = [0.0, 0.02, 0.2, 1.0]
    falls, rises = _grid(betas, [[3.1], [2.5], [1.1], [0.3]]), _grid(betas, [[0.3], [1.1], [2.5], [3.1]])
    flat = _grid(betas, [[1.0], [1.2], [0.9], [1.1]])
    assert stages.claim_kl_vs_beta({"beta_sweep": rises}).holds is False
    assert stages.claim_kl_vs_beta({"beta_sweep": flat}).holds is False
    read = {name: stages.section_beta_sweep(ARGS, r).reading for name, r in
            (("falls", falls), ("rises", rises), ("flat", flat))}
    assert "the leash works" in read["falls"] and "NOT" not in read["falls"].split(".")[0]
    assert "KL RISES with β: the leash does NOT work" in read["rises"] and "leash works" not in read["rises"]
    assert "KL is not ordered by β" in read["flat"] and "leash works" not in read["flat"]


# ----------------------------------------------------------------------------------------------------------------------
# REINFORCE raises the reward (and a baseline cuts the variance)
# ----------------------------------------------------------------------------------------------------------------------
def _reinforce(final, start, later, cut=30.0):
    """A reinforce result: per seed the running-mean run's final reward, the untrained start's two windows."""
    seeds = list(range(len(final)))

    def b(var):
        return {"median_grad_variance": {"median": var}, "variance_vs_none": 100.0 / var,
                "final_reward": {"mean": sum(final) / len(final)}, "first_reward": 0.0}
    return {"baselines": {"none": b(100.0 * cut), "running_mean": b(100.0)}, "seeds": seeds, "reward_offset": 5.0,
            "plots": [], "final_window": 10,
            "per_seed": [{"seed": s, "first_reward": 0.0, "final_reward": f} for s, f in zip(seeds, final)],
            "untrained": {"learning_rate": 0.0, "steps": 20, "per_seed": [
                {"seed": s, "start_window": a, "later_window": z} for s, a, z in zip(seeds, start, later)]}}


LEARNS = ([0.42, 0.45, 0.38], [0.05, 0.09, 0.01], [0.07, 0.04, 0.03])  # final; untrained start, measured again


def test_reinforce_gain_holds_over_seeds_and_not_on_the_untrained_start_measured_twice():
    claim = stages.claim_reinforce({"reinforce": _reinforce(*LEARNS)})
    assert claim.holds and claim.control_holds is False and claim.kind == "experiment" and claim.seeds == [0, 1, 2]
    lo, hi = claim.values["reward_gain_ci95"]
    assert 0 < lo < claim.values["reward_gain"] < hi and claim.values["reward_gain"] == pytest.approx(0.3667, abs=1e-3)
    assert claim.control["values"]["ci95"][0] < 0 < claim.control["values"]["ci95"][1]
    assert "sd of the gain over seeds" in claim.values["noise"]
    text = stages.section_reinforce(ARGS, _reinforce(*LEARNS)).reading
    assert "REINFORCE raised the reward by +0.37 (95% t interval [" in text and "NOT" not in text


def test_reinforce_gain_on_the_real_quick_stage_and_its_control_replayed_as_the_effect():
    """The --quick stage on the lab (seeds 0–2, 30 steps): gain +0.40 [+0.29, +0.51] over the untrained start; the
    untrained start measured twice −0.01 [−0.13, +0.11]."""
    real = _load("pipeline_reinforce_quick.json")
    claim = stages.claim_reinforce({"reinforce": real})
    assert claim.holds and claim.control_holds is False and claim.seeds == [0, 1, 2]
    assert claim.values["reward_gain_ci95"][0] > 0 > claim.control["values"]["ci95"][0]
    replayed = copy.deepcopy(real)  # the control's numbers in the effect's place: the gain must vanish
    finals = {u["seed"]: u["later_window"] for u in real["untrained"]["per_seed"]}
    for p in replayed["per_seed"]:
        p["final_reward"] = finals[p["seed"]]
    assert stages.claim_reinforce({"reinforce": replayed}).holds is False
    assert "NOT distinguishable from no gain" in stages.section_reinforce(ARGS, replayed).reading


def test_reinforce_gain_does_not_hold_when_the_untrained_start_moves_as_much():
    final, start, _ = LEARNS
    drifts = _reinforce(final, start, [f - 0.01 for f in final])  # the control replayed with the effect's size
    claim = stages.claim_reinforce({"reinforce": drifts})
    assert claim.control_holds and claim.holds is False
    assert "needs no learning, so it is NOT shown" in stages.section_reinforce(ARGS, drifts).reading


def test_reinforce_gain_within_seed_noise_or_a_fall_does_not_hold_and_is_said():
    noisy = _reinforce([0.40, 0.05, 0.30], [0.05, 0.30, 0.02], [0.07, 0.04, 0.03])  # mean +0.13, sd 0.3
    claim = stages.claim_reinforce({"reinforce": noisy})
    assert claim.values["reward_gain"] >= stages.REWARD_GAIN and claim.values["reward_gain_ci95"][0] < 0
    assert claim.holds is False and claim.control_holds is False
    assert "NOT distinguishable from no gain" in stages.section_reinforce(ARGS, noisy).reading
    tiny = _reinforce([0.10, 0.11, 0.12], [0.05, 0.06, 0.05], [0.05, 0.06, 0.05])  # +0.06: real, but under the bar
    assert stages.claim_reinforce({"reinforce": tiny}).holds is False
    falls = _reinforce([-0.40, -0.35, -0.42], [0.05, 0.09, 0.01], [0.07, 0.04, 0.03])
    assert stages.claim_reinforce({"reinforce": falls}).holds is False
    text = stages.section_reinforce(ARGS, falls).reading
    assert "The reward FELL under REINFORCE" in text and "raised the reward" not in text


def test_reinforce_gain_is_undecided_with_one_seed_and_the_variance_cut_still_counts():
    one = _reinforce([0.42], [0.05], [0.07])
    claim = stages.claim_reinforce({"reinforce": one})
    assert claim.holds is None and "1 seed(s)" in claim.skipped and claim.values["reward_gain_ci95"] is None
    assert "is NOT decided here" in stages.section_reinforce(ARGS, one).reading
    no_cut = stages.claim_reinforce({"reinforce": _reinforce(*LEARNS, cut=1.2)})
    assert no_cut.holds is False and no_cut.control_holds is False  # the gain holds, the cut does not


# ----------------------------------------------------------------------------------------------------------------------
# PPO vs GRPO: memory and gold
# ----------------------------------------------------------------------------------------------------------------------
def _compare(ppo_mb, grpo_mb, ppo_gains, grpo_gains, start=0.26, start_jitter=0.0):
    """A ppo_vs_grpo result from per-seed peak memory and gold gains (gold start per run: start ± jitter)."""
    runs = []
    for name, mbs, gains in (("ppo", ppo_mb, ppo_gains), ("grpo", grpo_mb, grpo_gains)):
        for seed, (mb, g) in enumerate(zip(mbs, gains)):
            s = start + (start_jitter if seed % 2 else 0.0)
            runs.append({"trainer": name, "seed": seed, "gold_start": s, "gold_end": s + g, "peak_memory_mb": mb})

    def stats(name, key):
        vals = [x[key] for x in runs if x["trainer"] == name]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    trainers = {name: {k: stats(name, k) for k in ("gold_start", "gold_end", "peak_memory_mb")}
                | {k: {"mean": 1.0} for k in ("gold_peak", "kl_end", "seconds_per_step")} for name in ("ppo", "grpo")}
    return {"trainers": trainers, "seeds": list(range(len(ppo_mb))), "runs": runs, "plots": []}


def test_ppo_vs_grpo_holds_on_the_lab_numbers_and_not_against_itself():
    """The lab, quick, seed 0: PPO 128 MB, GRPO 103 MB; gold 0.26 → 0.55 (PPO), → 0.59 (GRPO); a second seed near."""
    real = _compare([128.0, 127.0], [103.3, 104.1], [0.29, 0.25], [0.33, 0.30])
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": real})
    assert claim.holds and claim.control_holds is False and claim.kind == "experiment" and claim.seeds == [0, 1]
    assert claim.control["values"]["self"]["grpo"]["higher_mb"] == 104.1
    assert claim.values["noise"]["ppo"]["memory_seed_range_mb"] == pytest.approx(1.0)
    text = stages.section_ppo_vs_grpo(ARGS, real).reading
    assert "peaks lower" in text and "both raise gold" in text and "neither shows the effect" in text
    assert "NOT" not in text
    loaded = _compare([122.3, 127.2], [102.5, 97.3], [0.29, 0.18], [0.33, 0.24])  # another quick run: seeds 5 MB apart
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": loaded})  # a 5 % margin would let GRPO beat itself
    assert claim.holds and claim.control_holds is False and stages.MEMORY_MARGIN > 5.2 / 102.5


def test_ppo_vs_grpo_on_the_real_quick_stage_and_ppo_against_itself_in_grpos_place():
    """The --quick stage on the lab (seeds 0, 1): PPO 125.7 / 123.3 MB, GRPO 96.7 / 98.2 MB; gold gains PPO +0.29 /
    +0.18, GRPO +0.33 / +0.24; the untrained start 0.259 in every run."""
    real = _load("pipeline_ppo_vs_grpo_quick.json")
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": real})
    assert claim.holds and claim.control_holds is False and claim.seeds == [0, 1]
    assert max(c["higher_mb"] - c["lower_mb"] for c in claim.control["values"]["self"].values()) < 3
    ppo = [x for x in real["runs"] if x["trainer"] == "ppo"]
    itself = copy.deepcopy(real)  # the control replayed as the comparison: PPO (seeds swapped) in GRPO's place
    itself["runs"] = ppo + [{**x, "trainer": "grpo", "seed": 1 - x["seed"]} for x in ppo]
    for key in ("peak_memory_mb", "gold_start", "gold_end"):
        itself["trainers"]["grpo"][key] = dict(itself["trainers"]["ppo"][key])
    assert stages.claim_ppo_vs_grpo({"ppo_vs_grpo": itself}).holds is False
    assert "does NOT peak lower by the margin" in stages.section_ppo_vs_grpo(ARGS, itself).reading


def test_ppo_vs_grpo_does_not_hold_when_reseeding_one_method_moves_its_memory_as_much():
    wobbly = _compare([128.0, 127.0], [95.0, 112.0], [0.29, 0.25], [0.33, 0.30])  # GRPO 95 or 112 MB by seed
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": wobbly})
    assert claim.values["memory_ok"] and claim.control_holds and claim.holds is False
    assert "NOT beyond the noise" in stages.section_ppo_vs_grpo(ARGS, wobbly).reading
    restart = _compare([128.0, 127.0], [103.3, 104.1], [0.29, 0.25], [0.33, 0.30], start_jitter=0.15)
    jittery = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": restart})  # the untrained start moves 0.15 between seeds
    assert jittery.control_holds and jittery.holds is False


def test_ppo_vs_grpo_does_not_hold_without_the_effect_and_says_the_contrary():
    same = _compare([128.0, 127.0], [126.0, 125.5], [0.29, 0.25], [0.33, 0.30])  # 1.5% lower: under the margin
    assert stages.claim_ppo_vs_grpo({"ppo_vs_grpo": same}).holds is False
    assert "does NOT peak lower by the margin" in stages.section_ppo_vs_grpo(ARGS, same).reading
    heavier = _compare([103.0, 104.0], [128.0, 127.0], [0.29, 0.25], [0.33, 0.30])
    text = stages.section_ppo_vs_grpo(ARGS, heavier).reading
    assert "PPO peaks lower by the margin" in text and "GRPO needs no critic and peaks lower" not in text
    noisy = _compare([128.0, 127.0], [103.3, 104.1], [0.29, 0.25], [0.45, -0.05])  # GRPO: +0.2 ± 0.35
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": noisy})
    assert claim.values["grpo_gold_gain"] >= stages.GOLD_GAIN and claim.holds is False
    text = stages.section_ppo_vs_grpo(ARGS, noisy).reading
    assert "gold does NOT rise by the margin under both (only PPO does)" in text and "both raise gold" not in text


def test_ppo_vs_grpo_is_undecided_with_one_seed():
    one = _compare([128.0], [103.3], [0.29], [0.33])
    claim = stages.claim_ppo_vs_grpo({"ppo_vs_grpo": one})
    assert claim.holds is None and "needs 2" in claim.skipped
    assert "Not decided" in stages.section_ppo_vs_grpo(ARGS, one).reading

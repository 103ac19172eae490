"""The full run's claims over seeds (recipes/pipeline_stages.py): the mini loop, best-of-N distillation and the reward
model decide by a 95% t interval over 3 seeds, each against a control decided the same way; a one-seed (quick) result
decides as one run, as before. Stage results here are constructed, in the shape the stages store."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # pipeline_stages is a recipes/ module
import pipeline_stages as stages

ARGS = SimpleNamespace(output_dir="/out")
SEEDS = (42, 43, 44)


def test_ci_clears_needs_the_whole_interval_on_its_side():
    assert stages.ci_clears([0.6, 0.61, 0.62], 0.5) and not stages.ci_clears([0.6, 0.61, 0.62], 0.5, above=False)
    assert stages.ci_clears([0.4, 0.41, 0.42], 0.5, above=False)
    assert not stages.ci_clears([0.9, 0.6, 0.1], 0.5)  # mean above, interval across
    assert not stages.ci_clears([0.9], 0.5)  # no interval from one value


# ----------------------------------------------------------------------------------------------------------------------
# The mini loop: per seed the polite gain and the KL ÷ the same seed's unpenalised KL
# ----------------------------------------------------------------------------------------------------------------------
def _run(after, kl, before=0.28):
    return {"polite_share_before": before, "polite_share_after": after, "kl_after": kl}


def _mini(pairs, steps=40):
    """pairs: per seed ((after, kl) with the penalty, (after, kl) without it); the first seed's also at the top."""
    per = [{"seed": s, "kl_penalty": _run(*on), "no_kl_penalty": _run(*off)} for s, (on, off) in zip(SEEDS, pairs)]
    return {**per[0]["kl_penalty"], "no_kl_penalty": per[0]["no_kl_penalty"], "steps": steps, "plots": [],
            "seeds": [p["seed"] for p in per], "per_seed": per}


LAB_MINI = [((0.91, 1.1), (0.97, 2.67)), ((0.88, 1.0), (0.95, 2.5)), ((0.93, 1.2), (0.96, 2.8))]


def test_mini_loop_holds_when_every_seed_learns_under_the_leash():
    c = stages.claim_mini_loop({"mini_loop": _mini(LAB_MINI)})
    assert c.holds is True and c.control_holds is False and c.seeds == list(SEEDS)
    gain, ratio = c.values["gain_over_seeds"], c.values["kl_ratio_over_seeds"]
    assert gain["ci95"][0] > stages.POLITE_GAIN and ratio["ci95"][1] < stages.KL_RATIO_SEEDS
    assert sorted(gain["per_seed"]) == [str(s) for s in SEEDS]
    assert c.control["values"]["kl_ratio_over_seeds"]["ci95"][0] > 1  # the unpenalised run's KL, swapped: above
    text = stages.section_mini_loop(ARGS, _mini(LAB_MINI)).reading
    assert "learned the behaviour" in text and "95% t interval" in text and "over 3 seeds" in text


def test_mini_loop_does_not_hold_when_one_seed_breaks_the_leash():
    off = [LAB_MINI[0], LAB_MINI[1], ((0.93, 2.7), (0.96, 2.8))]  # seed 3: the penalty changed nothing
    c = stages.claim_mini_loop({"mini_loop": _mini(off)})
    assert c.holds is False and c.values["kl_ratio_over_seeds"]["ci95"][1] > stages.KL_RATIO_SEEDS
    assert "does NOT hold" in stages.section_mini_loop(ARGS, _mini(off)).reading
    not_learned = [LAB_MINI[0], LAB_MINI[1], ((0.35, 1.2), (0.96, 2.8))]  # seed 3 learned nothing
    assert stages.claim_mini_loop({"mini_loop": _mini(not_learned)}).holds is False


def test_mini_loop_over_seeds_needs_the_ratio_interval_below_one_not_below_the_one_run_margin():
    """The lab's full run: every seed's penalty lowered KL (ratios 0.41, 0.70, 0.59), an interval [0.20, 0.93] that
    holds below 1 though it reaches above the one-run margin of 0.75; a seed where the penalty did nothing does not."""
    lab = [((0.91, 0.41), (0.97, 1.0)), ((0.97, 0.70), (0.97, 1.0)), ((0.94, 0.59), (0.97, 1.0))]
    c = stages.claim_mini_loop({"mini_loop": _mini(lab)})
    assert c.holds is True and stages.KL_RATIO < c.values["kl_ratio_over_seeds"]["ci95"][1] < 1
    flat = [lab[0], lab[1], ((0.94, 1.05), (0.97, 1.0))]
    assert stages.claim_mini_loop({"mini_loop": _mini(flat)}).holds is False


def test_mini_loop_control_holds_when_the_roles_swap():
    swapped = [((a2, k2), (a1, k1)) for (a1, k1), (a2, k2) in LAB_MINI]  # the "penalised" run drifts the most
    c = stages.claim_mini_loop({"mini_loop": _mini(swapped)})
    assert c.control_holds is True and c.holds is False


def test_mini_loop_one_seed_decides_as_one_run():
    quick = _mini(LAB_MINI[:1])
    ok = stages.claim_mini_loop({"mini_loop": quick})
    assert ok.holds is True and "gain_over_seeds" not in ok.values and ok.values["kl_ratio"] < stages.KL_RATIO
    old = {k: v for k, v in quick.items() if k not in ("seeds", "per_seed")}  # stored before the seeds
    assert stages.claim_mini_loop({"mini_loop": old}).holds is True
    leash_off = _mini([((0.91, 2.6), (0.97, 2.67))])
    assert stages.claim_mini_loop({"mini_loop": leash_off}).holds is False


# ----------------------------------------------------------------------------------------------------------------------
# Best-of-N distillation: per seed the round-1 gold gain, and best of 1's
# ----------------------------------------------------------------------------------------------------------------------
def _bon(gains, control_gains):
    pts = [{"n": n, "proxy": p, "gold": g, "kl": 0.5 * i} for i, (n, p, g) in enumerate(zip((1, 4, 16), (0.2, 0.6, 1.0),
                                                                                           (0.3, 0.6, 0.2)))]
    per = [{"seed": s, "rounds": 2 if i == 0 else 1, "pool_size": 64 if i == 0 else 32, "gain": g,
            "best_of_1_gain": c} for i, (s, g, c) in enumerate(zip(SEEDS, gains, control_gains))]
    first = {"initial": {"gold": 0.3}, "distilled": [{"round": 1, "eval": {"gold": 0.3 + gains[0]}}]}
    return {"select": "proxy", "gold": "gold", "pool_size": 64, "curve": {"points": pts}, **first,
            "best_of_n": {"gold": 0.6}, "plots": [], "seeds": [p["seed"] for p in per], "per_seed": per,
            "best_of_1": {"initial": {"gold": 0.3},
                          "distilled": [{"round": 1, "eval": {"gold": 0.3 + control_gains[0]}}]}}


def test_bon_holds_when_every_seed_distils_above_the_margin():
    r = _bon((0.21, 0.19, 0.23), (0.02, -0.01, 0.03))
    c = stages.claim_best_of_n({"best_of_n": r})
    assert c.holds is True and c.control_holds is False and c.seeds == list(SEEDS)
    assert c.values["gain_over_seeds"]["ci95"][0] > stages.BON_MARGIN
    assert c.values["settings_per_seed"]["43"] == {"rounds": 1, "pool_size": 32}  # said, not hidden
    text = stages.section_best_of_n(ARGS, r).reading
    assert "distillation raises" in text and "95% t interval" in text and "over 3 seeds" in text


def test_bon_does_not_hold_when_one_seed_falls_short():
    r = _bon((0.21, 0.19, -0.05), (0.02, -0.01, 0.03))  # mean 0.12 ≥ the margin; the interval is not
    c = stages.claim_best_of_n({"best_of_n": r})
    assert c.holds is False and c.values["gain_over_seeds"]["ci95"][0] < stages.BON_MARGIN
    assert "does NOT raise" in stages.section_best_of_n(ARGS, r).reading


def test_bon_control_holds_when_best_of_1_distils_as_well():
    c = stages.claim_best_of_n({"best_of_n": _bon((0.21, 0.19, 0.23), (0.2, 0.18, 0.22))})
    assert c.control_holds is True and c.holds is False


def test_bon_control_is_decided_over_its_seeds_too():
    lucky_first = _bon((0.21, 0.19, 0.23), (0.15, -0.02, 0.01))  # best of 1 cleared the bar on one seed only
    c = stages.claim_best_of_n({"best_of_n": lucky_first})
    assert c.control_holds is False and c.holds is True


def test_bon_one_seed_decides_as_one_run():
    quick = _bon((0.21,), (0.02,))
    ok = stages.claim_best_of_n({"best_of_n": quick})
    assert ok.holds is True and "gain_over_seeds" not in ok.values
    old = {k: v for k, v in quick.items() if k not in ("seeds", "per_seed")}
    assert stages.claim_best_of_n({"best_of_n": old}).holds is True
    assert stages.claim_best_of_n({"best_of_n": _bon((0.05,), (0.0,))}).holds is False


# ----------------------------------------------------------------------------------------------------------------------
# The reward model: per seed the held-out accuracy and its margin over the (fixed) length-only predictor
# ----------------------------------------------------------------------------------------------------------------------
def _rm(accs, length_acc=0.5175, n=400):
    per = [{"seed": s, "test": {"accuracy": a, "n_pairs": n}} for s, a in zip(SEEDS, accs)]
    return {"test": per[0]["test"], "label_flip_rate_test": 0.14, "seeds": [p["seed"] for p in per], "per_seed": per,
            "length_only": {"accuracy": length_acc, "prefers": "shorter", "n_pairs": n}}


def test_rm_holds_when_every_seed_beats_chance_and_length():
    c = stages.claim_reward_model({"reward_model": _rm((0.695, 0.70, 0.69))})
    assert c.holds is True and c.control_holds is False and c.seeds == list(SEEDS)
    assert c.values["accuracy_over_seeds"]["ci95"][0] > 0.5
    assert c.values["margin_over_length_only_over_seeds"]["ci95"][0] > stages.RM_MARGIN
    text = stages.section_reward_model(ARGS, _rm((0.695, 0.70, 0.69))).reading
    assert "it beats a length-only" in text and "95% t interval" in text and "3 seeds" in text


def test_rm_does_not_hold_when_the_margin_interval_crosses_the_bar():
    spread = _rm((0.70, 0.69, 0.60))  # every seed above chance; the margin's interval reaches below RM_MARGIN
    c = stages.claim_reward_model({"reward_model": spread})
    assert c.holds is False and c.values["margin_over_length_only_over_seeds"]["ci95"][0] < stages.RM_MARGIN
    assert c.values["accuracy_over_seeds"]["ci95"][0] > 0.5
    assert "does NOT beat" in stages.section_reward_model(ARGS, spread).reading
    at_chance = _rm((0.70, 0.69, 0.52))  # one seed at chance: its z rule fails
    assert stages.claim_reward_model({"reward_model": at_chance}).holds is False


def test_rm_needs_every_seed_to_pass_its_z_rules():
    one_weak = _rm((0.70, 0.69, 0.64), n=100)  # both intervals clear; seed 3's z over length-only is under RM_Z
    c = stages.claim_reward_model({"reward_model": one_weak})
    assert c.values["accuracy_over_seeds"]["ci95"][0] > 0.5
    assert c.values["margin_over_length_only_over_seeds"]["ci95"][0] > stages.RM_MARGIN
    assert stages._beats(0.64, 0.5175, 100)[1] < stages.RM_Z and c.holds is False


def test_rm_needs_its_accuracy_interval_above_chance():
    wide = _rm((0.75, 0.56, 0.56), length_acc=0.25)  # every seed above chance and far above a poor length rule
    c = stages.claim_reward_model({"reward_model": wide})
    assert c.values["margin_over_length_only_over_seeds"]["ci95"][0] > stages.RM_MARGIN
    assert c.values["accuracy_over_seeds"]["ci95"][0] < 0.5 and c.holds is False


def test_rm_control_holds_when_length_alone_beats_the_rm():
    c = stages.claim_reward_model({"reward_model": _rm((0.60, 0.61, 0.59), length_acc=0.75)})
    assert c.control_holds is True and c.holds is False


def test_rm_one_seed_decides_as_one_run():
    quick = _rm((0.695,))
    ok = stages.claim_reward_model({"reward_model": quick})
    assert ok.holds is True and "accuracy_over_seeds" not in ok.values
    old = {k: v for k, v in quick.items() if k not in ("seeds", "per_seed")}
    assert stages.claim_reward_model({"reward_model": old}).holds is True
    assert stages.claim_reward_model({"reward_model": _rm((0.70,), length_acc=0.68)}).holds is False

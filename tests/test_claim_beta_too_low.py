"""The beta_too_low claim over seeds (full mode): the t interval of the gold fall above its bar, the proxy rising in
every seed, and a high-β control that must not show the same hump."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # pipeline_stages is a recipes/ module
import pipeline_stages as stages  # noqa: E402

SE = 0.03  # each point's own standard error of the held-out gold mean


def _run(beta, peak_gold, end_gold, proxy_at_peak, end_proxy, se=SE, steps=80):
    """A run whose smoothed gold peaks at step 30 and ends at end_gold, the proxy going proxy_at_peak → end_proxy."""
    points = [{"step": s, "gold": peak_gold, "proxy": proxy_at_peak, "gold_se": se} for s in range(0, steps + 1, 5)]
    f = {"peak_step": 30, "peak_gold": peak_gold, "final_gold": end_gold, "proxy_at_peak": proxy_at_peak,
         "final_proxy": end_proxy, "kl_at_peak": 1.0, "final_kl": 9.0, "detected_step": None}
    return {"beta": beta, "steps": steps, "findings": f, "points": points, "plots": []}


def _steady(seed):
    """High β: gold rises and stays at its peak (the smoothed series within a hair of it at the end)."""
    return _run(0.5, 0.70, 0.69, 0.60, 0.62)


def _result(low_runs, high_runs=None):
    seeds = [0, 1, 2]
    high_runs = high_runs or [_steady(s) for s in seeds]
    per_seed = [{"seed": s, **low, "high_beta": high} for s, low, high in zip(seeds, low_runs, high_runs)]
    return {"overoptimization": {**{k: v for k, v in per_seed[0].items() if k != "seed"}, "seeds": seeds,
                                 "per_seed": per_seed}}


CLEAR = [_run(0.005, 0.70, 0.40, 0.8, 1.2), _run(0.005, 0.65, 0.38, 0.7, 1.1), _run(0.005, 0.72, 0.45, 0.8, 1.0)]


def test_a_clear_fall_with_a_rising_proxy_in_every_seed_holds():
    claim = stages.claim_overoptimization(_result(CLEAR))
    assert claim.holds is True and claim.control_holds is False and claim.seeds == [0, 1, 2]
    v = claim.values
    assert set(v["per_seed"]) == {"0", "1", "2"} and v["fall_ci95"][0] > v["bar"] >= stages.HACK_MARGIN
    assert all(s["proxy_rise"] > 0 for s in v["per_seed"].values()) and v["proxy_rose_in_every_seed"]


def test_one_seed_whose_proxy_falls_does_not_hold():
    runs = [*CLEAR[:2], _run(0.005, 0.72, 0.45, 0.8, 0.6)]  # gold fell, but so did the proxy: collapse, not hacking
    claim = stages.claim_overoptimization(_result(runs))
    assert claim.holds is False and claim.control_holds is False and claim.values["proxy_rose_in_every_seed"] is False


def test_an_interval_reaching_below_the_bar_does_not_hold():
    runs = [*CLEAR[:2], _run(0.005, 0.70, 0.66, 0.8, 1.2)]  # one seed barely fell: the interval widens below the bar
    claim = stages.claim_overoptimization(_result(runs))
    assert claim.holds is False and claim.control_holds is False
    assert claim.values["fall_ci95"][0] <= claim.values["bar"] < claim.values["fall_mean"]


def test_the_bar_is_twice_the_largest_gold_noise_when_that_is_above_the_margin():
    runs = [*CLEAR[:2], _run(0.005, 0.72, 0.45, 0.8, 1.0, se=0.14)]  # one noisy seed: bar 0.28 over these falls
    claim = stages.claim_overoptimization(_result(runs))
    assert claim.values["bar"] == 2 * 0.14 and claim.holds is False and claim.control_holds is False


def test_a_fall_at_high_beta_too_means_the_claim_does_not_hold():
    claim = stages.claim_overoptimization(_result(CLEAR, [{**run, "beta": 0.5} for run in CLEAR]))
    assert claim.control_holds is True and claim.holds is False


def test_a_stored_single_run_still_decides_as_before():
    single = {"overoptimization": {**CLEAR[0], "high_beta": _steady(0)}}
    claim = stages.claim_overoptimization(single)
    assert claim.holds is True and "per_seed" not in claim.values and claim.values["fall"] >= stages.HACK_MARGIN


def test_the_report_section_reads_the_verdict_over_seeds():
    args = SimpleNamespace(output_dir="/tmp")
    held = stages.section_overoptimization(args, _result(CLEAR)["overoptimization"]).reading
    failed = stages.section_overoptimization(args, _result(CLEAR, CLEAR)["overoptimization"]).reading
    assert "beyond seed-to-seed noise." in held and "NOT shown beyond" in failed
    below_bar = [*CLEAR[:2], _run(0.005, 0.70, 0.66, 0.8, 1.2)]  # the first seed's own hump is clear
    mixed = stages.section_overoptimization(args, _result(below_bar)["overoptimization"]).reading
    assert "Seed 0:" in mixed and "Goodhart's law, measured." in mixed and "NOT shown beyond" in mixed


def test_full_mode_runs_three_seeds_each_with_its_control(monkeypatch, tmp_path):
    calls = []

    def fake_run(args, out, beta):
        calls.append((args.seed, beta))
        run = _steady(args.seed) if beta == stages.HIGH_BETA else CLEAR[args.seed - 7]
        return {**run, "beta": beta, "plots": [f"{out}/overoptimization.png"]}

    monkeypatch.setattr(stages, "_overoptimization_run", fake_run)
    args = SimpleNamespace(quick=False, seed=7, on_lab=True, gold_funcs=None)
    r = stages.stage_overoptimization(args, str(tmp_path))
    assert r["seeds"] == [7, 8, 9] and [run["seed"] for run in r["per_seed"]] == [7, 8, 9] and args.seed == 7
    assert calls == [(s, b) for s in (7, 8, 9) for b in (stages.LOW_BETA, stages.HIGH_BETA)]
    assert len(r["plots"]) == 6 and r["findings"] == CLEAR[0]["findings"] and r["high_beta"]["beta"] == stages.HIGH_BETA
    claim = stages.claim_overoptimization({"overoptimization": r})
    assert claim.holds is True and claim.seeds == [7, 8, 9] and set(claim.values["per_seed"]) == {"7", "8", "9"}
    quick = stages.stage_overoptimization(SimpleNamespace(quick=True, seed=7, on_lab=True, gold_funcs=None), "q")
    assert "per_seed" not in quick and quick["high_beta"]["beta"] == stages.HIGH_BETA


def test_the_control_sentence_names_the_highest_gold_never_a_peak_below_the_end():
    """At high β the gold peak above noise can sit below the end (seen: peak 0.67, end 0.70): the sentence gives the
    highest gold measured, which the end never exceeds."""
    high = _run(0.5, 0.67, 0.70, 0.60, 0.62)
    high["findings"]["max_gold"] = 0.71
    text = stages.section_overoptimization(SimpleNamespace(output_dir="."), _result(CLEAR, [high] * 3)[
        "overoptimization"]).reading
    assert "gold ended at 0.70 (its highest 0.71)" in text and "its peak 0.67" not in text

"""The pipeline's instrument findings (recipes/pipeline_findings.py) on synthetic inputs: each verdict and its
contrary — a forecast interval that holds the peak's KL only after the peak is not ahead, a disagreement that rises
only after the gold peak is no early warning, the estimator nearer the exact KL is the one named — and the numbers the
stages keep for them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # pipeline_* are recipes/ modules
import pipeline_findings as pf
import pipeline_stages as stages


def _points(golds, kls=None, step=10, **extra):
    kls = kls or [0.1 * i for i in range(len(golds))]
    pts = [{"step": i * step, "gold": g, "kl": k, "proxy": 0.1 * i} for i, (g, k) in enumerate(zip(golds, kls))]
    for key, values in extra.items():
        for p, v in zip(pts, values):
            p[key] = v
    return pts


HUMP = [0.0, 0.2, 0.4, 0.6, 0.5, 0.3, 0.2]  # gold peaks at step 30 (KL 0.3) and falls


def _intervals(points, first_hit_step, peak_kl):
    """Forecasts whose bounded interval holds ``peak_kl`` from ``first_hit_step`` on, and misses it before."""
    return [{"step": p["step"], "peak_kl": peak_kl * 1.2, "low": peak_kl * 0.9, "high": peak_kl * 1.5}
            if p["step"] >= first_hit_step else {"step": p["step"], "peak_kl": 5.0, "low": 4.0, "high": 6.0}
            for p in points]


# ----------------------------------------------------------------------------------------------------------------------
# 1. The gold-peak forecast
# ----------------------------------------------------------------------------------------------------------------------
def test_an_interval_holding_the_peak_kl_before_the_peak_is_ahead():
    pts = _points(HUMP)
    run = pf.forecast_run(pts, _intervals(pts, 10, 0.3))
    assert (run["peak_step"], run["first_contains_step"], run["steps_before_peak"]) == (30, 10, 20)
    assert run["ahead"] and run["peak_before_end"]
    assert run["forecasts_made"] == len(pts)
    assert run["halfway_step"] == 10  # halfway from step 0 to the peak at 30: the last measurement at or before 15
    assert run["halfway_relative_error"] == pytest.approx(0.2)


def test_an_interval_holding_the_peak_kl_only_after_the_peak_is_not_ahead():
    pts = _points(HUMP)
    run = pf.forecast_run(pts, _intervals(pts, 50, 0.3))
    assert run["first_contains_step"] == 50 and run["steps_before_peak"] == -20 and not run["ahead"]
    assert run["halfway_relative_error"] == pytest.approx((5.0 - 0.3) / 0.3)


def test_a_run_without_a_valid_forecast_says_why():
    pts = _points(HUMP)
    no_fit = [{"step": p["step"], "peak_kl": None, "low": None, "high": None, "reason": "R² = -0.5 is below 0.8"}
              for p in pts]
    found = pf.forecast_finding([pts], replay=lambda points: no_fit)
    run = found.values["runs"][0]
    assert (run["forecasts_made"], run["first_contains_step"], found.verdict) == (0, None, "forecast not ahead")
    assert "0 measurement(s) gave a forecast, the last not: R² = -0.5 is below 0.8" in found.statement


def test_an_unbounded_interval_holds_nothing():
    pts = _points(HUMP)
    forecasts = [{"step": p["step"], "peak_kl": 0.3, "low": 0.1, "high": None} for p in pts]
    run = pf.forecast_run(pts, forecasts)
    assert run["first_contains_step"] is None and not run["ahead"]


def _fake_replay(first_hit_steps):
    hits = iter(first_hit_steps)

    def replay(points):
        peak = max(points, key=lambda p: p["gold"])
        return _intervals(points, next(hits), peak["kl"])
    return replay


@pytest.mark.parametrize("hits, verdict", [
    ([10, 10, 50], "forecast ahead of the peak"),  # 2 of 3 runs ahead
    ([10, 50, 50], "forecast not ahead"),
    ([30], "forecast not ahead"),  # at the peak itself: not before it
])
def test_the_forecast_verdict_is_the_majority_of_runs(hits, verdict):
    found = pf.forecast_finding([_points(HUMP)] * len(hits), replay=_fake_replay(hits))
    assert found.verdict == verdict and found.id == "gold_peak_forecast"
    assert ("did NOT see the peak coming" in found.statement) == (verdict == "forecast not ahead")


def test_without_a_peak_before_the_end_the_forecast_is_not_decidable():
    rising = _points([0.0, 0.1, 0.2, 0.3, 0.4])
    found = pf.forecast_finding([rising, rising], replay=_fake_replay([0, 0]))
    assert found.verdict == "not decidable"


def _gao_points(noise=0.02):
    """A Gao RL-form gold gain d(1 − ln d) over KL (its peak at KL = 1), with ±``noise`` alternating: measured on this
    grid, the highest gold is at KL 0.8 (step 35), the curve falls after it."""
    kls = [0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 2.8]
    golds = [math.sqrt(k) * (1 - math.log(math.sqrt(k))) + noise * (-1) ** i for i, k in enumerate(kls)]
    return [{"step": 5 * i, "kl": k, "gold": g, "proxy": 0.0, "gold_se": 0.0}
            for i, (k, g) in enumerate(zip([0.0, *kls], [0.0, *golds]))]


def test_the_replay_feeds_the_forecast_what_the_callback_feeds_it():
    from hf_rlhf_ext.callbacks.overoptimization import forecast_gold_peak

    pts = _gao_points()
    replayed = pf.replay_forecasts(pts)
    assert [f["step"] for f in replayed] == [p["step"] for p in pts]
    direct = forecast_gold_peak([p["kl"] for p in pts], [p["gold"] - pts[0]["gold"] for p in pts],
                                seed=pf.FORECAST_SEED * 1_000_003 + len(pts), baseline_se=0.0)
    # the same inputs and seed: equal up to the last bit of a float sum, which BLAS may order differently per call
    assert (replayed[-1]["peak_kl"], replayed[-1]["low"], replayed[-1]["high"]) == pytest.approx(
        (direct["peak_kl"], direct["low"], direct["high"]), rel=1e-12)
    assert replayed[-1]["peak_kl"] == pytest.approx(1.0, rel=0.1)  # exp(2·1/1 − 2), through the noise
    assert replayed[0]["peak_kl"] is None  # too few points for a forecast at the start


def test_a_noiseless_gao_curve_is_forecast_ahead_of_its_peak():
    found = pf.forecast_finding([_gao_points()])
    run = found.values["runs"][0]
    assert (run["peak_step"], run["peak_kl"]) == (35, 0.8) and run["peak_before_end"]
    assert run["first_contains_step"] < 35 and run["steps_before_peak"] == 35 - run["first_contains_step"]
    assert found.verdict == "forecast ahead of the peak"


# ----------------------------------------------------------------------------------------------------------------------
# 2. Ensemble disagreement as an early warning
# ----------------------------------------------------------------------------------------------------------------------
def _seed(seed, stds, golds=HUMP):
    return {"seed": seed, "points": _points(golds, ensemble_std=stds)}


EARLY = [0.10, 0.12, 0.20, 0.25, 0.3, 0.3, 0.3]  # above 1.5 × 0.10 at step 20, the gold peak at 30
LATE = [0.10, 0.11, 0.12, 0.13, 0.14, 0.2, 0.3]  # above it only at step 50


def test_disagreement_rising_before_the_gold_peak_warns():
    run = pf.warning_run(_seed(0, EARLY)["points"])
    assert (run["warn_step"], run["peak_step"], run["steps_before_peak"], run["ahead"]) == (20, 30, 10, True)


def test_disagreement_rising_only_after_the_peak_is_no_early_warning():
    run = pf.warning_run(_seed(0, LATE)["points"])
    assert (run["warn_step"], run["steps_before_peak"], run["ahead"]) == (50, -20, False)


def test_the_warning_needs_more_than_the_multiple():
    run = pf.warning_run(_seed(0, [0.5, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75])["points"])  # exactly 1.5×: no warning
    assert run["warn_step"] is None and not run["ahead"]


@pytest.mark.parametrize("stds, verdict", [
    ([EARLY, EARLY, LATE], "disagreement warns before the gold peak"),
    ([EARLY, LATE, LATE], "no early warning"),
])
def test_the_warning_verdict_is_the_majority_of_seeds(stds, verdict):
    found = pf.ensemble_warning_finding([_seed(i, s) for i, s in enumerate(stds)])
    assert found.verdict == verdict and found.values["multiple"] == pf.WARN_MULTIPLE
    assert ("did NOT rise" in found.statement) == (verdict == "no early warning")


def test_without_a_gold_peak_before_the_end_the_warning_is_not_decidable():
    found = pf.ensemble_warning_finding([_seed(0, EARLY, golds=[0, 1, 2, 3, 4, 5, 6])])
    assert found.verdict == "not decidable"


# ----------------------------------------------------------------------------------------------------------------------
# 3. k1 and k3 against the exact KL
# ----------------------------------------------------------------------------------------------------------------------
def _kl_runs(k1_off, k3_off):
    pts = [{"step": 0, "k1": 9.0, "k3": 9.0, "exact": 0.0}]  # step 0 is left out (π = π_ref there)
    pts += [{"step": 5 * i, "exact": 0.5 * i, "k1": 0.5 * i + k1_off[i % 2], "k3": 0.5 * i + k3_off[i % 2]}
            for i in range(1, 7)]
    return [{"beta": 0.0, "seed": 0, "final": pts[-1], "points": pts}]


def test_the_estimator_nearer_the_exact_kl_is_named():
    k3 = pf.kl_estimator_finding(_kl_runs((0.4, -0.4), (0.05, -0.02)))
    assert k3.verdict == "k3 closer to the exact KL than k1" and k3.values["n_points"] == 6
    assert k3.values["k1"]["mean_bias"] == pytest.approx(0.0) and k3.values["k3"]["mean_bias"] == pytest.approx(0.015)
    assert k3.values["share_k3_closer"] == 1.0
    k1 = pf.kl_estimator_finding(_kl_runs((0.05, -0.02), (0.4, 0.4)))
    assert k1.verdict == "k1 closer to the exact KL than k3" and "k1 tracks" in k1.statement


def test_estimators_within_the_tie_band_are_about_as_close():
    found = pf.kl_estimator_finding(_kl_runs((0.1, -0.1), (0.1, -0.099)))
    assert found.verdict == "k1 and k3 about as close to the exact KL"


def test_without_an_exact_kl_the_estimators_are_not_decidable():
    runs = _kl_runs((0.1, 0.1), (0.1, 0.1))
    for p in runs[0]["points"]:
        p["exact"] = None  # a result line written before the exact KL was kept
    assert pf.kl_estimator_finding(runs).verdict == "not decidable"


# ----------------------------------------------------------------------------------------------------------------------
# What the stages keep, and the pipeline's findings from them
# ----------------------------------------------------------------------------------------------------------------------
def test_the_sweep_keeps_k1_k3_and_exact_of_every_measurement(tmp_path):
    from hf_rlhf_ext.experiments.sweeps import _curve_point

    history = [{"step": s, "kl_ref/k3_seq": 0.1 * s, "kl_ref/k1_seq": 0.2 * s, "kl_ref/exact_seq": 0.15 * s,
                "sweep/proxy": 1.0, "sweep/gold": 0.5} for s in (0, 5)]
    curve = [_curve_point(h) for h in history]
    assert curve[1] == {"step": 5, "kl": 0.5, "kl_k1": 1.0, "kl_exact": 0.75, "proxy": 1.0, "gold": 0.5}
    path = tmp_path / "results.jsonl"
    lines = [{"header": True}, {"beta": 0.2, "seed": 1, "curve": curve}, {"beta": 0.0, "seed": 1, "curve": curve}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    runs = pf.sweep_kl_runs(str(path))
    assert [r["beta"] for r in runs] == [0.0, 0.2]
    assert runs[0]["final"] == {"step": 5, "k1": 1.0, "k3": 0.5, "exact": 0.75, "gold": 0.5, "proxy": 1.0}


def test_the_probe_scores_the_ensemble_on_its_own_samples():
    from hf_rlhf_ext.experiments.sweeps import HeldOutProbeCallback, _curve_point

    members = [[1.0, 2.0], [3.0, 2.0]]  # per-sample std: √2 and 0
    sampler = SimpleNamespace(score=lambda funcs, batch: members[:len(funcs)], gather=lambda x: x)
    probe = SimpleNamespace(sampler=sampler, ensemble=["a", "b"])
    stats = HeldOutProbeCallback._disagreement(probe, batch=None)
    assert stats["sweep/ensemble_std"] == pytest.approx(math.sqrt(2) / 2) and stats["sweep/ensemble_seconds"] >= 0
    point = _curve_point({"step": 5, "kl_ref/k3_seq": 0.1, "kl_ref/k1_seq": 0.1, "sweep/proxy": 0.0,
                          "sweep/gold": 0.0, **stats})
    assert point["ensemble_std"] == stats["sweep/ensemble_std"] and point["kl_exact"] is None


def test_only_the_single_rm_run_watches_the_ensemble(tmp_path):
    from hf_rlhf_ext.experiments import ensembles

    argv = ["--objectives", "single", "min", "--gold_reward", "my.gold", "--output_dir", str(tmp_path)]
    ens, spec = ensembles.parse_spec(argv)
    specs = {o: ensembles.objective_spec(spec, o, ens, "/rm/single", ["/rm/a", "/rm/b"], 1) for o in ens.objectives}
    assert specs["single"].probe_ensemble == ("/rm/a", "/rm/b") and specs["min"].probe_ensemble == ()


def test_the_ensemble_stage_keeps_points_per_seed_and_the_scoring_cost():
    runs = [{"seed": s, "seconds": 10.0, "curve": [{"step": 0, "kl": 0.0, "proxy": 0.0, "gold": 0.0, "kl_k1": 0.0,
                                                    "ensemble_std": 0.1, "ensemble_seconds": 0.5}]} for s in (0, 1)]
    kept = pf.ensemble_seed_points(runs)
    assert [s["seed"] for s in kept["per_seed"]] == [0, 1]
    assert kept["per_seed"][0]["points"] == [{"step": 0, "kl": 0.0, "proxy": 0.0, "gold": 0.0, "ensemble_std": 0.1}]
    assert kept["ensemble_scoring_seconds"] == {"per_measurement": 0.5, "total": 1.0, "measurements": 2,
                                                "run_seconds": 20.0}


def test_the_pipeline_reports_the_three_findings_from_stage_results():
    results = {"overoptimization": {"points": _gao_points()},
               "ensembles": {"objectives": {}, "settings": {"beta": 0.005},
                             "single_points": {"per_seed": [_seed(0, LATE)]}},
               "beta_sweep": {"gao_fit": {}, "kl_estimators": _kl_runs((0.4, -0.4), (0.05, -0.02))}}
    found = {f.id: f.verdict for f in stages.findings(results)}
    assert found["gold_peak_forecast"] == "forecast ahead of the peak"
    assert found["ensemble_early_warning"] == "no early warning"
    assert found["kl_estimators"] == "k3 closer to the exact KL than k1"
    older = {"beta_sweep": {"gao_fit": {}}, "ensembles": {"objectives": {}, "settings": {"beta": 0.005}}}
    assert not {"gold_peak_forecast", "ensemble_early_warning", "kl_estimators"} & {
        f.id for f in stages.findings(older)}  # results from before these were kept: no finding, no error


def test_the_forecast_finding_reads_every_seeds_low_beta_run_of_a_full_result():
    """Full mode keeps each seed's run under per_seed (the first also at the top): the finding counts them all."""
    flat = _points([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # never turns down: not a run that peaks before its end
    full = {"points": flat, "per_seed": [{"seed": s, "points": p} for s, p in
                                         ((0, flat), (1, _gao_points()), (2, _gao_points()))]}
    found = {f.id: f for f in stages.findings({"overoptimization": full})}["gold_peak_forecast"]
    assert found.verdict == "forecast ahead of the peak"  # 2 of the 3 seeds; the top-level run alone is undecidable
    assert stages.findings({"overoptimization": {"points": flat}})[0].verdict != found.verdict


def _sweep_run(beta, seed, points):
    return {"beta": beta, "seed": seed, "final": points[-1],
            "points": [{"step": p["step"], "k1": p["kl"], "k3": p["kl"], "exact": p["kl"], "gold": p["gold"],
                        "proxy": p["proxy"]} for p in points]}


def test_the_forecast_is_measured_on_the_sweeps_lowest_beta_runs_of_every_seed():
    """The β sweep measures KL at every β, the β = 0 over-optimisation runs (no reference model) do not: the forecast
    reads the sweep's lowest β, one run per seed, and leaves the higher β out."""
    flat = _points([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], kls=[0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    sweep = [_sweep_run(0.0, 0, _gao_points()), _sweep_run(0.0, 1, _gao_points()), _sweep_run(1.0, 0, flat)]
    lists = pf.forecast_point_lists(sweep)
    assert len(lists) == 2 and [p["kl"] for p in lists[0]] == [p["kl"] for p in _gao_points()]
    no_kl = {"points": [{**p, "kl": None} for p in _gao_points()]}
    found = {f.id: f for f in stages.findings({"beta_sweep": {"gao_fit": {}, "kl_estimators": sweep},
                                               "overoptimization": no_kl})}["gold_peak_forecast"]
    assert found.verdict == "forecast ahead of the peak" and len(found.values["runs"]) == 2
    alone = stages.findings({"overoptimization": no_kl})[0]
    assert alone.verdict == "not decidable" and "no run measured a KL" in alone.statement


# ----------------------------------------------------------------------------------------------------------------------
# 4. Best-of-N's KL: analytic against Beirami et al.'s estimate
# ----------------------------------------------------------------------------------------------------------------------
def _bon_points(beirami_share: float) -> list[dict]:
    """A curve whose Beirami estimate is ``beirami_share`` × the analytic KL at every n."""
    from hf_rlhf_ext.objectives import best_of_n_kl

    return [{"n": n, "kl": best_of_n_kl(n), "kl_beirami": beirami_share * best_of_n_kl(n), "kl_pool": best_of_n_kl(n),
             "win_rate": n / (n + 1) - 0.01 * (n > 1), "win_rate_bound": n / (n + 1), "proxy": 0.0}
            for n in (1, 2, 4, 16)]


def test_an_analytic_kl_well_above_the_beirami_estimate_overstates():
    found = pf.bon_kl_finding(_bon_points(0.5))
    assert found.verdict == "the analytic KL overstates best-of-N's KL"
    top = found.values["at_largest_n"]
    assert top["n"] == 16 and found.values["overstatement"] == pytest.approx(0.5 * top["kl"])
    assert "N = 16" in found.statement and "50%" in found.statement


def test_an_analytic_kl_within_the_gap_is_close():
    assert pf.bon_kl_finding(_bon_points(1 - pf.BON_KL_GAP / 2)).verdict == (
        "the analytic KL is close to Beirami et al.'s estimate")
    no_estimate = [{k: v for k, v in p.items() if k != "kl_beirami"} for p in _bon_points(0.5)]
    assert pf.bon_kl_finding(no_estimate).verdict == "not decidable"  # a curve stored before the estimate was kept


def test_the_pipeline_reads_the_best_of_n_kl_off_the_stored_curve():
    found = {f.id: f for f in stages.findings({"best_of_n": {"curve": {"points": _bon_points(0.5), "fit": None}}})}
    assert found["bon_kl"].verdict == "the analytic KL overstates best-of-N's KL"


# ----------------------------------------------------------------------------------------------------------------------
# 5. Coste et al.'s conservative objectives against the single RM, replayed from a stored full run
# ----------------------------------------------------------------------------------------------------------------------
ENSEMBLES_FULL = Path(__file__).resolve().parent / "data" / "pipeline_ensembles_full.json"


def _swap(objectives: dict, a: str, b: str) -> dict:
    """The same result with the per-seed gold falls of objectives ``a`` and ``b`` exchanged."""
    out = json.loads(json.dumps(objectives))
    out[a]["fall_per_seed"], out[b]["fall_per_seed"] = out[b]["fall_per_seed"], out[a]["fall_per_seed"]
    return out


def test_the_ensemble_verdict_replays_the_stored_full_run_and_flips_with_its_numbers():
    stored = json.loads(ENSEMBLES_FULL.read_text())
    found = {f.id: f for f in stages.findings({"ensembles": stored})}["rm_ensembles"]
    rows = found.values["objectives"]
    assert set(rows) == {"mean", "min", "uwo"} and all(len(r["seeds"]) == 3 for r in rows.values())
    for name, row in rows.items():  # the status is the paired interval's side of 0
        lo, hi = row["ci95"]
        assert row["status"] == ("reduces" if hi < 0 else "increases" if lo > 0 else "within the seed noise")
    assert found.verdict == pf.ensemble_objectives_finding(stored["objectives"]).verdict
    # every seed of every ensemble falling far below the single RM: all reduce; far above: none does
    low = json.loads(json.dumps(stored["objectives"]))
    high = json.loads(json.dumps(stored["objectives"]))
    for name in ("mean", "min", "uwo"):
        low[name]["fall_per_seed"] = {s: f - 1.0 - 0.01 * i for i, (s, f) in
                                      enumerate(stored["objectives"]["single"]["fall_per_seed"].items())}
        high[name]["fall_per_seed"] = {s: f + 1.0 + 0.01 * i for i, (s, f) in
                                       enumerate(stored["objectives"]["single"]["fall_per_seed"].items())}
    assert pf.ensemble_objectives_finding(low).verdict == "the conservative objectives reduce the gold fall"
    assert pf.ensemble_objectives_finding(high).verdict == (
        "no conservative objective reduces the gold fall beyond the seed noise")
    assert {r["status"] for r in pf.ensemble_objectives_finding(high).values["objectives"].values()} == {"increases"}


def test_the_ensemble_verdict_names_only_the_objectives_whose_interval_clears():
    single = {"0": 0.30, "1": 0.20, "2": 0.25}
    objectives = {"single": {"fall_per_seed": single},
                  "min": {"fall_per_seed": {"0": 0.10, "1": 0.01, "2": 0.06}},  # 0.20, 0.19, 0.19 lower: clears 0
                  "uwo": {"fall_per_seed": {"0": 0.35, "1": 0.10, "2": 0.25}}}  # +0.05, −0.10, 0: straddles 0
    found = pf.ensemble_objectives_finding(objectives, 0.005)
    assert found.verdict == "only min reduce(s) the gold fall"
    assert found.values["objectives"]["min"]["status"] == "reduces"
    assert found.values["objectives"]["uwo"]["status"] == "within the seed noise"
    swapped = pf.ensemble_objectives_finding(_swap(objectives, "single", "min"))  # the single RM now falls least
    assert swapped.verdict == "no conservative objective reduces the gold fall beyond the seed noise"
    assert swapped.values["objectives"]["min"]["status"] == "increases"
    one_seed = {o: {"fall_per_seed": {"0": v["fall_per_seed"]["0"]}} for o, v in objectives.items()}
    assert pf.ensemble_objectives_finding(one_seed).verdict == "not decidable (one seed)"
    assert pf.ensemble_objectives_finding({"single": {"fall": {"mean": 0.2}}}).verdict == "not decidable"


def test_the_ensemble_stage_keeps_each_seeds_gold_fall():
    from hf_rlhf_ext.experiments.ensembles import summarise

    def run(seed, golds):
        return {"seed": seed, "curve": [{"step": 10 * i, "gold": g, "kl": 0.1 * i, "proxy": 0.1 * i}
                                        for i, g in enumerate(golds)]}

    metrics = summarise({"single": [run(0, [0.1, 0.5, 0.2]), run(1, [0.1, 0.4, 0.35])],
                         "min": [run(0, [0.1, 0.3, 0.3]), run(1, [0.1, 0.6, 0.4])]}, {"beta": 0.005})
    kept = stages.ensemble_objectives(metrics)
    assert kept["single"]["fall_per_seed"] == pytest.approx({"0": 0.3, "1": 0.05})
    assert kept["min"]["fall_per_seed"] == pytest.approx({"0": 0.0, "1": 0.2})
    assert kept["single"]["fall"]["mean"] == pytest.approx(0.175)

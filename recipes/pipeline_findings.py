"""Findings of the chapter pipeline read off its instruments, each with a verdict chosen by the numbers: the gold-peak
forecast replayed on a run's held-out points, the ensemble's disagreement as an early warning of the gold peak, the
KL estimators k1 and k3 against the exact KL of the same samples, best-of-N's analytic KL against Beirami et al.'s
estimate, and whether Coste et al.'s conservative ensemble objectives reduce the gold fall. Each function reads stored
stage results only.
"""

import math
from typing import Any

from hf_rlhf_ext.experiments.report import Finding

WARN_MULTIPLE = 1.5  # the ensemble's disagreement "warns" once it exceeds this multiple of its first value
CLOSE_TIE = 0.10  # k1 and k3 count as equally close when their RMS errors differ by less than this share
BON_KL_GAP = 0.10  # the analytic best-of-N KL "overstates" when it exceeds Beirami et al.'s estimate by this share
FORECAST_SEED = 1234  # OveroptimizationCallback's default seed: the replay draws the bootstrap the live run drew


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def observed_peak(points: list[dict], needs_kl: bool = True) -> dict | None:
    """The measurement with the highest raw gold (the first of equal ones; with ``needs_kl`` among those whose KL
    is known) and whether it came before the run's last measurement. None when no gold was measured."""
    measured = [p for p in points if _finite(p.get("gold")) and (_finite(p.get("kl")) or not needs_kl)]
    if not measured:
        return None
    peak = max(measured, key=lambda p: p["gold"])
    last = points[-1]["step"]
    return {"step": peak["step"], "kl": peak.get("kl"), "gold": peak["gold"], "last_step": last,
            "fall_to_end": peak["gold"] - measured[-1]["gold"], "before_end": peak["step"] < last}


def _majority(runs: list[dict], yes: str, no: str) -> str:
    """``yes`` when a majority of all runs given were ahead of their peak; "not decidable" when no run has a peak
    before its end."""
    if not any(r["peak_before_end"] for r in runs):
        return "not decidable"
    return yes if sum(bool(r["ahead"]) for r in runs) > len(runs) / 2 else no


# ----------------------------------------------------------------------------------------------------------------------
# 1. Forecasting the gold peak, replayed
# ----------------------------------------------------------------------------------------------------------------------
def replay_forecasts(points: list[dict], seed: int = FORECAST_SEED) -> list[dict]:
    """The forecast of the gold peak's KL at every measurement, as ``OveroptimizationCallback(forecast=True)`` makes
    it live: the same callback fed the run's points one by one (raw gold as a gain over the first gold, the points with
    a KL, its seeded bootstrap interval)."""
    from hf_rlhf_ext.callbacks import OveroptimizationCallback

    monitor = OveroptimizationCallback(proxy="proxy", gold="gold", forecast=True, save_peak=False, plot=False,
                                       seed=seed)
    for p in points:
        monitor.update(p["step"], p.get("proxy"), p.get("gold"), p.get("kl"), gold_se=p.get("gold_se"))
    return [{"step": q["step"], "peak_kl": q["forecast_peak_kl"], "low": q["forecast_peak_kl_low"],
             "high": q["forecast_peak_kl_high"], "reason": q["forecast_reason"]} for q in monitor.points]


def _contains(forecast: dict, kl: float) -> bool:
    """A bounded interval [low, high] holding ``kl`` (an unbounded one says nothing about where the peak is)."""
    low, high = forecast.get("low"), forecast.get("high")
    return _finite(low) and _finite(high) and low <= kl <= high


def runs_have_kl(runs: list[dict]) -> bool:
    return any(r.get("has_kl") for r in runs)


def forecast_point_lists(sweep_runs: list[dict]) -> list[list[dict]]:
    """The held-out points (step, KL (k3), proxy, gold) of the β sweep's lowest-β runs, one list per seed: the runs
    a forecast is for, and they measure KL at every β (the over-optimisation stage's β = 0 runs have no reference
    model, hence no KL, to fit against)."""
    if not sweep_runs:
        return []
    low = min(r["beta"] for r in sweep_runs)
    return [[{"step": p["step"], "kl": p["k3"], "proxy": p.get("proxy"), "gold": p.get("gold")} for p in r["points"]]
            for r in sweep_runs if r["beta"] == low and any(p.get("gold") is not None for p in r["points"])]


def forecast_run(points: list[dict], forecasts: list[dict]) -> dict:
    """One run: its observed gold peak (step, KL), the first measurement whose forecast interval held that KL, how
    many steps before the peak it was (negative: after), and the relative error of the forecast made at the
    measurement halfway (in steps) to the peak."""
    peak = observed_peak(points)
    if peak is None:
        return {"peak_step": None, "peak_before_end": False, "ahead": False,
                "has_kl": any(_finite(p.get("kl")) for p in points)}
    hit = next((f for f in forecasts if _contains(f, peak["kl"])), None)
    first_step = points[0]["step"]
    halfway = [f for f in forecasts if f["step"] <= first_step + (peak["step"] - first_step) / 2]
    at_half = halfway[-1] if halfway else None
    half_kl = at_half["peak_kl"] if at_half else None
    error = abs(half_kl - peak["kl"]) / peak["kl"] if _finite(half_kl) and peak["kl"] > 0 else None
    made = [f for f in forecasts if _finite(f.get("peak_kl"))]
    return {"forecasts_made": len(made), "last_reason": forecasts[-1].get("reason") if forecasts else None,
            "peak_step": peak["step"], "peak_kl": peak["kl"], "peak_gold": peak["gold"], "last_step": peak["last_step"],
            "peak_before_end": peak["before_end"], "first_contains_step": hit["step"] if hit else None,
            "interval_then": [hit["low"], hit["high"]] if hit else None,
            "steps_before_peak": peak["step"] - hit["step"] if hit else None,
            "halfway_step": at_half["step"] if at_half else None, "halfway_forecast_kl": half_kl,
            "halfway_relative_error": error,
            "ahead": bool(peak["before_end"] and hit is not None and hit["step"] < peak["step"]), "has_kl": True}


def forecast_finding(point_lists: list[list[dict]], replay=replay_forecasts) -> Finding:
    """The forecast replayed on each run's held-out points (one list per seed); the verdict by majority of runs."""
    runs = [forecast_run(points, replay(points)) for points in point_lists]
    verdict = _majority(runs, "forecast ahead of the peak", "forecast not ahead")
    return Finding("gold_peak_forecast", _forecast_reading(runs, verdict), {"runs": runs}, verdict)


def _forecast_reading(runs: list[dict], verdict: str) -> str:
    head = ("Gold-peak forecast (Gao RL form fitted to the gold gain against KL at every measurement, 5–95% bootstrap "
            f"interval of the peak KL), replayed on {len(runs)} low-β run(s): ")
    if verdict == "not decidable" and not runs_have_kl(runs):
        return head + "no run measured a KL to fit against, so no forecast could be made"
    if verdict == "not decidable":
        return head + "no run's gold peaked before its last measurement, so no forecast could be early"
    lead = [f"step {r['first_contains_step']} for a peak at step {r['peak_step']} (KL {r['peak_kl']:.2f})"
            if r["first_contains_step"] is not None else f"no step, for a peak at step {r['peak_step']} (KL "
            f"{r['peak_kl']:.2f}; {r['forecasts_made']} measurement(s) gave a forecast"
            + (f", the last not: {r['last_reason']})" if r["last_reason"] else ")")
            for r in runs if r["peak_step"] is not None]
    reading = (f"the interval first held the observed peak's KL at {'; '.join(lead)}. ")
    if verdict == "forecast ahead of the peak":
        return head + reading + "In most runs it saw the peak coming before gold turned down"
    return head + reading + "It did NOT see the peak coming before gold turned down in most runs"


# ----------------------------------------------------------------------------------------------------------------------
# 2. The ensemble's disagreement as an early warning
# ----------------------------------------------------------------------------------------------------------------------
def warning_run(points: list[dict], multiple: float = WARN_MULTIPLE) -> dict:
    """One run: the first measurement where the ensemble's std exceeds ``multiple`` × its first value, against the
    step of the gold peak (highest raw gold): how many steps before the peak it came."""
    peak = observed_peak(points, needs_kl=False)
    stds = [p for p in points if _finite(p.get("ensemble_std"))]
    first = stds[0]["ensemble_std"] if stds else None
    warn = next((p for p in stds if p["ensemble_std"] > multiple * first), None) if stds else None
    before_end = bool(peak and peak["before_end"])
    return {"peak_step": peak["step"] if peak else None, "last_step": points[-1]["step"] if points else None,
            "peak_before_end": before_end, "first_std": first, "warn_step": warn["step"] if warn else None,
            "warn_std": warn["ensemble_std"] if warn else None,
            "steps_before_peak": peak["step"] - warn["step"] if warn and peak else None,
            "ahead": bool(before_end and warn is not None and warn["step"] < peak["step"])}


def ensemble_warning_finding(seed_points: list[dict], multiple: float = WARN_MULTIPLE) -> Finding:
    """``seed_points``: [{"seed", "points"}] of the single-RM runs; the verdict by majority of seeds."""
    runs = [{"seed": s["seed"], **warning_run(s["points"], multiple)} for s in seed_points]
    verdict = _majority(runs, "disagreement warns before the gold peak", "no early warning")
    return Finding("ensemble_early_warning", _warning_reading(runs, verdict, multiple), {"multiple": multiple,
                                                                                         "runs": runs}, verdict)


def _warning_reading(runs: list[dict], verdict: str, multiple: float) -> str:
    head = (f"Ensemble disagreement (std of the members' scores on the held-out samples) while the single RM is "
            f"optimised, {len(runs)} seed(s); a warning is the first std above {multiple:g}× its first value: ")
    if verdict == "not decidable":
        return head + "no seed's gold peaked before its last measurement, so no warning could be early"
    cases = [f"seed {r['seed']}: warning at step {r['warn_step']}, gold peak at {r['peak_step']}"
             if r["warn_step"] is not None else f"seed {r['seed']}: no warning, gold peak at {r['peak_step']}"
             for r in runs]
    if verdict == "disagreement warns before the gold peak":
        return head + "; ".join(cases) + ". The disagreement rose before gold turned down in most seeds"
    return head + "; ".join(cases) + ". It did NOT rise before gold turned down in most seeds"


# ----------------------------------------------------------------------------------------------------------------------
# 3. k1 and k3 against the exact KL
# ----------------------------------------------------------------------------------------------------------------------
def _errors(diffs: list[float]) -> dict:
    m = _mean(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
    return {"mean_bias": m, "sd": sd, "rmse": math.sqrt(_mean([d * d for d in diffs]))}


def kl_estimator_finding(runs: list[dict]) -> Finding:
    """``runs``: [{"beta", "seed", "points": [{"step", "k1", "k3", "exact"}]}] of the β sweep. Over every measurement
    after step 0 (where π = π_ref and all three are 0): each estimator's mean bias (k − exact), the sd of k − exact
    and their root mean square; the closer estimator is the one with the smaller RMS error, unless the two differ
    by less than CLOSE_TIE of the larger."""
    pts = [p for r in runs for p in r["points"]
           if p["step"] > 0 and all(_finite(p.get(k)) for k in ("k1", "k3", "exact"))]
    if not pts:
        return Finding("kl_estimators", "k1 and k3 against the exact KL: no measurement with all three",
                       {"n_points": 0}, "not decidable")
    err = {k: _errors([p[k] - p["exact"] for p in pts]) for k in ("k1", "k3")}
    r1, r3 = err["k1"]["rmse"], err["k3"]["rmse"]
    verdict = ("k1 and k3 about as close to the exact KL" if abs(r1 - r3) < CLOSE_TIE * max(r1, r3) else
               "k3 closer to the exact KL than k1" if r3 < r1 else "k1 closer to the exact KL than k3")
    values = {"n_points": len(pts), "mean_exact": _mean([p["exact"] for p in pts]), **err,
              "share_k3_closer": _mean([abs(p["k3"] - p["exact"]) < abs(p["k1"] - p["exact"]) for p in pts])}
    return Finding("kl_estimators", _kl_reading(values, verdict), values, verdict)


def _kl_reading(v: dict, verdict: str) -> str:
    head = (f"Sequence KL estimators against the exact KL (summed over the vocabulary at each sampled position, same "
            f"samples) over {v['n_points']} β-sweep measurements (mean exact {v['mean_exact']:.3f} nats): k1 − exact "
            f"{v['k1']['mean_bias']:+.3f} ± {v['k1']['sd']:.3f}, k3 − exact {v['k3']['mean_bias']:+.3f} ± "
            f"{v['k3']['sd']:.3f} (mean ± sd). ")
    if verdict.startswith("k3 closer"):
        return head + f"k3 tracks the exact KL more closely (RMS error {v['k3']['rmse']:.3f} vs {v['k1']['rmse']:.3f})"
    if verdict.startswith("k1 closer"):
        return head + f"k1 tracks the exact KL more closely (RMS error {v['k1']['rmse']:.3f} vs {v['k3']['rmse']:.3f})"
    return head + f"Neither tracks it clearly better (RMS errors {v['k1']['rmse']:.3f} and {v['k3']['rmse']:.3f})"


# ----------------------------------------------------------------------------------------------------------------------
# 4. Best-of-N's KL: the analytic bound against Beirami et al.'s estimate, and the win rate against n/(n + 1)
# ----------------------------------------------------------------------------------------------------------------------
def bon_kl_finding(points: list[dict], gap: float = BON_KL_GAP) -> Finding:
    """``points``: best-of-N's curve (``kl``, ``kl_beirami``, ``kl_pool``, ``win_rate``, ``win_rate_bound`` per n).
    Read at the largest n (where the two KLs part most): the analytic ln n − (n − 1)/n overstates the KL when it
    exceeds the Beirami estimate by more than ``gap`` of itself."""
    pts = [p for p in points if p["n"] > 1 and _finite(p.get("kl_beirami"))]
    if not pts:
        return Finding("bon_kl", "Best-of-N's KL: no curve point with Beirami et al.'s estimate", {"n_points": 0},
                       "not decidable")
    top = max(pts, key=lambda p: p["n"])
    over = top["kl"] - top["kl_beirami"]
    verdict = "the analytic KL overstates best-of-N's KL" if over > gap * top["kl"] else \
        "the analytic KL is close to Beirami et al.'s estimate"
    keep = ("n", "kl", "kl_beirami", "kl_pool", "win_rate", "win_rate_bound")
    values = {"at_largest_n": {k: top.get(k) for k in keep}, "overstatement": over,
              "per_n": [{k: p.get(k) for k in keep} for p in pts], "gap": gap}
    text = (f"Best-of-N's KL at N = {top['n']} (one pool, the selecting reward): analytic ln N − (N − 1)/N = "
            f"{top['kl']:.3f} nats, Beirami et al.'s estimate from the base probabilities of the chosen outputs "
            f"{top['kl_beirami']:.3f}, the pool's tie-aware value {top['kl_pool']:.3f}; win rate over a base sample "
            f"{top['win_rate']:.3f} against the bound N/(N + 1) = {top['win_rate_bound']:.3f}. ")
    if verdict.startswith("the analytic KL overstates"):
        text += f"The analytic value overstates the KL by {over:.3f} nats ({over / top['kl']:.0%})"
    else:
        text += f"The two differ by {over:.3f} nats, under {gap:.0%} of the analytic value"
    return Finding("bon_kl", text, values, verdict)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Conservative ensemble objectives (Coste et al. 2023) against the single RM
# ----------------------------------------------------------------------------------------------------------------------
def _paired(single: dict, other: dict) -> dict:
    """The objective's gold fall − the single RM's, per shared seed: mean and 95% t interval (None with one seed)."""
    from hf_rlhf_ext.experiments.early_stopping import t_interval

    seeds = [s for s in other if s in single]
    diffs = [other[s] - single[s] for s in seeds]
    m = _mean(diffs) if diffs else None
    ci = t_interval(diffs)
    status = ("one seed" if ci is None else "reduces" if ci[1] < 0 else "increases" if ci[0] > 0 else
              "within the seed noise")
    return {"seeds": seeds, "difference": m, "ci95": ci, "status": status}


def ensemble_objectives_finding(objectives: dict, beta: float | None = None) -> Finding:
    """``objectives``: the ensembles stage's per objective ``fall`` (mean) and ``fall_per_seed`` ({seed: fall}).
    Each conservative objective against the single RM on the same seeds: it reduces the fall when the 95% t interval
    of the paired difference lies below 0. Undecided with one seed or without per-seed falls."""
    single = (objectives.get("single") or {}).get("fall_per_seed")
    others = {o: v.get("fall_per_seed") for o, v in objectives.items() if o != "single"}
    if not single or not others or not all(others.values()):
        return Finding("rm_ensembles", "Conservative ensemble objectives against the single RM: no per-seed gold "
                       "falls of the single RM and an ensemble", {"objectives": sorted(objectives)}, "not decidable")
    rows = {o: {"fall": _mean(list(f.values())), **_paired(single, f)} for o, f in others.items()}
    reducing = [o for o, r in rows.items() if r["status"] == "reduces"]
    if all(r["ci95"] is None for r in rows.values()):
        verdict = "not decidable (one seed)"
    elif len(reducing) == len(rows):
        verdict = "the conservative objectives reduce the gold fall"
    elif reducing:
        verdict = f"only {', '.join(reducing)} reduce(s) the gold fall"
    else:
        verdict = "no conservative objective reduces the gold fall beyond the seed noise"
    values = {"single_fall": _mean(list(single.values())), "objectives": rows}
    return Finding("rm_ensembles", _ensemble_reading(values, beta), values, verdict)


def _ensemble_reading(v: dict, beta: float | None) -> str:
    at = f" at β = {beta}" if beta is not None else ""
    parts = []
    for o, r in v["objectives"].items():
        ci = f", 95% interval [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else ""
        parts.append(f"{o} {r['fall']:.3f} ({o} − single {r['difference']:+.3f}{ci}: {r['status']})")
    n = max(len(r["seeds"]) for r in v["objectives"].values())
    return (f"Gold fall from its peak{at}, mean over {n} seed(s): single RM {v['single_fall']:.3f}; " + "; ".join(parts)
            + ". Differences are paired by seed; the intervals are 95% Student t over seeds.")


# ----------------------------------------------------------------------------------------------------------------------
# What the stages keep for these findings
# ----------------------------------------------------------------------------------------------------------------------
def sweep_kl_runs(results_path: str) -> list[dict]:
    """Per β and seed of a β sweep's ``results.jsonl``: every measurement's k1, k3 and exact KL, and the final one
    (none without the file: a sweep that kept no result lines)."""
    import json
    import os

    runs = []
    if not os.path.isfile(results_path):
        return runs
    with open(results_path) as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            if rec and not rec.get("header"):
                pts = [{"step": p["step"], "k1": p.get("kl_k1"), "k3": p["kl"], "exact": p.get("kl_exact"),
                        "gold": p.get("gold"), "proxy": p.get("proxy")} for p in rec["curve"]]
                runs.append({"beta": float(rec["beta"]), "seed": rec["seed"], "final": pts[-1], "points": pts})
    return sorted(runs, key=lambda r: (r["beta"], r["seed"]))


def ensemble_seed_points(runs: list[dict]) -> dict:
    """The single-RM runs' held-out points per seed (step, KL, proxy, gold, the members' std) and what measuring the
    std cost: seconds of member scoring per measurement, over all runs."""
    keep = ("step", "kl", "proxy", "gold", "ensemble_std")
    seconds = [p["ensemble_seconds"] for r in runs for p in r["curve"] if _finite(p.get("ensemble_seconds"))]
    return {"per_seed": [{"seed": r["seed"], "points": [{k: p.get(k) for k in keep} for p in r["curve"]]}
                         for r in runs],
            "ensemble_scoring_seconds": {"per_measurement": _mean(seconds) if seconds else None,
                                         "total": sum(seconds), "measurements": len(seconds),
                                         "run_seconds": sum(r.get("seconds") or 0.0 for r in runs)}}

"""Does the KL penalty beat early stopping? Read off a β sweep's held-out curves.

Gao, Schulman & Hilton (2022, arXiv 2210.10760) found that the KL penalty does not move the gold-vs-KL frontier: it
acts like early stopping. The test here: a run with a higher β ends at some KL; a run with a lower β passes that KL on
its way further out, and stopping it there ("early stopping") gives the gold it had at that KL. If the penalty does
more than stop early, the high-β run's final gold is higher than the low-β run's gold at the same KL.

Pairs are formed within a seed (every β_low < β_high that both have the seed). The pairs of one seed are not
independent — a low-β run is compared against every higher β, and all points share the held-out prompts and sampling
seed — so the seed is the replicate: the differences are averaged per seed, and the 95% interval is Student's t over
those per-seed means. A bootstrap over three or so seeds would give a far too narrow interval.

Pure functions of the sweep's result rows (``results.jsonl``); no files, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

__all__ = ["MIN_SEEDS", "VERDICTS", "gold_at_kl", "matched_pairs", "penalty_vs_early_stopping", "t_interval",
           "t_quantile_975"]

#: seeds with at least one matched pair needed for a verdict: with two, the t interval (t = 12.7) says nothing
MIN_SEEDS = 3

VERDICTS = {"above": "the penalty beats early stopping", "contains": "early stopping matches the penalty",
            "below": "early stopping beats the penalty"}

# Student's t, 97.5% quantile, df = 1..30 (beyond: the Cornish–Fisher expansion, within 0.001).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student t quantile (no scipy dependency for one number)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def gold_at_kl(curve: Sequence[dict[str, Any]], kl: float) -> dict[str, float] | None:
    """Gold (and step) where ``curve`` first reaches ``kl``, linear in KL between two consecutive measurements.

    The *first* crossing, because early stopping stops the first time the run gets there (KL along a run need not be
    monotonic). None when no pair of consecutive measurements brackets ``kl``: outside the measured KL range there is
    nothing to stop at, and extrapolating would invent a gold.
    """
    pts = [p for p in curve if p.get("kl") is not None and p.get("gold") is not None]
    for a, b in pairwise(pts):
        lo, hi = sorted((a["kl"], b["kl"]))
        if not lo <= kl <= hi:
            continue
        w = 0.0 if hi == lo else (kl - a["kl"]) / (b["kl"] - a["kl"])
        return {"gold": a["gold"] + w * (b["gold"] - a["gold"]), "step": a["step"] + w * (b["step"] - a["step"])}
    return None


def _pair(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """One comparison: the high-β run's final gold against the low-β run stopped at the high-β run's final KL."""
    last = high["curve"][-1]
    row = {"seed": high["seed"], "beta_low": float(low["beta"]), "beta_high": float(high["beta"]), "kl": last["kl"],
           "gold_penalty": last["gold"]}
    stop = gold_at_kl(low["curve"], last["kl"]) if last["kl"] is not None and last["gold"] is not None else None
    if stop is None:
        return row | {"matched": False}
    return row | {"matched": True, "gold_early_stop": stop["gold"], "stop_step": stop["step"],
                  "difference": last["gold"] - stop["gold"]}


def matched_pairs(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (β_low < β_high) pair of runs with the same trainer and seed, matched or not (``matched``)."""
    runs = sorted(results, key=lambda r: (r["trainer"], r["seed"], float(r["beta"])))
    return [_pair(low, high) for i, low in enumerate(runs) for high in runs[i + 1:]
            if (low["trainer"], low["seed"]) == (high["trainer"], high["seed"])
            and float(low["beta"]) < float(high["beta"])]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def t_interval(values: Sequence[float]) -> list[float] | None:
    """The 95% Student t interval of the mean, mean ± t(0.975, n − 1) · sd / √n (sd with n − 1); None with fewer
    than 2 values."""
    n = len(values)
    if n < 2:
        return None
    m = _mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return [m - half, m + half]


def _verdict(interval: list[float] | None, n_seeds: int) -> str:
    if interval is None:
        return f"not decidable: matched pairs in {n_seeds} seed(s), at least {MIN_SEEDS} needed"
    if interval[0] > 0:
        return VERDICTS["above"]
    return VERDICTS["below"] if interval[1] < 0 else VERDICTS["contains"]


def _per_beta_pair(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean difference per (β_low, β_high) over its seeds: where along the grid the gap lies (descriptive)."""
    keys = sorted({(p["beta_low"], p["beta_high"]) for p in pairs})
    rows = []
    for lo, hi in keys:
        diffs = [p["difference"] for p in pairs if (p["beta_low"], p["beta_high"]) == (lo, hi)]
        rows.append({"beta_low": lo, "beta_high": hi, "n": len(diffs), "mean_difference": _mean(diffs)})
    return rows


def penalty_vs_early_stopping(results: Sequence[dict[str, Any]], min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """High-β final gold − low-β gold at the same KL, over all within-seed β pairs, with a verdict.

    ``mean_difference`` and ``ci95`` are over the per-seed means (the seed is the independent replicate); the verdict is
    "the penalty beats early stopping" when the interval is above 0, "early stopping beats the penalty" when below,
    "early stopping matches the penalty" when it contains 0, and "not decidable" with fewer than ``min_seeds`` seeds
    that have a matched pair.
    """
    if min_seeds < 2:
        raise ValueError(f"min_seeds must be >= 2 (an interval needs two replicates), got {min_seeds}.")
    everything = matched_pairs(results)
    pairs = [p for p in everything if p["matched"]]
    seeds = sorted({p["seed"] for p in pairs})
    per_seed = [{"seed": s, "n_pairs": len(d), "mean_difference": _mean(d)}
                for s in seeds for d in [[p["difference"] for p in pairs if p["seed"] == s]]]
    means = [row["mean_difference"] for row in per_seed]
    interval = t_interval(means) if len(seeds) >= min_seeds else None
    return {"n_pairs": len(pairs), "n_unmatched": len(everything) - len(pairs), "n_seeds": len(seeds),
            "min_seeds": min_seeds, "mean_difference": _mean(means) if means else None, "ci95": interval,
            "interval": "Student t over per-seed means", "verdict": _verdict(interval, len(seeds)),
            "per_seed": per_seed, "per_beta_pair": _per_beta_pair(pairs), "pairs": pairs}

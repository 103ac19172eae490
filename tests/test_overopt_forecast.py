"""OveroptimizationCallback's two early warnings: the forecast of the gold peak's KL (Gao et al.'s RL form fitted to
the points so far, with a bootstrap interval) and the disagreement of a reward-model ensemble on the held-out samples.
Series are generated from the exact Gao form R(d) = d(α − β ln d), d = sqrt(KL), whose peak the tests locate by a
grid search, not by the formula under test."""

from __future__ import annotations

import contextlib
import math
import random
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from hf_rlhf_ext.callbacks import OveroptimizationCallback
from hf_rlhf_ext.callbacks.overoptimization import ensemble_std, forecast_gold_peak
from hf_rlhf_ext.rewards import ensemble_reward

pytestmark = pytest.mark.filterwarnings("ignore:Reward over-optimisation")

ALPHA, BETA = 1.0, 0.5
KL_PER_STEP = 0.04  # KL grows linearly with the step; measured every 10 steps


def gao_rl(kl: float) -> float:
    d = math.sqrt(kl)
    return d * (ALPHA - BETA * math.log(d)) if d > 0 else 0.0


def _true_peak_kl() -> float:
    """The KL of R's maximum by a grid search (1e-4 nats), independent of the closed form d* = exp(α/β − 1)."""
    grid = [i * 1e-4 for i in range(1, 200_000)]
    return max(grid, key=gao_rl)


TRUE_PEAK_KL = _true_peak_kl()


def _series(noise: float = 0.0, seed: int = 0, n: int = 41) -> list[tuple[int, float, float]]:
    """(step, kl, gold) every 10 steps, gold = R(KL) + N(0, noise)."""
    rng = random.Random(seed)
    return [(s, s * KL_PER_STEP, gao_rl(s * KL_PER_STEP) + rng.gauss(0.0, noise)) for s in range(0, 10 * n, 10)]


def _feed(cb, series, tmp_path, gold_std: float | None = None):
    """Feeds the series through on_log as a trainer logging proxy, gold and its training KL; returns the log records
    and the step at which training was told to stop (None: never)."""
    args = SimpleNamespace(output_dir=str(tmp_path), generation_batch_size=64)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    records, stopped_at = [], None
    for step, kl, gold in series:
        state.global_step = step
        logs = {"reward": 0.1 * step, "rewards/gold/mean": gold, "kl": kl, "loss": 0.0}
        if gold_std is not None:
            logs["rewards/gold/std"] = gold_std
        cb.on_log(args, state, control, logs=logs)
        records.append(logs)
        if control.should_training_stop and stopped_at is None:
            stopped_at = step
    return records, stopped_at


def _callback(**kwargs) -> OveroptimizationCallback:
    return OveroptimizationCallback(proxy="reward", gold="gold", save_peak=False, plot=False, **kwargs)


def test_the_grid_peak_is_where_the_derivative_vanishes():
    # R'(d) = α − β(ln d + 1) = 0 at d* = exp(α/β − 1): the grid search agrees with it
    assert TRUE_PEAK_KL == pytest.approx(math.exp(2 * ALPHA / BETA - 2), abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_interval_contains_the_true_peak_before_the_observed_peak(tmp_path, seed):
    series = _series(noise=0.005, seed=seed)
    records, _ = _feed(_callback(forecast=True), series, tmp_path, gold_std=0.005 * 8)  # se = std / sqrt(64)
    observed_peak_step = max(series, key=lambda p: p[2])[0]
    before = [r for (step, _, _), r in zip(series, records) if step < observed_peak_step]
    hits = [r for r in before if "overopt/forecast_peak_kl_low" in r and "overopt/forecast_peak_kl_high" in r
            and r["overopt/forecast_peak_kl_low"] <= TRUE_PEAK_KL <= r["overopt/forecast_peak_kl_high"]]
    assert hits, [(r.get("overopt/forecast_peak_kl_low"), r.get("overopt/forecast_peak_kl_high")) for r in before]


def test_stop_at_forecast_stops_at_the_first_measurement_past_the_peak_kl(tmp_path):
    expected = next(step for step, kl, _ in _series() if kl >= TRUE_PEAK_KL)
    cb = _callback(stop_at_forecast=True)
    _, stopped_at = _feed(cb, _series(), tmp_path)
    assert stopped_at == expected
    f = cb.findings()
    assert f.stopped and f.forecast_stop_step == expected
    assert f.forecast_peak_kl == pytest.approx(TRUE_PEAK_KL, rel=1e-3)


def test_stop_at_forecast_waits_for_a_narrow_interval(tmp_path):
    cb = _callback(stop_at_forecast=True, forecast_max_ratio=1.0)  # any spread of the resamples is too wide
    records, stopped_at = _feed(cb, _series(noise=0.02, seed=0), tmp_path, gold_std=0.16)
    assert any("overopt/forecast_peak_kl" in r for r in records)
    assert stopped_at is None and not cb.findings().stopped


def test_monotone_rising_gold_gives_no_forecast(tmp_path):
    series = [(s, s * KL_PER_STEP, 0.3 * s * KL_PER_STEP) for s in range(0, 410, 10)]  # gain ∝ KL: never turns down
    cb = _callback(stop_at_forecast=True)
    records, stopped_at = _feed(cb, series, tmp_path)
    assert not any(k.startswith("overopt/forecast") for r in records for k in r)
    assert stopped_at is None
    assert all(p["forecast_reason"] for p in cb.points) and cb.findings().forecast_peak_kl is None


def test_a_peak_far_beyond_the_measured_kl_gives_no_forecast(tmp_path):
    # exact Gao data, but measured only up to KL 2.8: a peak at 7.39 nats is an extrapolation past 2× the range
    records, _ = _feed(_callback(stop_at_forecast=True), _series(n=8), tmp_path)
    assert not any(k.startswith("overopt/forecast") for r in records for k in r)


def test_the_stop_rule_on_a_noisy_series(tmp_path):
    """Stops at the first measurement whose KL reached the forecast peak KL with an interval within the ratio."""
    cb = _callback(stop_at_forecast=True, forecast_max_ratio=1.5)
    records, stopped_at = _feed(cb, _series(noise=0.01, seed=4), tmp_path, gold_std=0.08)

    def rule(r):
        peak, low, high = (r.get(f"overopt/forecast_peak_kl{s}") for s in ("", "_low", "_high"))
        return peak is not None and high is not None and high / low <= 1.5 and r["kl"] >= peak

    expected = next(r for r in records if rule(r))
    assert stopped_at == records.index(expected) * 10
    assert any(r.get("overopt/forecast_peak_kl_low", math.inf) <= r["kl"] for r in records[: records.index(expected)])


def test_the_baselines_error_widens_the_interval():
    kl = [s * KL_PER_STEP for s in range(10, 250, 10)]
    gain = [gao_rl(k) + 0.01 * (-1) ** i for i, k in enumerate(kl)]
    narrow, wide = (forecast_gold_peak(kl, gain, baseline_se=se) for se in (0.0, 0.05))
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"]


def test_too_few_points_give_no_forecast(tmp_path):
    records, _ = _feed(_callback(forecast=True), _series()[:4], tmp_path)  # the first has KL 0: 3 usable points
    assert not any(k.startswith("overopt/forecast") for r in records for k in r)


def test_forecast_off_adds_nothing(tmp_path):
    cb = _callback()
    records, _ = _feed(cb, _series(), tmp_path)
    assert not any(k.startswith("overopt/forecast") for r in records for k in r)
    assert not any(k.startswith("forecast") for p in cb.points for k in p)


def test_the_forecast_stop_survives_a_resume(tmp_path):
    cb = _callback(stop_at_forecast=True)
    _, stopped_at = _feed(cb, _series(), tmp_path)
    resumed = _callback(stop_at_forecast=True)
    resumed.load_state_dict(cb.state_dict())
    assert resumed.findings().forecast_stop_step == stopped_at
    _, again = _feed(resumed, [(500, 20.0, gao_rl(20.0))], tmp_path)
    assert again is None  # stopped once; not again after the resume
    old = {k: v for k, v in cb.state_dict().items() if k != "forecast_stop_step"}  # written before the forecast
    fresh = _callback()
    fresh.load_state_dict(old)
    assert fresh.findings().forecast_stop_step is None


def test_the_bootstrap_is_reproducible(tmp_path):
    a, _ = _feed(_callback(forecast=True), _series(noise=0.01, seed=3), tmp_path)
    b, _ = _feed(_callback(forecast=True), _series(noise=0.01, seed=3), tmp_path)
    lows = [[r.get("overopt/forecast_peak_kl_low") for r in run] for run in (a, b)]
    assert any(x is not None for x in lows[0])
    assert [x is None for x in lows[0]] == [x is None for x in lows[1]]  # forecasts at the same measurements
    values = [[x for x in run if x is not None] for run in lows]
    assert values[0] == pytest.approx(values[1], rel=1e-9)  # the same resamples (lstsq may differ in the last bits)


# -- ensemble disagreement ---------------------------------------------------------------------------------------------
def _const(value: float, name: str):
    def member(prompts=None, completions=None, **kwargs):
        return [value] * len(completions)

    member.__name__ = name
    return member


def test_ensemble_std_is_the_mean_of_the_per_sample_member_stds():
    # sample 1: {0, 2} → std √2; sample 2: {1, 2, 3} → 1; sample 3: one finite score → no std
    assert ensemble_std([[0.0, 1.0, 5.0], [2.0, 2.0, math.nan], [math.nan, 3.0, math.nan]]) == pytest.approx(
        (math.sqrt(2) + 1.0) / 2
    )
    assert ensemble_std([[1.0], [math.nan]]) is None


def test_the_callback_logs_the_ensembles_disagreement_on_held_out_samples(tmp_path):
    members = [_const(0.0, "a"), _const(1.0, "b"), _const(2.0, "c")]  # std of {0, 1, 2} is 1 on every sample
    cb = _callback()
    cb.mode = "sample"  # as eval_prompts would set it (no trainer here)
    cb.ensemble_funcs = cb._ensemble_members(ensemble_reward(members, "mean"))
    completions = ["x"] * 5
    cb.sampler = SimpleNamespace(
        policy_for_generation=contextlib.nullcontext, sample=lambda policy, step, **kw: completions, gather=lambda v: v,
        score=lambda funcs, batch, state: [f(prompts=batch, completions=batch) for f in funcs],
    )
    cb.proxy_func, cb.gold_func = _const(0.5, "proxy"), _const(0.2, "gold")
    cb.kl_source = "training_kl"
    cb._measure(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl())
    assert cb.points[-1]["ensemble_std"] == pytest.approx(1.0)
    assert cb._point_metrics(cb.points[-1], False)["overopt/ensemble_std"] == pytest.approx(1.0)


def test_an_ensemble_needs_sample_mode_and_two_members():
    with pytest.raises(ValueError, match="sample mode"):
        _callback(ensemble=[_const(0.0, "a"), _const(1.0, "b")])
    cb = _callback()
    cb.mode = "sample"
    with pytest.raises(ValueError, match="at least 2"):
        cb._ensemble_members([_const(0.0, "a")])

"""OveroptimizationCallback's peak: the default threshold is the held-out measurement's own standard error (a dip
within noise is not a fall), the real maximum of the smoothed gold is reported beside the detector's peak, and the
plot never calls a point lower than a later one "peak"."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from types import SimpleNamespace

import pytest

from hf_rlhf_ext.callbacks import OveroptimizationCallback
from hf_rlhf_ext.callbacks.overoptimization import standard_error


def _feed(cb, series, output_dir, std: float | None = None, batch: int = 64):
    """Feeds (step, proxy, gold) through on_log as a trainer logging ``rewards/gold/std`` over ``batch`` completions
    would; returns the over-optimisation warnings raised."""
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(output_dir=str(output_dir), generation_batch_size=batch)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, proxy, gold in series:
            state.global_step = step
            logs = {"reward": proxy, "rewards/gold/mean": gold, "loss": 0.0}
            if std is not None:
                logs["rewards/gold/std"] = std
            cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    return [w for w in caught if "over-optimisation" in str(w.message)]


# proxy rises throughout; gold rises to 0.5321, then dips by 0.003 (seen on a run: far inside the noise)
DIP = [(0, 0.1, 0.40), (10, 0.2, 0.48), (20, 0.3, 0.5321), (30, 0.4, 0.5293), (40, 0.5, 0.5293), (50, 0.6, 0.5293),
       (60, 0.7, 0.5293)]


def test_a_dip_within_the_measurements_standard_error_is_not_a_fall(tmp_path):
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False)
    fired = _feed(cb, DIP, tmp_path, std=0.2, batch=64)  # standard error 0.2 / 8 = 0.025
    f = cb.findings()
    assert not fired and f.first_flag_step is None and not f.gold_fell and not f.detected
    assert cb.points[-1]["threshold"] == pytest.approx(0.025)


def test_a_fall_beyond_the_standard_error_is_still_found(tmp_path):
    falls = [*DIP[:3], (30, 0.4, 0.45), (40, 0.5, 0.40), (50, 0.6, 0.35), (60, 0.7, 0.30)]
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False, stop_on_overoptimization=True)
    fired = _feed(cb, falls, tmp_path, std=0.2, batch=64)
    f = cb.findings()
    assert len(fired) == 1 and f.detected and f.peak_step == 20 and f.detected_step == 50
    assert "fell from 0.5321 to 0.45" in str(fired[0].message)


def test_an_explicit_min_delta_is_used_as_given(tmp_path):
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False, min_delta=0.0)
    fired = _feed(cb, DIP, tmp_path, std=0.2, batch=64)  # the logged noise is ignored: 0 was asked for
    assert len(fired) == 1 and cb.findings().first_flag_step == 30
    saved = json.loads((tmp_path / "overoptimization.json").read_text())
    assert saved["settings"]["min_delta"] == 0.0 and saved["settings"]["threshold"] == "min_delta"


def test_without_a_known_standard_error_the_threshold_is_zero(tmp_path):
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False)
    assert len(_feed(cb, DIP, tmp_path)) == 1  # no rewards/gold/std logged: any fall counts
    cb = OveroptimizationCallback(proxy="reward", gold="gold", save_peak=False, plot=False)
    cb.update(0, 0.0, 0.5, gold_se=0.1)
    assert not cb.update(1, 0.1, 0.58, gold_se=0.1)["new_peak"]  # EMA 0.54: within 0.1 of the peak
    assert cb.update(2, 0.2, 0.9, gold_se=0.1)["new_peak"]  # EMA 0.72


def test_sample_mode_uses_the_standard_error_of_the_held_out_scores(tmp_path):
    cb = OveroptimizationCallback(proxy="reward", gold="gold", save_peak=False, plot=False)
    gold = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    cb.sampler = SimpleNamespace(policy_for_generation=contextlib.nullcontext, sample=lambda policy, step, **kw: None,
                                 score=lambda funcs, batch, state: ([0.5] * 6, gold), gather=lambda v: v)
    cb.kl_source = "training_kl"
    from transformers import TrainerControl, TrainerState

    cb._measure(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl())
    se = math.sqrt(sum((g - 4 / 6) ** 2 for g in gold) / 5 / 6)
    assert standard_error(gold) == pytest.approx(se)
    assert cb.points[-1]["gold_se"] == pytest.approx(se) and cb.points[-1]["threshold"] == pytest.approx(se)
    assert standard_error([1.0]) is None and standard_error([1.0, math.nan]) is None


# gold rises by less than min_delta at a time after step 20, to above its "peak" (seen on the default PPO run)
CREEP = [(0, 0.1, 0.30), (10, 0.2, 0.40), (20, 0.3, 0.518), (30, 0.4, 0.53), (40, 0.5, 0.545), (50, 0.6, 0.5545)]


def test_the_real_maximum_is_reported_when_the_peak_sits_below_a_later_value(tmp_path):
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  min_delta=0.05)
    _feed(cb, CREEP, tmp_path)
    f = cb.findings()
    assert (f.peak_step, f.peak_gold) == (20, 0.518)  # a rise smaller than min_delta does not move the peak
    assert (f.max_gold_step, f.max_gold) == (50, 0.5545) and f.final_gold == 0.5545
    saved = json.loads((tmp_path / "overoptimization.json").read_text())["findings"]
    assert (saved["max_gold_step"], saved["max_gold"]) == (50, 0.5545)
    marks = {label: step for step, _, label in cb._plot_marks(f)}
    assert "gold peak" not in marks and marks["last rise above noise"] == 20
    assert marks["gold max (a rise within noise)"] == 50
    assert (tmp_path / "overoptimization.png").stat().st_size > 1000


def test_a_true_peak_is_the_maximum_and_is_marked_gold_peak(tmp_path):
    hump = [(s, 0.1 * s, 1.0 - ((s - 20) / 20.0) ** 2) for s in range(0, 60, 5)]
    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False, min_delta=0.01)
    _feed(cb, hump, tmp_path)
    f = cb.findings()
    assert f.peak_step == f.max_gold_step == 20 and f.peak_gold == f.max_gold == 1.0
    assert cb._plot_marks(f) == [(20, 1.0, "gold peak")]


def _logs_bullet(page: str) -> dict[str, str]:
    """``{key: its description}`` from the callbacks page's "Logs:" bullet of the over-optimisation callback."""
    import re

    bullet = page.split("* **Logs:** `overopt/gold`", 1)[1].split("\n* **", 1)[0]
    bullet = re.sub(r"\s+", " ", "`overopt/gold`" + bullet)
    names = list(re.finditer(r"`(overopt/\w+)`", bullet))
    return {m.group(1): bullet[m.end() : n.start() if n else len(bullet)] for m, n in zip(names, [*names[1:], None])}


def test_the_callbacks_page_describes_the_logged_peak_and_maximum_as_they_behave(tmp_path):
    """docs/callbacks.md lists the keys the callback logs; on the creeping series with min_delta 0.05 the logged
    ``gold_peak`` stays below ``gold_max``, so the page must not call ``gold_peak`` the best smoothed gold so far."""
    from pathlib import Path

    from transformers import TrainerControl, TrainerState

    cb = OveroptimizationCallback(proxy="reward", gold="gold", smoothing="window", window=1, save_peak=False,
                                  plot=False, min_delta=0.05)
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    for step, proxy, gold in CREEP:
        state.global_step = step
        logs = {"reward": proxy, "rewards/gold/mean": gold, "kl": step / 100, "loss": 0.0}
        cb.on_log(args, state, control, logs=logs)
    logged = {k: v for k, v in logs.items() if k.startswith("overopt/")}
    assert (logged["overopt/gold_peak"], logged["overopt/gold_max"]) == (0.518, 0.5545)

    page = (Path(__file__).resolve().parents[1] / "docs" / "callbacks.md").read_text()
    described = _logs_bullet(page)
    assert set(described) == set(logged)
    assert "not necessarily the best so far" in described["overopt/gold_peak"]
    assert "the best smoothed gold so far" in described["overopt/gold_max"]

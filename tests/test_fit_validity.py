"""A Gao fit that does not describe the data (low or undefined R², a peak far beyond the measured KL) is reported as
"no fit" with its reason — in the JSON, the sweep's report and console, and best-of-N's console — never as a
prediction; and best-of-N's console table keeps its columns apart whatever the reward names."""

from __future__ import annotations

import importlib.util
import math
import random
import re
from pathlib import Path

import pytest

from hf_rlhf_ext.experiments import sweeps
from hf_rlhf_ext.objectives import MAX_PEAK_KL_FACTOR, MIN_FIT_R2, GaoFit, fit_gao

ROOT = Path(__file__).resolve().parents[1]


def test_a_fit_is_valid_only_with_a_high_r2_and_a_peak_near_the_data():
    d = [0.2 * i for i in range(1, 11)]  # KL up to 4
    hump = fit_gao(d, [x * (0.5 - 0.4 * math.log(x)) for x in d])  # peak at KL 1.65: inside the range
    assert hump.valid and hump.reason is None and hump.max_kl == pytest.approx(4.0)
    noisy = GaoFit("rl", 0.2, 0.1, 0.214, 10, max_kl=4.0)
    assert not noisy.valid and noisy.reason == f"R² = 0.214 is below {MIN_FIT_R2:g}"
    flat = fit_gao(d, [0.0] * len(d))  # nothing varies: R² undefined
    assert not flat.valid and "R² is undefined" in flat.reason
    far = fit_gao(d, [x * (0.5 - 0.05 * math.log(x)) for x in d])  # R² = 1, peak at KL exp(18)
    assert far.r2 == pytest.approx(1.0) and far.peak_kl > MAX_PEAK_KL_FACTOR * 4.0
    assert not far.valid and "beyond 2× the largest measured KL (4 nats)" in far.reason
    assert far.to_dict()["valid"] is False and far.to_dict()["reason"] == far.reason


def _result(beta: float, seed: int, gold_of_kl) -> dict:
    curve = []
    for step in range(0, 25, 5):
        kl = step / 4 / (1 + 20 * beta) + (0.001 * seed if step else 0.0)
        curve.append({"step": step, "kl": kl, "kl_k1": kl, "proxy": 0.1 * step, "gold": 0.2 + gold_of_kl(kl)})
    return {"trainer": "grpo", "beta": beta, "seed": seed, **sweeps.curve_summary(curve), "curve": curve,
            "seconds": 1.0}


def test_a_sweep_with_a_poor_fit_reports_no_fit_and_why(tmp_path):
    rng = random.Random(0)
    results = [_result(b, s, lambda kl: rng.uniform(-0.3, 0.3)) for b in (0.0, 0.05, 1.0) for s in (0, 1)]
    metrics = sweeps.summarise(results)
    fit = metrics["gao_fit"]
    assert fit["valid"] is False and fit["reason"].startswith("R² = ") and fit["r2"] < MIN_FIT_R2
    md = Path(sweeps.write_report(str(tmp_path), results, metrics)["sweep.md"]).read_text()
    assert f"no fit — {fit['reason']}" in md and "peak d*" not in md and "KL*" not in md
    console = sweeps.summary_lines(str(tmp_path), metrics)
    assert f"Gao fit: no fit ({fit['reason']})" in console and "d*=" not in console


def test_a_sweep_whose_fitted_peak_is_far_outside_the_data_reports_no_fit():
    gain = lambda kl: math.sqrt(kl) * (0.5 - 0.05 * math.log(math.sqrt(kl))) if kl > 0 else 0.0  # noqa: E731
    metrics = sweeps.summarise([_result(b, s, gain) for b in (0.0, 0.05, 1.0) for s in (0, 1)])
    fit = metrics["gao_fit"]
    assert fit["r2"] == pytest.approx(1.0) and fit["valid"] is False
    assert "largest measured KL (5 nats)" in fit["reason"]
    assert "peak d*" not in sweeps.report_markdown(metrics)


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_bon_fit", ROOT / "recipes" / "best_of_n.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bon_metrics(fit: dict | None, names: list[str]) -> dict:
    values = {n: 0.5 for n in names}
    kept = {"best_round": 1, "by": None, "gold": None, "initial_gold": None, "beats_initial": None,
            "reason": "no held-out gold reward: the last round is kept"}
    return {"n": 8, "rounds": 1, "num_eval_prompts": 4, "initial": values, "best_of_n": {**values, "kl": 1.2},
            "distilled": [{"round": 1, "eval": {**values, "kl": 1.0}}], "best_round": 1, "kept": kept,
            "curve": {"fit": fit}, "seconds": 1.0}


def test_best_of_n_prints_no_fit_instead_of_a_nan_fit():
    flat = fit_gao([0.4, 0.8, 1.1], [0.0, 0.0, 0.0], form="bon").to_dict()  # alpha 0, beta 0, R² nan
    text = _recipe().summary_text(_bon_metrics(flat, ["proxy"]), ["proxy"], "out")
    assert "Gao best-of-N fit to the gold gain: no fit (R² is undefined" in text
    assert "predicted peak" not in text and "nan" not in text.split("Gao")[1]


def test_best_of_n_table_keeps_long_reward_names_apart():
    names = ["proxy_len", "gold_concise_tracked", "r"]
    lines = _recipe().summary_text(_bon_metrics(None, names), names, "out").splitlines()
    header = lines[2]
    assert header.split() == [*names, "KL", "(nats)"]  # each name stands alone: no two run together
    ends = [m.end() for m in re.finditer(r"\S+", header)][: len(names)]
    for row in lines[3:6]:  # every number ends where its column's name ends
        assert [row[end - 6 : end] for end in ends] == ["+0.500"] * len(names)

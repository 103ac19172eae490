"""The β sweep (hf_rlhf_ext.experiments.sweeps, recipes/beta_sweep.py).

Fast tests: the results file (resume, truncated last line, config fingerprint), Spearman's ρ against hand-computed
values, the report from synthetic results, bad arguments, and real points on the tiny world of ``_ppo_helpers``. The
lab experiment and the resume-equals-uninterrupted check with parallel processes are ``slow``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from _ppo_helpers import build_world, prompts

from hf_rlhf_ext.experiments import grid, sweeps

ROOT = Path(__file__).resolve().parents[1]


def word_count(prompts=None, completions=None, **kwargs):
    """A proxy for the tiny world that varies from the first step (the target word is rare before training)."""
    return [len((c[0]["content"] if isinstance(c, list) else c).split()) / 10 for c in completions]


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic results: a Gao curve with known α, β_fit
# ----------------------------------------------------------------------------------------------------------------------
ALPHA, BETA_FIT, REF_GOLD = 0.5, 0.4, 0.2


def _gain(kl: float) -> float:
    d = math.sqrt(kl)
    return d * (ALPHA - BETA_FIT * math.log(d)) if d > 0 else 0.0


def fake_result(beta: float, seed: int, trainer: str = "grpo") -> dict:
    """A point whose gold follows the Gao curve exactly; KL grows with steps, more slowly for larger β."""
    curve = []
    for step in range(0, 25, 5):
        kl = step / 4 / (1 + 20 * beta) + (0.001 * seed if step else 0.0)
        curve.append({"step": step, "kl": kl, "kl_k1": kl, "proxy": 0.1 * step + beta, "gold": REF_GOLD + _gain(kl)})
    return {"trainer": trainer, "beta": beta, "seed": seed, **sweeps.curve_summary(curve), "curve": curve,
            "seconds": 1.0}


@pytest.fixture
def fake_points(monkeypatch):
    calls = []

    def run_point(argv, beta, seed):
        calls.append((beta, seed))
        return fake_result(beta, seed)

    monkeypatch.setattr(sweeps, "run_point", run_point)
    return calls


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _argv(out, *extra: str) -> list[str]:
    return ["--output_dir", str(out), *extra]


# ----------------------------------------------------------------------------------------------------------------------
# results.jsonl: resume, truncated lines, fingerprint
# ----------------------------------------------------------------------------------------------------------------------
def test_rerun_skips_finished_points_and_runs_only_new_ones(tmp_path, fake_points):
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "1"), progress=False)
    assert sorted(fake_points) == [(0.0, 0), (1.0, 0)]
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "0.5", "1"), progress=False)
    assert sorted(fake_points) == [(0.0, 0), (0.5, 0), (1.0, 0)]  # only β = 0.5 was new
    lines = _lines(tmp_path / "results.jsonl")
    assert lines[0]["header"] is True
    assert sorted(r["beta"] for r in lines[1:]) == [0.0, 0.5, 1.0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["betas"] == [0.0, 0.5, 1.0]


def test_a_truncated_last_line_is_dropped_and_its_point_rerun(tmp_path, fake_points):
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "1", "--seeds", "0", "1"), progress=False)
    path = tmp_path / "results.jsonl"
    text = path.read_text()
    last = json.loads(text.splitlines()[-1])
    path.write_text(text[: len(text) - 40])  # a kill in the middle of the last write
    del fake_points[:]
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "1", "--seeds", "0", "1"), progress=False)
    assert fake_points == [(last["beta"], last["seed"])]
    lines = _lines(path)  # every line is JSON again
    assert sorted((r["beta"], r["seed"]) for r in lines[1:]) == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]


def test_read_results_tolerates_a_cut_line_followed_by_a_newline(tmp_path):
    path = str(tmp_path / "results.jsonl")
    config = {"training": {"learning_rate": 1e-4}}
    assert sweeps.read_results(path, config) == []
    sweeps.append_result(path, {"trainer": "grpo", "beta": 0.0, "seed": 0})
    with open(path, "a") as f:
        f.write('{"trainer": "grpo", "beta": 1.0, "se\n')
    assert [r["beta"] for r in sweeps.read_results(path, config)] == [0.0]
    with open(path, "a") as f:  # a corrupt line that is not the last one is not silently dropped
        f.write("garbage\n" + json.dumps({"beta": 2.0}) + "\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        sweeps.read_results(path, config)


def test_resuming_with_another_config_is_refused(tmp_path, fake_points):
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "--learning_rate", "1e-4"), progress=False)
    with pytest.raises(ValueError, match=r"different config.*learning_rate: 0\.0001 -> 0\.0002"):
        sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "1", "--learning_rate", "2e-4"), progress=False)
    with pytest.raises(ValueError, match=r"different config.*trainer: 'grpo' -> 'ppo'"):
        sweeps.run_sweep(_argv(tmp_path, "--trainer", "ppo", "--betas", "0"), progress=False)
    assert fake_points == [(0.0, 0)]  # nothing ran for the refused sweeps
    # settings that cannot change a point (grid, parallelism, logging) keep the fingerprint
    sweeps.run_sweep(_argv(tmp_path, "--betas", "0", "--learning_rate", "1e-4", "--max_parallel", "2",
                           "--logging_steps", "1"), progress=False)
    assert fake_points == [(0.0, 0)]


# ----------------------------------------------------------------------------------------------------------------------
# Spearman
# ----------------------------------------------------------------------------------------------------------------------
def test_spearman_against_hand_computed_values():
    assert sweeps.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 − 6·4 / (5·24)
    assert sweeps.spearman([0, 0.005, 0.02, 1.0], [9.0, 4.0, 1.5, 0.1]) == pytest.approx(-1.0)
    # ties: y ranks (1, 2, 3.5, 5, 3.5) → ρ = 8 / sqrt(10 · 9.5)
    assert sweeps.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    # ties in x (several seeds per β): x ranks (1.5, 1.5, 3.5, 3.5), y ranks (4, 3, 2, 1) → ρ = −4 / sqrt(4 · 5)
    assert sweeps.spearman([0, 0, 1, 1], [4, 3, 2, 1]) == pytest.approx(-4 / math.sqrt(20))
    assert sweeps.spearman([1, 2, 3], [7, 7, 7]) is None
    with pytest.raises(ValueError):
        sweeps.spearman([1, 2], [1])


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def test_report_from_synthetic_results_recovers_the_gao_curve(tmp_path):
    results = [fake_result(b, s) for b in (0.0, 0.05, 1.0) for s in (0, 1)]
    metrics = sweeps.summarise(results[::-1], fit_min_kl=0.01)  # order does not matter
    fit = metrics["gao_fit"]
    assert fit["alpha"] == pytest.approx(ALPHA, abs=1e-6) and fit["beta"] == pytest.approx(BETA_FIT, abs=1e-6)
    assert fit["peak_d"] == pytest.approx(math.exp(ALPHA / BETA_FIT - 1), rel=1e-6)
    # fit points: steps > 0 with KL ≥ 0.01 — β = 1.0's curve has KL = step/84 (+ 0.001·seed): all 8 kept
    assert fit["n_points"] == 3 * 2 * 4
    assert metrics["spearman_beta_final_kl"] == pytest.approx(-1.0)
    row = metrics["per_beta"][0]
    assert row["final_kl"]["min"] == pytest.approx(5.0) and row["final_kl"]["max"] == pytest.approx(5.001)
    paths = sweeps.write_report(str(tmp_path), results, metrics)
    md = Path(paths["sweep.md"]).read_text()
    assert "| 1 | 0.239 [0.238, 0.239] |" in md  # KL = 20/4/21 = 0.2381, +0.001 for seed 1
    assert f"α = {ALPHA:.4f}, β_fit = {BETA_FIT:.4f}" in md
    assert Path(paths["frontier.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(paths["metrics.json"]).read_text())["gao_fit"]["n_points"] == 24


def test_hump_at_the_lowest_beta():
    hump = fake_result(0.0, 0)
    for p, gold in zip(hump["curve"], (0.2, 0.5, 0.7, 0.4, 0.3)):
        p["gold"] = gold
    hump.update(sweeps.curve_summary(hump["curve"]))
    assert (hump["peak_step"], hump["peak_gold"], hump["proxy_at_peak"]) == (10, 0.7, 1.0)
    flat = fake_result(1.0, 0)  # gold rises to the end: no hump
    metrics = sweeps.summarise([hump, flat])
    assert metrics["lowest_beta"]["hump"] is True
    assert metrics["lowest_beta"]["gold_drop"] == pytest.approx(0.4)
    assert metrics["lowest_beta"]["proxy_rise_after_peak"] == pytest.approx(1.0)
    assert sweeps.summarise([flat])["lowest_beta"]["hump"] is False


# ----------------------------------------------------------------------------------------------------------------------
# Penalty vs early stopping: synthetic curves whose answer is known by construction
# ----------------------------------------------------------------------------------------------------------------------
# The lowest β's path: gold at KL 0, 1, 2, 3, 4 (steps 0..20) — a hump, linear between measurements.
FRONTIER = [(0, 0.0, 0.2), (5, 1.0, 0.4), (10, 2.0, 0.5), (15, 3.0, 0.5), (20, 4.0, 0.4)]


def run_row(beta: float, seed: int, points) -> dict:
    """A result line whose curve is ``points`` = [(step, kl, gold)]."""
    curve = [{"step": st, "kl": kl, "kl_k1": kl, "proxy": kl, "gold": g} for st, kl, g in points]
    return {"trainer": "grpo", "beta": beta, "seed": seed, **sweeps.curve_summary(curve), "curve": curve,
            "seconds": 1.0}


def two_beta_sweep(offsets, high_kl=1.5) -> list[dict]:
    """β = 0 follows FRONTIER; β = 0.5 ends at ``high_kl`` (1.5 → the frontier's gold there is 0.45 by hand) with the
    frontier's gold plus the seed's offset: the difference of each seed *is* its offset."""
    rows = []
    for seed, offset in enumerate(offsets):
        rows += [run_row(0.0, seed, FRONTIER), run_row(0.5, seed, [(0, 0.0, 0.2), (20, high_kl, 0.45 + offset)])]
    return rows


def test_gold_at_kl_interpolates_linearly_in_kl_at_the_first_crossing():
    from hf_rlhf_ext.experiments.early_stopping import gold_at_kl

    curve = run_row(0.0, 0, [(0, 0.0, 0.2), (5, 1.0, 0.5), (10, 2.0, 0.6), (15, 3.0, 0.4)])["curve"]
    assert gold_at_kl(curve, 1.5) == pytest.approx({"gold": 0.55, "step": 7.5})  # halfway between 0.5 and 0.6
    assert gold_at_kl(curve, 2.5) == pytest.approx({"gold": 0.5, "step": 12.5})
    assert gold_at_kl(curve, 0.25) == pytest.approx({"gold": 0.275, "step": 1.25})
    assert gold_at_kl(curve, 3.0) == pytest.approx({"gold": 0.4, "step": 15})  # the last measurement itself
    assert gold_at_kl(curve, 3.2) is None  # beyond the measured range: no extrapolation
    # KL not monotonic along the run: 0 → 2 → 1 → 3. Stopping early means the first crossing of 1.5 (0.2 + 0.75 · 0.4),
    # not the later one on the way back down (0.6 − 0.5 · 0.3 = 0.45)
    zigzag = run_row(0.0, 0, [(0, 0.0, 0.2), (5, 2.0, 0.6), (10, 1.0, 0.3), (15, 3.0, 0.9)])["curve"]
    assert gold_at_kl(zigzag, 1.5) == pytest.approx({"gold": 0.5, "step": 3.75})


@pytest.mark.parametrize("offsets, verdict, interval", [
    # per-seed differences 0.10, 0.12, 0.14: mean 0.12, sd 0.02, half-width 4.303 · 0.02 / sqrt(3) = 0.049687
    ((0.10, 0.12, 0.14), "the penalty beats early stopping", (0.070313, 0.169687)),
    # −0.05, 0, 0.05: mean 0, sd 0.05, half-width 4.303 · 0.05 / sqrt(3) = 0.124217
    ((-0.05, 0.0, 0.05), "early stopping matches the penalty", (-0.124217, 0.124217)),
    ((-0.10, -0.12, -0.14), "early stopping beats the penalty", (-0.169687, -0.070313)),
])
def test_penalty_vs_early_stopping_verdicts_known_by_construction(offsets, verdict, interval):
    from hf_rlhf_ext.experiments.early_stopping import penalty_vs_early_stopping

    out = penalty_vs_early_stopping(two_beta_sweep(offsets))
    assert out["verdict"] == verdict
    assert out["ci95"] == pytest.approx(list(interval), abs=1e-6)
    assert (out["n_pairs"], out["n_seeds"], out["n_unmatched"]) == (3, 3, 0)
    pair = out["pairs"][0]
    assert (pair["beta_low"], pair["beta_high"], pair["kl"]) == (0.0, 0.5, 1.5)
    assert pair["gold_early_stop"] == pytest.approx(0.45) and pair["stop_step"] == pytest.approx(7.5)


def test_too_few_matched_seeds_is_not_decidable():
    from hf_rlhf_ext.experiments.early_stopping import penalty_vs_early_stopping

    two_seeds = penalty_vs_early_stopping(two_beta_sweep((0.10, 0.12)))
    assert two_seeds["verdict"] == "not decidable: matched pairs in 2 seed(s), at least 3 needed"
    assert two_seeds["ci95"] is None and two_seeds["mean_difference"] == pytest.approx(0.11)
    # three seeds, but the third high-β run ends beyond the low-β run's measured KL (4.5 > 4): not matched
    rows = two_beta_sweep((0.10, 0.12)) + two_beta_sweep((0.0, 0.0, 0.5), high_kl=4.5)[4:]
    out = penalty_vs_early_stopping(rows)
    assert (out["n_pairs"], out["n_unmatched"], out["n_seeds"]) == (2, 1, 2)
    assert out["verdict"].startswith("not decidable")
    assert penalty_vs_early_stopping([run_row(0.0, 0, FRONTIER)])["verdict"].startswith("not decidable: matched "
                                                                                       "pairs in 0 seed(s)")


def test_the_seed_is_the_replicate_not_the_pair():
    """Three β: each seed's pairs are averaged first, then the t interval is over the per-seed means."""
    from hf_rlhf_ext.experiments.early_stopping import penalty_vs_early_stopping

    rows = []
    for seed, shift in enumerate((0.0, 0.03, 0.06)):
        rows += [run_row(0.0, seed, FRONTIER), run_row(0.1, seed, [(0, 0.0, 0.2), (5, 1.0, 0.3), (10, 2.0, 0.6)]),
                 run_row(1.0, seed, [(0, 0.0, 0.2), (5, 0.5, 0.35 + shift)])]
    out = penalty_vs_early_stopping(rows[::-1])  # order does not matter
    # seed 0: (0 vs 0.1) 0.6 − 0.5 = 0.10; (0 vs 1) 0.35 − 0.30 = 0.05; (0.1 vs 1) 0.35 − 0.25 = 0.10 → 0.25 / 3
    # seeds 1, 2: the two pairs against β = 1 gain 0.03 each per seed → 0.31 / 3, 0.37 / 3 (sd 0.02)
    assert [r["mean_difference"] for r in out["per_seed"]] == pytest.approx([0.25 / 3, 0.31 / 3, 0.37 / 3])
    assert out["mean_difference"] == pytest.approx(0.31 / 3)
    assert out["ci95"] == pytest.approx([0.31 / 3 - 0.049687, 0.31 / 3 + 0.049687], abs=1e-6)
    assert [(r["beta_low"], r["beta_high"], r["n"]) for r in out["per_beta_pair"]] == [(0.0, 0.1, 3), (0.0, 1.0, 3),
                                                                                     (0.1, 1.0, 3)]
    assert [r["mean_difference"] for r in out["per_beta_pair"]] == pytest.approx([0.10, 0.08, 0.13])
    assert out["n_pairs"] == 9


def test_the_sweep_report_carries_the_early_stopping_verdict(tmp_path):
    results = two_beta_sweep((-0.10, -0.12, -0.14))
    metrics = sweeps.summarise(results)
    assert metrics["penalty_vs_early_stopping"]["verdict"] == "early stopping beats the penalty"
    paths = sweeps.write_report(str(tmp_path), results, metrics)
    md = Path(paths["sweep.md"]).read_text()
    assert "mean difference -0.120, 95% interval [-0.170, -0.070] — **early stopping beats the penalty**" in md
    assert "| 0 | 0.5 | 3 | -0.120 |" in md
    stored = json.loads(Path(paths["metrics.json"]).read_text())["penalty_vs_early_stopping"]
    assert stored["verdict"] == "early stopping beats the penalty"
    assert "penalty vs early stopping: -0.120" in sweeps.summary_lines(str(tmp_path), metrics)


# ----------------------------------------------------------------------------------------------------------------------
# Bad arguments: refused before any training
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--betas", "0", "-0.1"], "β must be finite and >= 0"),
    (["--trainer", "dqn"], "--trainer must be one of"),
    (["--backend", "slurm"], "--backend must be one of"),
    (["--betas", "0.1", "0.1"], "Repeated β"),
    (["--max_parallel", "0"], "--max_parallel must be >= 1"),
])
def test_bad_arguments_fail_before_training(tmp_path, fake_points, argv, message):
    with pytest.raises(ValueError, match=message):
        sweeps.run_sweep(_argv(tmp_path, *argv), progress=False)
    assert fake_points == [] and not (tmp_path / "results.jsonl").exists()


def test_an_empty_grid_from_a_config_file_is_refused(tmp_path, fake_points):
    config = tmp_path / "sweep.yaml"
    config.write_text("betas: []\n")
    with pytest.raises(ValueError, match="--betas is empty"):
        sweeps.run_sweep(["--config", str(config), "--output_dir", str(tmp_path)], progress=False)
    with pytest.raises(ValueError, match="--seeds is empty"):
        sweeps.SweepArguments(seeds=[])


def test_lab_config_file_spells_out_the_defaults(tmp_path):
    from_file = sweeps.parse_sweep_argv(["--config", str(ROOT / "recipes/configs/beta_sweep_lab.yaml")])
    default = sweeps.parse_sweep_argv([])
    def values(x) -> dict:  # every setting; the settings line names where they came from, so it differs
        return {k: v for k, v in (x.to_dict() if hasattr(x, "to_dict") else vars(x)).items() if k != "settings_line"}

    for a, b in zip(from_file, default):
        assert values(a) == values(b)
    assert from_file[0].betas == [0.0, 0.005, 0.02, 0.05, 0.2, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# Real points on the tiny world
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_world")
    paths = build_world(str(root))
    data = root / "prompts"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for p in prompts(16)["prompt"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {**paths, "data": str(data)}


def _tiny_argv(tiny, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "test_sweeps.word_count", "_ppo_helpers.target_word", "--reward_weights", "1", "0",
            "--output_dir", str(out), "--max_steps", "3", "--eval_every", "2", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "6", "--num_eval_prompts", "8",
            "--learning_rate", "0.05", *extra]


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_a_point_measures_kl_to_the_initial_policy_also_at_beta_zero(tiny, tmp_path, trainer):
    """β = 0: no TRL reference model, so the probe keeps its own copy of the initial policy — which must not follow
    the policy as it trains (a deep copy of a TRL-patched model would, and measure KL = 0)."""
    argv = _tiny_argv(tiny, tmp_path, "--trainer", trainer)
    result = sweeps.run_point(sweeps._absolute_paths(argv), 0.0, 0)
    assert [p["step"] for p in result["curve"]] == [0, 2, 3]  # step 0, every 2 steps, and the last step
    assert abs(result["curve"][0]["kl"]) < 1e-4  # the policy is its own reference at step 0
    assert result["final_kl"] > 0.05  # lr 0.05 moves a 1-layer model far in 3 steps
    assert result["ref_gold"] == result["curve"][0]["gold"]
    log = (tmp_path / "points" / f"{trainer}_beta0_seed0" / "log_history.jsonl").read_text()
    assert "sweep/gold" in log


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_a_point_is_the_parsed_sweep_with_its_beta_seed_and_directory(tmp_path, trainer):
    """A point's config is built from the object parsed once, exactly as a parse of the command line with the point's
    flags added would build it (β under the trainer's own name; a point never pushes)."""
    import dataclasses

    argv = ["--trainer", trainer, "--output_dir", str(tmp_path), "--learning_rate", "2e-4", "--push_to_hub", "true",
            "--hub_model_id", "someone/sweep", "--betas", "0", "0.2", "--seeds", "3", "4"]
    spec = sweeps.parse_sweep_spec(argv)
    point = dataclasses.replace(spec, beta=0.2, seed=3)
    flags = ["--seed", "3", f"--{sweeps.BETA_FIELD[trainer]}", "0.2", "--push_to_hub", "false", "--output_dir",
             sweeps.point_dir(str(tmp_path), trainer, 0.2, 3)]
    assert point.training_args().to_dict() == sweeps.parse_sweep_argv(argv + flags)[2].to_dict()
    assert spec.training_args().to_dict() == sweeps.parse_sweep_argv(argv)[2].to_dict()
    assert [(p.beta, p.seed) for p in spec.points()] == [(0.0, 3), (0.0, 4), (0.2, 3), (0.2, 4)]
    assert spec.points()[2] == point
    with pytest.raises(ValueError, match="both β and seed"):
        dataclasses.replace(spec, beta=0.2).training_args()


def _deterministic(path: Path) -> list[dict]:
    rows = [r for r in _lines(path) if not r.get("header")]
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return sorted(rows, key=lambda r: (r["beta"], r["seed"]))


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_same_results(tiny, tmp_path):
    """Grid prefix first (as if killed after one point), then the full grid — against one uninterrupted run in two
    spawned processes: the same result lines, field for field (all but the wall-clock seconds)."""
    sweeps.run_sweep(_tiny_argv(tiny, tmp_path / "resumed", "--betas", "0"), progress=False)
    sweeps.run_sweep(_tiny_argv(tiny, tmp_path / "resumed", "--betas", "0", "1.0"), progress=False)
    sweeps.run_sweep(_tiny_argv(tiny, tmp_path / "whole", "--betas", "0", "1.0", "--max_parallel", "2"),
                     progress=False)
    resumed, whole = (_deterministic(tmp_path / k / "results.jsonl") for k in ("resumed", "whole"))
    assert [(r["beta"], r["seed"]) for r in whole] == [(0.0, 0), (1.0, 0)]
    assert resumed == whole
    assert whole[0]["final_kl"] != whole[1]["final_kl"]  # the two points really differ


def test_ray_backend_runs_each_point_as_a_task(tiny, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})  # the test's reward functions
    try:
        sweeps.run_sweep(_tiny_argv(tiny, tmp_path / "ray", "--betas", "0", "1.0", "--backend", "ray"), progress=False)
    finally:
        ray.shutdown()
    sweeps.run_sweep(_tiny_argv(tiny, tmp_path / "local", "--betas", "0", "1.0"), progress=False)
    assert _deterministic(tmp_path / "ray" / "results.jsonl") == _deterministic(tmp_path / "local" / "results.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# On the lab (slow: ≈ 2–3 min on 2 cores)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lab_sweep_shows_the_kl_leash_and_the_gold_hump(tmp_path):
    """Four β, seed 0, two points at a time. Margins: a held-out mean over 256 completions has a standard error of
    ≈ 0.035 in gold (≈ 0.05 in proxy), so a drop or a rise of 0.06 is beyond the noise of a difference of two means."""
    metrics = sweeps.run_sweep(["--betas", "0", "0.05", "0.2", "1.0", "--max_parallel", "2", "--output_dir",
                                str(tmp_path)], progress=False)
    kl = {row["beta"]: row["final_kl"]["mean"] for row in metrics["per_beta"]}
    # with 4 β, ρ ≤ −0.9 admits only the exact reverse order (one swap of neighbours gives −0.8)
    assert metrics["spearman_beta_final_kl"] <= -0.9, kl
    low = metrics["lowest_beta"]
    assert low["beta"] == 0.0 and low["gold_drop"] > 0.06 and low["proxy_rise_after_peak"] > 0.06, low
    assert low["peak_step"] < 60  # the gold peak is inside the run, not at its end
    # β = 1: the lab's KL floor for GRPO is ≈ 0.2–0.3 nats (reached within 5 steps); far below the free runs
    assert kl[1.0] < 0.5 and kl[1.0] < kl[0.0] / 5, kl


def test_parallel_points_run_under_the_callers_current_environment(monkeypatch):
    """Workers fork from a fork server started once: a variable the caller sets (or drops) later must still reach
    each point, so the point task takes the caller's environment with it."""
    from hf_rlhf_ext.experiments import sweeps

    seen = {}
    monkeypatch.setattr(sweeps, "run_point", lambda argv, beta, seed: seen.update(
        x=os.environ.get("HF_RLHF_EXT_TEST_X"), stale=os.environ.get("HF_RLHF_EXT_TEST_STALE"), beta=beta) or {})
    monkeypatch.setenv("HF_RLHF_EXT_TEST_STALE", "from an older environment")
    env = {k: v for k, v in os.environ.items() if k != "HF_RLHF_EXT_TEST_STALE"} | {"HF_RLHF_EXT_TEST_X": "now"}
    grid._call_in_env(env, sweeps.run_point, [], 0.5, 0)
    assert seen == {"x": "now", "stale": None, "beta": 0.5}
    monkeypatch.delenv("HF_RLHF_EXT_TEST_X", raising=False)

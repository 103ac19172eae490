"""Reward-model ensembles against over-optimisation (hf_rlhf_ext.experiments.ensembles, recipes/rm_ensemble.py).

Fast tests: the numbers, table and plot from synthetic results; the dotted-path objectives against their members
scored one by one; the command line each objective's sweep gets; bad arguments; resume and refusal with fake points.
The lab run is ``slow``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from _ppo_helpers import build_world

from hf_rlhf_ext.experiments import ensembles, sweeps

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic results
# ----------------------------------------------------------------------------------------------------------------------
def fake_run(golds, seed, kls=None, proxies=None) -> dict:
    steps = range(0, 5 * len(golds), 5)
    kls = kls or [0.5 * i for i in range(len(golds))]
    proxies = proxies or [0.1 * i for i in range(len(golds))]
    curve = [{"step": s, "kl": k, "kl_k1": k, "proxy": p, "gold": g} for s, g, k, p in zip(steps, golds, kls, proxies)]
    return {"trainer": "grpo", "beta": 0.005, "seed": seed, "curve": curve, **sweeps.curve_summary(curve)}


SETTINGS = {"trainer": "grpo", "beta": 0.005, "seeds": [0, 1], "penalty": 1.0, "k": 3, "members": [],
            "single_reward_model": "rm", "max_steps": 15, "learning_rate": 3e-4}
RUNS = {
    "single": [fake_run([0.2, 0.6, 0.4, 0.1], 0), fake_run([0.2, 0.5, 0.5, 0.3], 1, kls=[0, 1, 4, 9])],
    "min": [fake_run([0.2, 0.3, 0.5, 0.5], 0), fake_run([0.2, 0.4, 0.6, 0.55], 1)],
}


def test_summary_per_objective_against_hand_computed_values():
    m = ensembles.summarise(RUNS, SETTINGS)
    single, low = m["objectives"]["single"], m["objectives"]["min"]
    # single: peaks 0.6 (step 5) and 0.5 (first at step 5), ends 0.1 and 0.3 → falls 0.5 and 0.2
    assert single["fall"]["mean"] == pytest.approx(0.35)
    assert (single["fall"]["min"], single["fall"]["max"]) == pytest.approx((0.2, 0.5))
    assert single["end_gold"]["mean"] == pytest.approx(0.2) and single["peak_gold"]["max"] == pytest.approx(0.6)
    assert single["peak_step"]["mean"] == 5
    assert single["final_kl"] == pytest.approx({"mean": 5.25, "min": 1.5, "max": 9})
    assert single["final_optimised"]["mean"] == pytest.approx(0.3)
    # min: seed 0 reaches 0.5 at step 10 and stays (no fall; the first step at the peak counts), seed 1 falls 0.05
    assert low["fall"]["mean"] == pytest.approx(0.025) and low["peak_step"]["mean"] == 10
    assert m["fall_vs_single"]["min"] == pytest.approx(0.025 - 0.35)
    c = single["curve"]
    assert c["step"] == [0, 5, 10, 15]
    assert c["gold_mean"] == pytest.approx([0.2, 0.55, 0.45, 0.2])
    assert c["gold_min"] == pytest.approx([0.2, 0.5, 0.4, 0.1]) and c["gold_max"] == pytest.approx([0.2, 0.6, 0.5, 0.3])


def test_report_table_plot_and_metrics_from_synthetic_results(tmp_path):
    m = ensembles.summarise(RUNS, SETTINGS)
    paths = ensembles.write_report(str(tmp_path), RUNS, m)
    md = Path(paths["ensemble.md"]).read_text()
    assert "| single RM | 0.200 [0.100, 0.300] | 0.550 [0.500, 0.600] | 0.350 [0.200, 0.500] | 5 |" in md
    assert "| ensemble min (worst case) | 0.525 [0.500, 0.550] |" in md
    assert Path(paths["ensemble.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(Path(paths["metrics.json"]).read_text())
    assert saved["objectives"]["single"]["fall"]["max"] == pytest.approx(0.5)
    lines = ensembles.summary_lines(str(tmp_path), m)
    assert str(tmp_path / "ensemble.md") in lines and "fall 0.350" in lines


def test_curve_uses_only_the_steps_every_seed_measured():
    runs = [fake_run([0.1, 0.2, 0.3], 0), fake_run([0.1, 0.4], 1)]
    assert ensembles.gold_curve(runs)["step"] == [0, 5]
    assert ensembles.gold_curve(runs)["gold_max"] == pytest.approx([0.1, 0.4])


# ----------------------------------------------------------------------------------------------------------------------
# The dotted-path objectives: members and λ from the environment
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return [build_world(str(root / f"w{seed}"), seed=seed)["reward"] for seed in (0, 7)]


COMPLETIONS = ["good good thanks", "the kettle is broken", "sorry we will fix it", "bad", "please help my order"]


def test_env_objectives_match_members_scored_one_by_one(two_rms, monkeypatch):
    from hf_rlhf_ext.rewards import RewardModelFunction

    prompts = ["customer : my order is late agent :"] * len(COMPLETIONS)
    cols = [RewardModelFunction(p)(prompts=prompts, completions=COMPLETIONS) for p in two_rms + two_rms[:1]]
    rows = list(zip(*cols))
    assert any(a != b for a, b, _ in rows)  # the members really differ
    monkeypatch.setenv(ensembles.ENSEMBLE_ENV, ensembles.ensemble_spec(two_rms + two_rms[:1], penalty=2.0))
    call = dict(prompts=prompts, completions=COMPLETIONS)
    assert ensembles.ensemble_min(**call) == pytest.approx([min(r) for r in rows], abs=1e-5)
    assert ensembles.ensemble_mean(**call) == pytest.approx([sum(r) / 3 for r in rows], abs=1e-5)
    uwo = [statistics.fmean(r) - 2.0 * statistics.stdev(r) for r in rows]
    assert ensembles.ensemble_uwo(**call) == pytest.approx(uwo, abs=1e-5)
    monkeypatch.setenv(ensembles.ENSEMBLE_ENV, ensembles.ensemble_spec(two_rms, penalty=0.0))  # read at each call
    assert ensembles.ensemble_uwo(**call) == pytest.approx([(a + b) / 2 for a, b, _ in rows], abs=1e-5)


def test_the_objective_as_a_value_needs_no_environment(two_rms, monkeypatch):
    import pickle

    monkeypatch.delenv(ensembles.ENSEMBLE_ENV, raising=False)
    prompts = ["customer : my order is late agent :"] * len(COMPLETIONS)
    members = two_rms + two_rms[:1]
    value = pickle.loads(pickle.dumps(ensembles.EnsembleObjective("uwo", tuple(members), 2.0)))  # as a worker gets it
    assert value.__name__ == "ensemble_uwo"
    monkeypatch.setenv(ensembles.ENSEMBLE_ENV, ensembles.ensemble_spec(members, penalty=2.0))
    call = dict(prompts=prompts, completions=COMPLETIONS)
    expected = ensembles.ensemble_uwo(**call)
    monkeypatch.delenv(ensembles.ENSEMBLE_ENV)
    assert value(**call) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ensembles.EnsembleObjective("min", tuple(two_rms[:1]))


def test_a_point_trains_on_the_handed_over_value_not_on_the_dotted_path():
    from types import SimpleNamespace

    from hf_rlhf_ext.rewards import import_reward_func

    path = "hf_rlhf_ext.experiments.ensembles.ensemble_min"

    def gold(prompts=None, completions=None, **kwargs):
        return [0.0] * len(completions)

    value = ensembles.EnsembleObjective("min", ("/rm/a", "/rm/b"), 1.0)
    setup = SimpleNamespace(reward_funcs=[import_reward_func(path), gold], reward_weights=[1.0, 0.0])
    sweeps._hand_over_rewards(setup, {path: value})
    assert setup.reward_funcs == [value, gold]
    assert sweeps._split_rewards(setup) == ([(value, 1.0)], gold)


def test_env_objectives_without_members_fail_clearly(monkeypatch, two_rms):
    monkeypatch.delenv(ensembles.ENSEMBLE_ENV, raising=False)
    with pytest.raises(ValueError, match="HF_RLHF_EXT_ENSEMBLE is not set"):
        ensembles.ensemble_min(prompts=["p"], completions=["c"])
    monkeypatch.setenv(ensembles.ENSEMBLE_ENV, ensembles.ensemble_spec(two_rms[:1], 1.0))
    with pytest.raises(ValueError, match="at least 2"):
        ensembles.ensemble_mean(prompts=["p"], completions=["c"])


# ----------------------------------------------------------------------------------------------------------------------
# Each objective's sweep command line
# ----------------------------------------------------------------------------------------------------------------------
def test_each_objective_gets_a_sweep_command_line_the_sweep_parses(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("objectives: [single, uwo]\npenalty: 0.5\nk: 4\nlearning_rate: 1.0e-4\nseeds: [3, 4]\n")
    argv = ["--config", str(config), "--max_steps", "7", "--gold_reward", "my.gold", "--beta", "0.01",
            "--output_dir", str(tmp_path / "out")]
    ens, sweep, script, training, _ = ensembles.parse_argv(argv)
    assert (ens.objectives, ens.penalty, ens.k, training.beta) == (["single", "uwo"], 0.5, 4, 0.01)
    ens, spec = ensembles.parse_spec(argv)
    parsed = {}
    for objective in ens.objectives:
        s = ensembles.objective_spec(spec, objective, ens, "/rm/single", ["/rm/a", "/rm/b"], 1)
        parsed[objective] = (s.sweep, s.script, s.training_args(), s.model)
    s_sweep, s_script, s_train, _ = parsed["single"]
    assert (s_sweep.betas, s_sweep.seeds, s_train.max_steps, s_train.learning_rate) == ([0.01], [3, 4], 7, 1e-4)
    assert s_script.reward_model_name_or_path == "/rm/single" and s_script.reward_funcs == ["my.gold"]
    assert list(s_train.reward_weights) == [1.0, 0.0] and s_script.track_gold is False
    u_script, u_train = parsed["uwo"][1], parsed["uwo"][2]
    assert u_script.reward_funcs == ["hf_rlhf_ext.experiments.ensembles.ensemble_uwo", "my.gold"]
    assert u_script.reward_model_name_or_path is None
    assert (u_train.output_dir == str(tmp_path / "out" / "uwo")
            and s_train.output_dir == str(tmp_path / "out" / "single"))


def test_the_shipped_config_runs_the_ppo_sweeps_with_its_beta_as_kl_coef(tmp_path):
    from hf_rlhf_ext.run.parsing import shipped_config_path

    argv = ["--trainer", "ppo", "--config", str(shipped_config_path("rm_ensemble_lab.yaml")),
            "--output_dir", str(tmp_path / "out")]
    ens, sweep, script, training, _ = ensembles.parse_argv(argv)
    ens, spec = ensembles.parse_spec(argv)
    objective = ensembles.objective_spec(spec, ens.objectives[0], ens, "/rm/single", ["/rm/a", "/rm/b"], 1)
    s_sweep, s_train = objective.sweep, objective.training_args()
    assert s_sweep.trainer == "ppo" and s_sweep.betas == [training.kl_coef] == [0.005]
    assert s_train.max_steps == 80


@pytest.mark.parametrize("argv, message", [
    (["--objectives", "single", "median"], "--objectives must be a non-empty subset"),
    (["--objectives", "min", "min"], "Repeated objective"),
    (["--k", "1"], "--k must be >= 2"),
    (["--penalty", "-0.5"], "--penalty must be a finite number >= 0"),
    (["--ensemble_reward_models", "only_one"], "at least 2 directories"),
    (["--betas", "0", "0.1"], "--betas is set by the experiment"),
    (["--reward_funcs", "my.rm"], "--reward_funcs is set by the experiment"),
])
def test_bad_arguments_are_refused_before_training(tmp_path, argv, message):
    import runpy

    main = runpy.run_path(str(ROOT / "recipes" / "rm_ensemble.py"))["main"]
    with pytest.raises(ValueError, match=message):
        main([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Running with fake points: routing, environment, resume, refusal
# ----------------------------------------------------------------------------------------------------------------------
FAKE_GOLD = {"proxy": [0.2, 0.7, 0.1], "ensemble_mean": [0.2, 0.5, 0.4], "ensemble_min": [0.2, 0.4, 0.45]}


@pytest.fixture
def fake_points(monkeypatch):
    """``sweeps.run_point`` replaced: a curve chosen by the optimised reward of the point; records the calls and the
    ensemble the point hands over as a value (its members and λ)."""
    calls = []

    def run_point(point, beta, seed):
        script = point.script
        key = script.reward_funcs[0].rsplit(".", 1)[1] if script.reward_funcs else "proxy"
        value = point.rewards.get(script.reward_funcs[0]) if script.reward_funcs else None
        assert ensembles.ENSEMBLE_ENV not in ensembles.os.environ  # the objective is a value, not the environment
        calls.append((key, seed, value and {"members": list(value.members), "penalty": value.penalty}))
        return {**fake_run(FAKE_GOLD[key], seed), "beta": beta, "seconds": 0.0}

    monkeypatch.setattr(sweeps, "run_point", run_point)
    return calls


def test_run_routes_each_objective_and_resumes(tmp_path, fake_points):
    out = tmp_path / "out"
    argv = ["--objectives", "single", "mean", "min", "--ensemble_reward_models", "rm_a", "rm_b", "--seeds", "0", "1",
            "--penalty", "0.3", "--output_dir", str(out)]
    m = ensembles.run_experiment(argv)
    assert sorted((k, s) for k, s, _ in fake_points) == [(k, s) for k in ("ensemble_mean", "ensemble_min", "proxy")
                                                         for s in (0, 1)]
    env = next(e for k, _, e in fake_points if k == "ensemble_min")
    assert env["penalty"] == 0.3 and [Path(p).name for p in env["members"]] == ["rm_a", "rm_b"]
    assert m["objectives"]["single"]["fall"]["mean"] == pytest.approx(0.6)  # 0.7 → 0.1
    assert m["objectives"]["min"]["fall"]["mean"] == pytest.approx(0.0)
    assert m["objectives"]["mean"]["end_gold"]["mean"] == pytest.approx(0.4)
    assert (out / "ensemble.md").is_file() and (out / "min" / "results.jsonl").is_file()
    del fake_points[:]
    ensembles.run_experiment(argv)
    assert fake_points == []  # everything was finished
    with pytest.raises(ValueError, match="optimised with"):  # other members: not the same experiment
        ensembles.run_experiment([*argv[:-2], "--ensemble_reward_models", "rm_a", "rm_c", "--output_dir", str(out)])
    assert fake_points == []


def test_off_the_lab_a_gold_reward_is_required(tmp_path, fake_points):
    with pytest.raises(ValueError, match="--gold_reward"):
        ensembles.run_experiment(["--dataset_name", "x", "--model_name_or_path", "y", "--ensemble_reward_models",
                                  "a", "b", "--output_dir", str(tmp_path)])


def test_lab_config_file_spells_out_the_defaults():
    from_file = ensembles.parse_argv(["--config", str(ROOT / "recipes/configs/rm_ensemble_lab.yaml")])
    default = ensembles.parse_argv([])
    def values(x) -> dict:  # every setting; the settings line names where they came from, so it differs
        return {k: v for k, v in (x.to_dict() if hasattr(x, "to_dict") else vars(x)).items() if k != "settings_line"}

    for a, b in zip(from_file, default):
        assert values(a) == values(b)


# ----------------------------------------------------------------------------------------------------------------------
# The lab
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lab_run_mean_and_min_in_parallel(tmp_path, lab):
    """Two objectives, one seed, 10 steps, in two processes. Step 0 is the same SFT policy and the same held-out
    sampling seed in both runs, so both measure the same completions: same gold, and the worst case of the members
    below their mean. Each run's training log names the objective TRL optimised."""
    out = tmp_path / "out"
    argv = ["--objectives", "mean", "min", "--seeds", "0", "--max_steps", "10", "--eval_every", "5",
            "--num_eval_prompts", "64", "--max_parallel", "2", "--output_dir", str(out)]
    m = ensembles.run_experiment(argv)
    runs = {o: ensembles.read_runs(str(out / o), 0.005, [0])[0] for o in ("mean", "min")}
    mean0, min0 = runs["mean"]["curve"][0], runs["min"]["curve"][0]
    assert [p["step"] for p in runs["min"]["curve"]] == [0, 5, 10]
    assert mean0["gold"] == pytest.approx(min0["gold"], abs=1e-9)
    assert min0["proxy"] < mean0["proxy"] - 0.05  # members disagree: min well below the mean on the same samples
    for o in ("mean", "min"):
        assert runs[o]["curve"][-1]["kl"] > 0.05  # the policy moved
        log = (out / o / "points" / "grpo_beta0.005_seed0" / "log_history.jsonl").read_text()
        assert f"rewards/ensemble_{o}/mean" in log and "rewards/proxy_reward" not in log
        assert m["objectives"][o]["end_gold"]["mean"] == runs[o]["curve"][-1]["gold"]
    assert math.isfinite(m["objectives"]["min"]["fall"]["mean"])

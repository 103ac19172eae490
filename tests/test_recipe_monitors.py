"""``--monitor``: our callbacks attached to the RL recipes from the command line or the YAML config."""

from __future__ import annotations

import pytest
from _recipe_helpers import load_recipe, recipe_world, run_recipe

from hf_rlhf_ext.results import read_log_history, read_metrics
from hf_rlhf_ext.run.spec import parse_monitors

_recipe, _run = load_recipe, run_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return recipe_world(tmp_path_factory.mktemp("monitor_world"))


def _argv(tiny, out, *extra: str) -> list[str]:
    # target_word optimised, word_count tracked at weight 0: the over-optimisation monitor's proxy and gold
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "_ppo_helpers.target_word", "test_sweeps.word_count", "--reward_weights", "1", "0",
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--max_completion_length", "6", "--logging_steps", "1", "--num_eval_prompts", "4", "--disable_tqdm", "true",
            "--beta", "0.1", "--num_generations", "2", *extra]


def test_named_monitors_log_their_measurements_and_report_in_metrics(tiny, tmp_path):
    _run("grpo", _argv(tiny, tmp_path, "--monitor", "overoptimization,kl,advantages",
                       "--monitor_every_n_steps", "1", "--monitor_num_samples", "4"))
    logs = read_log_history(str(tmp_path))
    steps_with = lambda prefix: [r["step"] for r in logs if any(k.startswith(prefix) for k in r)]  # noqa: E731
    assert steps_with("kl_ref/k3_seq") == steps_with("kl_ref/exact_seq") == [1, 2]  # the exact KL beside k3
    assert steps_with("adv_check/") == [1, 2]  # the batches generated for steps 1 and 2
    assert steps_with("overopt/gold") == [1, 2]
    monitors = read_metrics(str(tmp_path))["monitors"]
    assert monitors["overoptimization"]["gold_name"] == "word_count"
    assert monitors["overoptimization"]["proxy_name"] == "target_word"
    assert [m["step"] for m in monitors["kl"]] == [0, 1, 2]  # step 0: the sanity measurement at train begin
    assert monitors["advantages"]["checked_batches"] == 2 and monitors["advantages"]["violations"] == []
    assert (tmp_path / "overoptimization.png").is_file()


def test_the_gold_peak_forecast_is_on_by_default_and_monitor_forecast_false_turns_it_off(tiny, tmp_path):
    import json

    for flag in ("default", "true", "false"):
        out = tmp_path / flag
        extra = [] if flag == "default" else ["--monitor_forecast", flag]
        _run("grpo", _argv(tiny, out, "--monitor", "overoptimization", *extra))
        points = json.loads((out / "overoptimization.json").read_text())["points"]
        # two measurements: too few for a forecast, and the points say so only when it is on
        assert all(("forecast_reason" in p) == (flag != "false") for p in points) and points


def test_monitor_none_attaches_nothing(tiny, tmp_path):
    _run("grpo", _argv(tiny, tmp_path, "--monitor", "none"))
    assert "monitors" not in read_metrics(str(tmp_path))
    assert not any(k.startswith(("kl_ref/", "adv_check/", "overopt/")) for r in read_log_history(str(tmp_path))
                   for k in r)


def test_auto_leaves_out_what_does_not_apply_and_a_named_one_that_cannot_apply_fails(tiny, tmp_path):
    _run("ppo", _argv(tiny, tmp_path / "auto", "--monitor", "auto", "--kl_coef", "0.1"))  # PPO's β is kl_coef
    assert set(read_metrics(str(tmp_path / "auto"))["monitors"]) == {"overoptimization", "kl"}  # PPO has no groups
    with pytest.raises(ValueError, match="--monitor advantages: PPOTrainer does not compute TRL's group advantages"):
        _run("ppo", _argv(tiny, tmp_path / "named", "--monitor", "advantages", "--kl_coef", "0.1"))


def test_monitor_names_are_checked_when_parsed():
    assert parse_monitors("overoptimization, kl") == ["overoptimization", "kl"]
    assert parse_monitors(["kl", "grad_variance"]) == ["kl", "grad_variance"]  # a YAML list
    assert parse_monitors("auto") is None and parse_monitors("none") == []
    with pytest.raises(ValueError, match="Unknown --monitor klx: choose among overoptimization, kl"):
        _recipe("grpo").make_parser().parse_args_and_config(args=["--monitor", "klx"])

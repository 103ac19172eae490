"""The RL recipes (recipes/ppo.py, recipes/grpo.py) and their shared plumbing (hf_rlhf_ext.recipe_utils).

Fast tests run the recipes in-process on tiny stand-in models (``--model_name_or_path``, ``--dataset_name``,
``--reward_funcs``); the lab runs, the acceptance test and the two-process run are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _ppo_helpers import build_world, prompts
from hf_rlhf_ext.results import read_log_history, read_metrics
from hf_rlhf_ext.validation import DataValidationError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, argv: list[str]) -> dict:
    recipe = _recipe(name)
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(args=argv)
    return recipe.main(script_args, training_args, model_args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_world")
    paths = build_world(str(root))
    data_dir = root / "prompts"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        for p in prompts(16)["prompt"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    bad_dir = root / "bad"
    bad_dir.mkdir()
    with open(bad_dir / "train.jsonl", "w") as f:
        f.write(json.dumps({"question": "hello"}) + "\n")
    return {**paths, "data": str(data_dir), "bad": str(bad_dir)}


def _tiny_argv(tiny, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--logging_steps", "1",
            "--num_eval_prompts", "4", "--disable_tqdm", "true", *extra]


def test_ppo_recipe_on_a_hub_style_model_writes_the_results_contract(tiny, tmp_path):
    metrics = _run("ppo", _tiny_argv(tiny, tmp_path, "--reward_model_name_or_path", tiny["reward"]))
    written = read_metrics(str(tmp_path))
    assert written["global_step"] == metrics["global_step"] == 2
    assert written["on_lab"] is False and written["reward_funcs"] == ["reward", "target_word"]
    assert set(written["eval_before"]) >= {"reward", "target_word", "eos_rate", "mean_length"}
    assert "kl_to_reference" in written["eval_after"] and len(written["samples_after"]) == 4
    logs = read_log_history(str(tmp_path))
    assert [r["step"] for r in logs if "objective/kl" in r] == [1, 2]
    assert (tmp_path / "value_model" / "value_head.safetensors").is_file()
    assert (tmp_path / "model.safetensors").is_file()


def test_ppo_recipe_with_lora_and_a_critic_on_the_shared_base(tiny, tmp_path):
    _run("ppo", _tiny_argv(tiny, tmp_path, "--use_peft", "--critic_shares_base", "true"))  # PEFT picks c_attn
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "value_model" / "adapter" / "adapter_model.safetensors").is_file()
    assert read_metrics(str(tmp_path))["eval_after"]["kl_to_reference"] is not None


def test_grpo_recipe_runs_with_the_same_plumbing(tiny, tmp_path):
    _run("grpo", _tiny_argv(tiny, tmp_path, "--num_generations", "2"))
    written = read_metrics(str(tmp_path))
    assert written["global_step"] == 2 and "target_word" in written["eval_after"]
    assert any("rewards/target_word/mean" in r for r in read_log_history(str(tmp_path)))


def test_recipe_refuses_a_dataset_without_prompts(tiny, tmp_path):
    argv = _tiny_argv(tiny, tmp_path)
    argv[argv.index("--dataset_name") + 1] = tiny["bad"]
    with pytest.raises(DataValidationError, match="prompt"):
        _run("ppo", argv)


def test_reward_funcs_are_imported_and_validated():
    from hf_rlhf_ext.recipe_utils import import_reward_func

    func = import_reward_func("_ppo_helpers.target_word")
    assert func.__name__ == "target_word"
    assert func(prompts=["a"], completions=["good good"]) == [1.0]
    with pytest.raises(ValueError, match="Unknown reward function"):
        import_reward_func("no_such_reward")


def test_config_files_parse(tmp_path):
    for name in ("ppo", "grpo"):
        parser = _recipe(name).make_parser()
        script_args, training_args, _ = parser.parse_args_and_config(
            args=["--config", str(ROOT / "recipes" / "configs" / f"{name}_lab.yaml"), "--output_dir", str(tmp_path)]
        )
        assert training_args.learning_rate == 1e-4 and training_args.max_steps == 60
        assert script_args.track_gold is True
    _, ppo_args, _ = _recipe("ppo").make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "recipes" / "configs" / "ppo_lab.yaml")])
    assert (ppo_args.kl_coef, ppo_args.beta, ppo_args.num_generations) == (0.1, 0.1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# On the lab (slow: the first call builds the lab, then every run trains for real)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ppo_recipe_on_the_lab_tracks_gold_without_steering(tmp_path):
    _run("ppo", ["--output_dir", str(tmp_path), "--max_steps", "4", "--logging_steps", "2",
                 "--num_eval_prompts", "16", "--disable_tqdm", "true"])
    written = read_metrics(str(tmp_path))
    assert written["on_lab"] is True
    assert written["reward_funcs"] == ["proxy_reward", "gold_reward"] and written["reward_weights"] == [1.0, 0.0]
    logs = [r for r in read_log_history(str(tmp_path)) if "objective/scores" in r]
    assert len(logs) == 2 and all("rewards/gold_reward/mean" in r for r in logs)
    # weight 0: the score PPO optimises is the proxy alone
    assert all(r["objective/scores"] == pytest.approx(r["rewards/proxy_reward/mean"], abs=1e-5) for r in logs)


@pytest.mark.slow
def test_acceptance_ppo_raises_held_out_gold_with_bounded_kl(tmp_path):
    """The default lab run: held-out gold of the trained policy clearly above the SFT policy's, KL bounded."""
    _run("ppo", ["--output_dir", str(tmp_path), "--num_eval_prompts", "320", "--disable_tqdm", "true"])
    m = read_metrics(str(tmp_path))
    gain = m["gold_reward_after"] - m["gold_reward_before"]
    assert gain > 0.08, m["eval_after"]  # 320 samples: the standard error of each mean is ≈ 0.035
    assert m["proxy_reward_after"] > m["proxy_reward_before"]
    assert 0.0 < m["kl_after"] < 5.0  # nats per completion, on fresh samples
    logs = [r for r in read_log_history(str(tmp_path)) if "objective/kl" in r]
    assert max(r["objective/kl"] for r in logs) < 5.0
    assert logs[-1]["val/explained_variance"] > 0.0  # the critic learned something beyond the mean


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes_match_one(tmp_path):
    """PPO on 2 gloo ranks (global batch 32 = 2 × 16) against 1 process (32): one log record per step, same
    bookkeeping, the same initial statistics, and a critic saved once."""
    config = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
    if config.is_file():
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    common = ["--max_steps", "3", "--logging_steps", "1", "--num_eval_prompts", "8", "--disable_tqdm", "true",
              "--use_cpu", "true"]
    two = subprocess.run([*launcher, str(ROOT / "recipes" / "ppo.py"), "--output_dir", str(tmp_path / "two"),
                          "--per_device_train_batch_size", "16", *common],
                         capture_output=True, text=True, env=ENV, timeout=900, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(ROOT / "recipes" / "ppo.py"), "--output_dir", str(tmp_path / "one"),
                          "--per_device_train_batch_size", "32", *common],
                         capture_output=True, text=True, env=ENV, timeout=900, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    logs = {k: [r for r in read_log_history(str(tmp_path / k)) if "objective/kl" in r] for k in ("one", "two")}
    assert [r["step"] for r in logs["two"]] == [r["step"] for r in logs["one"]] == [1, 2, 3]  # no duplicate ranks
    for a, b in zip(logs["one"], logs["two"]):
        assert b["num_tokens"] == pytest.approx(a["num_tokens"], rel=0.3)  # both count 32 completions per step
    for run in logs.values():
        assert abs(run[0]["objective/kl"]) < 0.05 and run[0]["val/ratio"] == pytest.approx(1.0)
        assert run[0]["kl_coef"] == pytest.approx(0.1)
    assert (tmp_path / "two" / "value_model" / "value_head.safetensors").is_file()
    assert read_metrics(str(tmp_path / "two"))["global_step"] == 3

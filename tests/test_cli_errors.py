"""Errors from the command line print once, in one readable line (exit code 2 for bad input), before any training;
real bugs keep their traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _ppo_helpers import build_world, prompts

from hf_rlhf_ext.run.errors import cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_cli_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve a recipe's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _cli(capsys, name: str, argv: list[str]) -> tuple[int, str]:
    """Runs a recipe as its ``__main__`` does; returns (exit code, stderr)."""
    recipe = _recipe(name)
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: recipe.main(*recipe.make_parser().parse_args_and_config(args=argv)))
    return info.value.code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len([line for line in lines if "error:" in line]) == 1, stderr
    return next(line for line in lines if "error:" in line)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_world")
    paths = build_world(str(root))
    with open(root / "prompts.jsonl", "w") as f:
        for p in prompts(8)["prompt"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    with open(root / "questions.jsonl", "w") as f:
        f.write(json.dumps({"question": "hello", "answer": "hi"}) + "\n")
    with open(root / "long.jsonl", "w") as f:
        f.write(json.dumps({"prompt": " ".join(["good"] * 70)}) + "\n")
    return {**paths, "data": str(root / "prompts.jsonl"), "questions": str(root / "questions.jsonl"),
            "long": str(root / "long.jsonl")}


def _argv(tiny, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6",
            "--num_eval_prompts", "0", "--disable_tqdm", "true", *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# ----------------------------------------------------------------------------------------------------------------------
# The real command line: one line, no traceback (also under `accelerate launch -q`)
# ----------------------------------------------------------------------------------------------------------------------
def test_a_missing_model_path_prints_one_line_and_exits_2(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), "--model_name_or_path", "/nonexistent",
                          "--output_dir", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 2
    line = _one_error_line(run.stderr)
    assert line.startswith("grpo.py: error: --model_name_or_path '/nonexistent': no such file or directory")
    assert not any(tmp_path.iterdir())  # nothing started


def test_under_accelerate_launch_a_config_error_prints_once(tmp_path):
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--cpu",
                          str(ROOT / "recipes" / "ppo.py"), "--kl_coef", "-1", "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode != 0
    assert _one_error_line(run.stderr) == "ppo.py: error: kl_coef must be >= 0, got -1.0"


# ----------------------------------------------------------------------------------------------------------------------
# Each bad input, through the recipes' entry point (in-process)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe, change, message",
    [("grpo", ("--beta", "-1"), r"beta \(the KL coefficient β\) must be a finite number >= 0, got -1.0"),
     ("grpo", ("--max_completion_length", "0"), "max_completion_length must be >= 1"),
     ("reinforce", ("--beta", "-2"), r"beta \(the KL coefficient β\) must be a finite number >= 0"),
     ("ppo", ("--cliprange", "0"), r"cliprange \(the ratio clip ε\) must be > 0"),
     ("grpo", ("--num_generations", "3"), r"generation_batch_size \(4\) must be divisible by num_generations \(3\)"),
     ("grpo", ("--reward_funcs", "no_such_rewards.length"), "cannot import module 'no_such_rewards'"),
     ("grpo", ("--reward_funcs", "_ppo_helpers.nope"), "module '_ppo_helpers' .* has no attribute 'nope'"),
     ("grpo", ("--dataset_name", "/no/such/prompts.jsonl"), "--dataset_name '/no/such/prompts.jsonl': no such file"),
     ("grpo", ("--reward_model_name_or_path", "/no/such/rm"), "--reward_model_name_or_path '/no/such/rm': no such"),
     ("grpo", ("--model_name_or_path", "/no/such/model"), "--model_name_or_path '/no/such/model': no such file")],
)
def test_bad_input_exits_2_with_one_line_naming_it(capsys, tiny, tmp_path, recipe, change, message):
    flag, value = change
    argv = _argv(tiny, tmp_path)
    argv = _replace(argv, flag, value) if flag in argv else [*argv, flag, value]
    if recipe == "ppo":
        argv = _replace(argv, "--num_generations", "1")
    code, stderr = _cli(capsys, recipe, argv)
    assert code == 2
    import re

    assert re.search(message, _one_error_line(stderr)), stderr


def test_misnamed_prompt_column_names_the_columns_there(capsys, tiny, tmp_path):
    code, stderr = _cli(capsys, "grpo", _replace(_argv(tiny, tmp_path), "--dataset_name", tiny["questions"]))
    assert code == 2
    assert "split 'train') has no column(s) ['prompt']; it needs ['prompt'] and has ['question', 'answer']" in stderr


def test_prompts_longer_than_the_policy_context_are_refused(capsys, tiny, tmp_path):
    code, stderr = _cli(capsys, "grpo", _replace(_argv(tiny, tmp_path), "--dataset_name", tiny["long"]))
    assert code == 2
    assert "1 prompt(s) do not fit the model's context of 64 tokens with max_completion_length=6" in stderr


@pytest.mark.parametrize("drop", [["--reward_funcs", "_ppo_helpers.target_word"], ["--dataset_name", None]])
def test_a_model_of_ones_own_needs_its_own_reward_and_prompts(capsys, tiny, tmp_path, drop):
    argv = _argv(tiny, tmp_path)
    i = argv.index(drop[0])
    del argv[i : i + 2]
    code, stderr = _cli(capsys, "grpo", argv)
    assert code == 2
    line = _one_error_line(stderr)
    assert "is not the lab's policy" in line
    assert ("reward (--reward_funcs" in line) == (drop[0] == "--reward_funcs")
    assert ("prompts (--dataset_name)" in line) == (drop[0] == "--dataset_name")


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantization_flags_are_refused_where_they_cannot_work(capsys, tiny, tmp_path, flag):
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes on CUDA: the flag is honoured here")
    code, stderr = _cli(capsys, "grpo", [*_argv(tiny, tmp_path), flag, "true", "--use_peft"])
    assert code == 2
    assert f"{flag} needs a CUDA GPU and the bitsandbytes package" in _one_error_line(stderr)


def test_quantization_without_peft_is_refused():
    from types import SimpleNamespace

    from hf_rlhf_ext.run.build import quantization_kwargs
    from hf_rlhf_ext.validation import InputError

    model_args = SimpleNamespace(load_in_4bit=True, load_in_8bit=False, use_peft=False)
    with pytest.raises(InputError, match=r"--load_in_4bit (needs a CUDA GPU|quantizes the policy.*--use_peft)"):
        quantization_kwargs(model_args, SimpleNamespace())


def test_a_single_jsonl_file_is_a_data_set(tiny, tmp_path):
    recipe = _recipe("grpo")
    metrics = recipe.main(*recipe.make_parser().parse_args_and_config(args=_argv(tiny, tmp_path)))
    assert metrics["global_step"] == 1


def test_a_reward_fault_exits_1_with_the_saved_file_named(capsys, tiny, tmp_path):
    argv = _replace(_argv(tiny, tmp_path), "--reward_funcs", "test_reward_guard.nan_on_first")
    code, stderr = _cli(capsys, "grpo", argv)
    assert code == 1
    line = _one_error_line(stderr)
    assert "Reward function 'nan_on_first' returned nan" in line
    assert str(tmp_path / "reward_faults") in line


def test_the_grpo_recipe_drops_nan_rewards_when_asked(tiny, tmp_path):
    from hf_rlhf_ext.results import read_log_history

    recipe = _recipe("grpo")
    argv = [*_replace(_argv(tiny, tmp_path), "--reward_funcs", "test_reward_guard.nan_on_first"),
            "--nan_rewards", "drop", "--logging_steps", "1"]
    recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))
    (log,) = [r for r in read_log_history(str(tmp_path)) if "reward_guard/dropped" in r]
    assert log["reward_guard/dropped"] == 1.0
    assert not (tmp_path / "reward_faults").exists()


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli_main(lambda: 1 / 0)


def test_the_console_entry_point_returns_the_recipe_exit_code(capsys):
    from hf_rlhf_ext.cli import main

    assert main(["best-of-n", "--n", "0"]) == 2
    assert _one_error_line(capsys.readouterr().err) == "hf-rlhf-ext best-of-n: error: --n must be >= 1, got 0."


@pytest.mark.parametrize("flag, what", [("--model_name_or_path", "no/such/rm/dir"),
                                        ("--dataset_name", "/no/such/pairs.jsonl")])
def test_the_reward_recipe_names_a_missing_path(capsys, tmp_path, flag, what):
    code, stderr = _cli(capsys, "reward", ["--output_dir", str(tmp_path), flag, what])
    assert code == 2
    assert f"{flag} '{what}': no such file or directory" in _one_error_line(stderr)


# ----------------------------------------------------------------------------------------------------------------------
# The last tracebacks: each is one line and exit code 2 now
# ----------------------------------------------------------------------------------------------------------------------
def _main_cli(capsys, name: str, argv: list[str]) -> tuple[int, str]:
    """Runs a recipe whose ``main`` takes the raw argv (compare, sweep) as its ``__main__`` does."""
    recipe = _recipe(name)
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: recipe.main(argv))
    return info.value.code, capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_refused_before_anything_runs(capsys, tiny, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    code, stderr = _cli(capsys, "grpo", _argv(tiny, existing))
    assert code == 2
    assert f"--output_dir '{existing}' is a file, not a folder" in _one_error_line(stderr)
    assert existing.read_text() == "mine"


def test_lora_target_modules_the_model_lacks_name_the_layers_it_has(capsys, tiny, tmp_path):
    code, stderr = _cli(capsys, "grpo", [*_argv(tiny, tmp_path), "--use_peft", "--lora_target_modules", "q_proj",
                                         "v_proj"])
    assert code == 2
    line = _one_error_line(stderr)
    assert "--lora_target_modules: none of them is a layer of this model (GPT2LMHeadModel)" in line
    assert "['c_attn', 'c_fc', 'c_proj']: e.g. --lora_target_modules c_attn, or all-linear" in line


def test_a_flag_the_comparison_sets_per_trainer_exits_2(capsys):
    code, stderr = _main_cli(capsys, "compare", ["--beta", "0.1"])
    assert code == 2
    assert _one_error_line(stderr).endswith("error: --beta is set per trainer by the comparison; use --grpo_beta "
                                            "instead.")


def test_resuming_a_sweep_with_another_config_exits_2(capsys, tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"header": True, "fingerprint": "0", "config": {}}) + "\n")
    code, stderr = _main_cli(capsys, "beta_sweep", ["--output_dir", str(tmp_path)])
    assert code == 2
    assert "was written by a sweep with a different config" in _one_error_line(stderr)


def test_an_unknown_flag_gets_the_closest_known_ones(capsys, tiny, tmp_path):
    code, stderr = _cli(capsys, "grpo", [*_argv(tiny, tmp_path), "--lerning_rate", "0.1", "--no_such_flag", "1"])
    assert code == 2
    assert ("unknown flag(s): --lerning_rate (did you mean --learning_rate?), --no_such_flag; --help lists every "
            "flag.") in _one_error_line(stderr)


def test_the_report_command_suggests_a_flag_too(capsys):
    from hf_rlhf_ext.cli import main

    assert main(["report", "--quik"]) == 2
    assert "unknown flag(s): --quik (did you mean --quick?)" in _one_error_line(capsys.readouterr().err)


def test_a_stray_value_is_named(capsys, tiny, tmp_path):
    code, stderr = _cli(capsys, "grpo", [*_argv(tiny, tmp_path), "stray"])
    assert code == 2
    assert "unexpected value(s) ['stray']: each value follows its flag (--name value)." in _one_error_line(stderr)


def test_an_error_under_an_open_progress_bar_gets_a_line_of_its_own(capsys):
    """The Trainer's bar is still drawn when a fault ends the run: the one line starts on a fresh line (tqdm clears
    the bar first), not glued to the bar's text where its next redraw would overwrite it."""
    import sys

    from tqdm.auto import tqdm

    from hf_rlhf_ext.validation import InputError

    def fails_mid_training():
        bar = tqdm(total=10, file=sys.stderr, desc="train")
        bar.update(3)
        raise InputError("rewards are NaN at step 3")

    with pytest.raises(SystemExit) as exit_:
        cli_main(fails_mid_training)
    err = capsys.readouterr().err
    at = err.index(": error: rewards are NaN at step 3")
    line = err[max(err.rfind("\n", 0, at), err.rfind("\r", 0, at)) + 1 : at]  # the message's line, up to ': error'
    assert exit_.value.code == 2
    assert "it/s" not in line and "train" not in line, repr(err)


def test_the_console_summary_shows_chat_prompts_as_turns_not_python_lists():
    from hf_rlhf_ext.run.finish import summary_text

    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "my kettle is broken"}]
    reply = [{"role": "assistant", "content": "sorry"}]
    text = summary_text({"samples_before": [{"prompt": chat, "completion": reply}],
                         "samples_after": [{"prompt": chat, "completion": "we will repair it"}]})
    assert "prompt: system: be kind | user: my kettle is broken" in text
    assert "before: assistant: sorry" in text and "after:  we will repair it" in text
    assert "{'role'" not in text

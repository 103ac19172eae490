"""The lab's settings are the defaults on the lab only: a run on one's own model or prompts starts from TRL's
defaults, ``--help`` shows TRL's defaults with each lab value beside it, and a run says once where its settings
came from (command line, ``--config`` file, lab file, LoRA rule)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFF_LAB = [["--model_name_or_path", "some/model"], ["--dataset_name", "some/prompts"]]


def recipe(name: str):
    from hf_rlhf_ext.run.parsing import recipes_package

    return importlib.import_module(f"{recipes_package()}.{name}")


def grpo_parse(*argv: str):
    parser = recipe("grpo").make_parser()
    outputs = parser.parse_args_and_config(args=list(argv))
    return parser, outputs


@pytest.mark.parametrize("off_lab", OFF_LAB)
def test_off_the_lab_a_lab_key_has_trls_default(off_lab):
    import dataclasses

    from trl import GRPOConfig

    _, (script_args, training_args, _) = grpo_parse(*off_lab)
    trl = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}  # GRPOConfig() itself wants bf16 hardware
    assert training_args.max_completion_length == trl["max_completion_length"] != 24
    assert training_args.learning_rate == trl["learning_rate"] != 1e-4
    assert training_args.beta == trl["beta"] != 0.1
    assert training_args.max_steps == -1 and script_args.monitor == "none"


def test_on_the_lab_a_lab_key_has_the_yaml_value():
    _, (script_args, training_args, _) = grpo_parse()
    assert (training_args.max_completion_length, training_args.learning_rate, training_args.beta) == (24, 1e-4, 0.1)
    assert script_args.monitor == "auto"
    _, (_, training_args, _) = grpo_parse("--lab_dir", "/tmp/some-lab")  # --lab_dir is still the lab
    assert training_args.max_completion_length == 24


@pytest.mark.parametrize("where", [[], OFF_LAB[1]])
def test_an_explicit_flag_or_config_key_wins_on_and_off_the_lab(where, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.003\n")
    _, (_, training_args, _) = grpo_parse(*where, "--max_completion_length", "7", "--config", str(config))
    assert (training_args.max_completion_length, training_args.learning_rate) == (7, 0.003)


def test_a_config_file_naming_a_dataset_is_off_the_lab(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("dataset_name: some/prompts\n")
    parser, (_, training_args, _) = grpo_parse("--config", str(config))
    assert training_args.max_completion_length != 24 and parser.on_lab is False


def test_the_parser_defaults_stay_trls_after_a_lab_parse():
    parser, _ = grpo_parse()
    _, training_args, _ = parser.parse_args_and_config(args=OFF_LAB[0])
    assert training_args.max_completion_length != 24


def test_help_shows_trls_default_and_the_lab_value():
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "grpo.py"), "--help"], check=False,
                         capture_output=True, text=True, timeout=300)
    text = " ".join(run.stdout.split())
    assert run.returncode == 0
    assert "Maximum length of the generated completion. (lab: 24) (default: 512)" in text
    assert "(lab: 0.0001) (default: 1e-06)" in text and "(default: 24)" not in text
    assert "If `0.0` (default), the reference model is not loaded" in text  # TRL's own help, and its default:
    assert "(lab: 0.1) (default: 0.0)" in text and "(default: 0.1)" not in text  # no contradiction on --beta
    assert "On the offline lab (no --model_name_or_path and no --dataset_name)" in text
    assert "With --use_peft and no --learning_rate, the learning rate is 10 x its default (LoRA)." in text


def test_the_settings_line_names_each_source(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.003\n")
    parser, _ = grpo_parse("--max_steps", "3", "--output_dir", str(tmp_path), "--config", str(config))
    assert parser.settings == ("settings: command line: max_steps, output_dir; run.yaml: learning_rate; "
                               "lab defaults (grpo_lab.yaml): 18 settings")  # the other 18 of its 21
    parser, _ = grpo_parse("--dataset_name", "some/prompts", "--max_steps", "3")
    assert parser.settings == ("settings: command line: dataset_name, max_steps; off the lab: grpo_lab.yaml NOT "
                               "applied (TRL's defaults)")


def test_the_settings_line_states_the_lora_rule():
    parser, (_, training_args, _) = grpo_parse("--use_peft")
    assert training_args.learning_rate == 1e-3
    assert parser.settings.endswith("; LoRA: learning_rate 0.001 = 10 × 0.0001 (set --learning_rate to choose)")
    parser, (_, training_args, _) = grpo_parse("--use_peft", "--dataset_name", "some/prompts")
    assert training_args.learning_rate == 1e-5 and "LoRA: learning_rate 1e-05 = 10 × 1e-06" in parser.settings


def test_a_command_line_run_prints_the_settings_line_once_on_the_main_process(monkeypatch, capsys):
    from hf_rlhf_ext.run import parsing as recipe_parsing

    monkeypatch.setattr(recipe_parsing, "_ANNOUNCED", set())
    monkeypatch.setattr(sys, "argv", ["grpo.py", "--max_steps", "3"])
    for _ in range(2):
        recipe("grpo").make_parser().parse_args_and_config()
    assert capsys.readouterr().err.count("settings: command line: max_steps; lab defaults (grpo_lab.yaml)") == 1
    monkeypatch.setattr(recipe_parsing, "_ANNOUNCED", set())
    monkeypatch.setenv("RANK", "1")
    recipe("grpo").make_parser().parse_args_and_config()
    assert "settings:" not in capsys.readouterr().err


def test_the_experiments_apply_their_lab_files_on_the_lab_only():
    import dataclasses

    from trl import GRPOConfig

    from hf_rlhf_ext.experiments import ensembles, sweeps

    trl_default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["max_completion_length"]
    lab = sweeps.lab_defaults("grpo")["max_completion_length"]
    assert sweeps.parse_sweep_argv([])[2].max_completion_length == lab != trl_default
    assert sweeps.parse_sweep_argv(OFF_LAB[1])[2].max_completion_length == trl_default
    assert ensembles.parse_argv([])[3].max_completion_length == lab
    assert ensembles.parse_argv(OFF_LAB[0])[3].max_completion_length == trl_default

"""Each recipe's lab settings live in one place, its YAML file in recipes/configs/: the parser's defaults come from it."""

from __future__ import annotations

import dataclasses
import enum
import importlib
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
RECIPES = ["ppo", "grpo", "reinforce", "reward", "best_of_n"]


def recipe(name: str):
    from hf_rlhf_ext.cli import recipes_package

    return importlib.import_module(f"{recipes_package()}.{name}")


def parsed_defaults(module) -> dict:
    outputs = module.make_parser().parse_args_and_config(args=[])
    values = {f.name: getattr(o, f.name) for o in outputs for f in dataclasses.fields(o)}
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}


@pytest.mark.parametrize("name", RECIPES)
def test_the_yaml_file_is_the_recipes_defaults(name, tmp_path, monkeypatch):
    module = recipe(name)
    assert not hasattr(module, "LAB_DEFAULTS")  # no second copy in Python
    assert module.LAB_CONFIG == CONFIGS / f"{name}_lab.yaml"
    written = yaml.safe_load(module.LAB_CONFIG.read_text())
    defaults = parsed_defaults(module)
    for key, value in written.items():
        if key != "report_to":  # TrainingArguments turns "none" into []
            assert defaults[key] == value, key
    edited = tmp_path / "edited.yaml"  # an edit of the file is what the recipe then runs with
    edited.write_text(yaml.safe_dump({**written, "output_dir": "runs/edited", "seed": 7}))
    monkeypatch.setattr(module, "LAB_CONFIG", edited)
    assert (parsed_defaults(module)["output_dir"], parsed_defaults(module)["seed"]) == ("runs/edited", 7)


def test_flags_and_config_files_override_the_lab_defaults(tmp_path):
    module = recipe("ppo")
    other = tmp_path / "other.yaml"
    other.write_text("kl_coef: 0.02\nmax_steps: 5\n")
    outputs = module.make_parser().parse_args_and_config(args=["--config", str(other), "--max_steps", "3"])
    training_args = outputs[1]
    assert (training_args.kl_coef, training_args.max_steps, training_args.critic_learning_rate) == (0.02, 3, 1e-3)


def test_an_unknown_key_in_a_lab_config_is_refused():
    from trl import GRPOConfig

    from hf_rlhf_ext.recipe_utils import RLScriptArguments, make_recipe_parser

    with pytest.raises(ValueError, match="max_stepz"):
        make_recipe_parser(RLScriptArguments, GRPOConfig, {"max_stepz": 3})

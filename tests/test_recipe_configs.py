"""Each recipe's and experiment's lab settings live in one place, its YAML file in recipes/configs/: the parser's
defaults come from it, ``--config`` the same file reproduces them, and no module holds a second copy."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
RECIPES = ["ppo", "grpo", "reinforce", "reward", "best_of_n"]


def recipe(name: str):
    from hf_rlhf_ext.run.parsing import recipes_package

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


@pytest.mark.parametrize("name", ["ppo", "grpo", "reinforce"])
def test_the_rl_recipes_save_checkpoints_on_the_lab_by_default(name):
    """Ctrl-C must not lose a default run: it saves several times before its last step (the last two kept)."""
    training_args = recipe(name).make_parser().parse_args_and_config(args=[])[1]
    assert training_args.save_strategy == "steps"
    assert 0 < training_args.save_steps < training_args.max_steps and training_args.save_total_limit == 2


def test_an_unknown_key_in_a_lab_config_is_refused():
    from trl import GRPOConfig

    from hf_rlhf_ext.run.parsing import make_recipe_parser
    from hf_rlhf_ext.run.spec import RLScriptArguments

    with pytest.raises(ValueError, match="max_stepz"):
        make_recipe_parser(RLScriptArguments, GRPOConfig, {"max_stepz": 3})


# ----------------------------------------------------------------------------------------------------------------------
# The experiments (hf_rlhf_ext.experiments.sweeps / compare / baselines / ensembles): per trainer where their
# defaults differ
# ----------------------------------------------------------------------------------------------------------------------
def experiments() -> dict:
    """name -> (parse(argv) of the experiment's command line, its lab YAML files, later ones on top)."""
    from hf_rlhf_ext.experiments import baselines, compare, ensembles, sweeps

    return {
        "beta_sweep-grpo": (sweeps.parse_sweep_argv, ["beta_sweep_lab.yaml"]),
        "beta_sweep-ppo": (lambda argv: sweeps.parse_sweep_argv(["--trainer", "ppo", *argv]),
                           ["beta_sweep_ppo_lab.yaml"]),
        "compare-ppo": (lambda argv: compare.parse_compare_argv(argv, "ppo"), ["compare_lab.yaml"]),
        "compare-grpo": (lambda argv: compare.parse_compare_argv(argv, "grpo"), ["compare_lab.yaml"]),
        "reinforce_baselines": (baselines.parse_baselines_argv, ["reinforce_baselines_lab.yaml"]),
        "rm_ensemble-grpo": (ensembles.parse_argv, ["beta_sweep_lab.yaml", "rm_ensemble_lab.yaml"]),
        "rm_ensemble-ppo": (lambda argv: ensembles.parse_argv(["--trainer", "ppo", *argv]),
                            ["beta_sweep_ppo_lab.yaml", "rm_ensemble_lab.yaml"]),
    }


EXPERIMENTS = ["beta_sweep-grpo", "beta_sweep-ppo", "compare-ppo", "compare-grpo", "reinforce_baselines",
               "rm_ensemble-grpo", "rm_ensemble-ppo"]
PPO_ONLY = {"critic_learning_rate", "num_ppo_epochs"}


def values_of(outputs) -> dict:
    values = {f.name: getattr(o, f.name) for o in outputs for f in dataclasses.fields(o) if f.name != "cli_args"}
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}


def written(files: list[str]) -> dict:
    out = {}
    for name in files:
        out.update(yaml.safe_load((CONFIGS / name).read_text()))
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_yaml_files_are_the_experiments_defaults(name):
    parse, files = experiments()[name]
    expected = written(files)
    if name == "rm_ensemble-ppo":  # the experiment's β is PPO's kl_coef
        expected["kl_coef"] = expected["beta"]
    defaults = values_of(parse([]))
    missing = {key for key in expected if key not in defaults}
    assert missing == (PPO_ONLY if name == "compare-grpo" else set())  # PPO-only settings reach PPO only
    for key in expected.keys() - missing - {"report_to"}:  # TrainingArguments turns "none" into []
        assert defaults[key] == expected[key], key
    assert defaults["report_to"] == []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_the_yaml_file_reproduces_the_default_run(name):
    parse, files = experiments()[name]
    assert values_of(parse(["--config", str(CONFIGS / files[-1])])) == values_of(parse([]))


def test_the_sweep_defaults_differ_by_trainer():
    parse = experiments()
    grpo, ppo = values_of(parse["beta_sweep-grpo"][0]([])), values_of(parse["beta_sweep-ppo"][0]([]))
    assert (grpo["trainer"], grpo["num_generations"], grpo["learning_rate"]) == ("grpo", 8, 3e-4)
    assert (ppo["trainer"], ppo["num_generations"], ppo["learning_rate"], ppo["critic_learning_rate"]) == (
        "ppo", 1, 1e-4, 1e-3)


def edited_copy(tmp_path, monkeypatch, name: str, **changes) -> None:
    """Serves an edited copy of the shipped ``name`` to the library (the others stay as shipped)."""
    from hf_rlhf_ext.run import parsing as recipe_parsing

    edited = tmp_path / name
    edited.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / name).read_text()), **changes}))
    shipped = recipe_parsing.shipped_config_path
    monkeypatch.setattr(recipe_parsing, "shipped_config_path", lambda n: edited if n == name else shipped(n))


def test_an_edit_of_the_yaml_file_is_what_the_experiment_runs_with(tmp_path, monkeypatch):
    edited_copy(tmp_path, monkeypatch, "beta_sweep_ppo_lab.yaml", max_steps=7, output_dir="runs/edited")
    ppo = values_of(experiments()["beta_sweep-ppo"][0]([]))
    assert (ppo["max_steps"], ppo["output_dir"]) == (7, "runs/edited")
    assert values_of(experiments()["beta_sweep-grpo"][0]([]))["max_steps"] == 60


def test_the_ensemble_takes_the_sweeps_settings_from_the_sweeps_file(tmp_path, monkeypatch):
    edited_copy(tmp_path, monkeypatch, "beta_sweep_lab.yaml", learning_rate=1e-5, max_steps=7)
    ensemble = values_of(experiments()["rm_ensemble-grpo"][0]([]))
    assert (ensemble["learning_rate"], ensemble["max_steps"]) == (1e-5, 80)  # its own max_steps stays on top


def test_an_unknown_key_in_an_experiments_yaml_is_refused(tmp_path, monkeypatch):
    edited_copy(tmp_path, monkeypatch, "beta_sweep_ppo_lab.yaml", max_stepz=3)
    with pytest.raises(ValueError, match="max_stepz"):
        experiments()["beta_sweep-ppo"][0]([])


RECIPE_MODULES = ["ppo", "grpo", "reinforce", "reward", "best_of_n", "beta_sweep", "compare", "reinforce_baselines",
                  "rm_ensemble"]
LIBRARY_MODULES = ["hf_rlhf_ext.experiments.sweeps", "hf_rlhf_ext.experiments.compare",
                   "hf_rlhf_ext.experiments.baselines", "hf_rlhf_ext.experiments.ensembles", "hf_rlhf_ext.run.build"]


def dicts_in(module) -> list[dict]:
    """The module-level dicts of ``module`` and the dicts they hold."""
    found = [v for v in vars(module).values() if isinstance(v, dict)]
    return found + [v for d in found for v in d.values() if isinstance(v, dict)]


@pytest.mark.parametrize("module_name", RECIPE_MODULES + LIBRARY_MODULES)
def test_no_module_holds_a_second_copy_of_a_lab_config(module_name):
    module = recipe(module_name) if module_name in RECIPE_MODULES else importlib.import_module(module_name)
    assert not hasattr(module, "LAB_DEFAULTS") and not hasattr(module, "_COMMON")
    configs = {path.name: yaml.safe_load(path.read_text()) for path in CONFIGS.glob("*.yaml")}
    for candidate in dicts_in(module):
        for name, config in configs.items():
            shared = [k for k, v in candidate.items() if isinstance(k, str) and k in config and config[k] == v]
            assert len(shared) < 3, f"{module_name} repeats {shared} of {name}"


def test_shipped_configs_are_read_from_the_installed_package(tmp_path, monkeypatch):
    """In a wheel the YAML files are package data of hf_rlhf_ext.recipes, not files of a checkout."""
    from hf_rlhf_ext.run.parsing import read_shipped_config

    package = tmp_path / "site-packages" / "hf_rlhf_ext" / "recipes"
    (package / "configs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "configs" / "beta_sweep_ppo_lab.yaml").write_text("max_steps: 9\n")
    spec = importlib.util.spec_from_file_location("hf_rlhf_ext.recipes", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    monkeypatch.setitem(sys.modules, "hf_rlhf_ext.recipes", installed)
    assert read_shipped_config("beta_sweep_ppo_lab.yaml") == {"max_steps": 9}
    with pytest.raises(FileNotFoundError, match="compare_lab.yaml"):
        read_shipped_config("compare_lab.yaml")

"""The package imports cheaply and every name it re-exports resolves."""

import subprocess
import sys

import hf_rlhf_ext


def test_import_is_lazy():
    code = "import sys, hf_rlhf_ext; assert 'trl' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_export_resolves():
    for name in hf_rlhf_ext.__all__:
        assert getattr(hf_rlhf_ext, name) is not None, name
    assert "PPOTrainer" in dir(hf_rlhf_ext)


def test_pyproject_lists_every_package_and_maps_the_recipes():
    """The package list is explicit (recipes/ is mapped to hf_rlhf_ext.recipes): a new subpackage must be added."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "hf_rlhf_ext").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"hf_rlhf_ext.recipes"}
    assert setuptools["package-dir"] == {"hf_rlhf_ext.recipes": "recipes"}
    assert (root / "recipes" / "__init__.py").is_file()


def test_cli_hands_the_command_line_to_each_recipe(capsys):
    from pathlib import Path

    from hf_rlhf_ext.cli import RECIPES, main, shipped_config

    root = Path(__file__).resolve().parents[1]
    assert {module for module, _ in RECIPES.values()} == {
        p.stem for p in (root / "recipes").glob("*.py") if p.stem != "__init__" and not p.stem.startswith("pipeline_")
    }  # every recipe has a subcommand (pipeline_*.py are the pipeline's own modules)
    out = (main(["ppo", "--help"]), capsys.readouterr().out)
    assert out[0] == 0 and "--critic_learning_rate" in out[1]
    assert out[1].startswith("usage: hf-rlhf-ext ppo ")  # the command the user typed, not the module's file
    assert main(["reinforce", "--help"]) == 0 and "--baseline" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert shipped_config("ppo_lab.yaml") == str(root / "recipes" / "configs" / "ppo_lab.yaml")
    assert shipped_config("no_such.yaml") == "no_such.yaml"


def test_a_card_names_the_command_the_recipe_was_started_with(monkeypatch):
    from hf_rlhf_ext.run.finish import recipe_command
    from hf_rlhf_ext.run.parsing import launched_as

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert recipe_command("recipes/ppo.py", ["--beta", "0.1"]) == "python recipes/ppo.py --beta 0.1"
    with launched_as("hf-rlhf-ext ppo"):
        assert recipe_command("recipes/ppo.py", ["--beta", "0.1"]) == "hf-rlhf-ext ppo --beta 0.1"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by accelerate's launcher
    assert recipe_command("recipes/ppo.py", []) == "accelerate launch recipes/ppo.py"

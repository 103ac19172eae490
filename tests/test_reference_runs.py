"""The chapter's numbers in the docs are those of the committed reference runs: the full run on three seeds
(docs/runs/chapter/) and the quick run on seeds 0, 1 and 2 (docs/runs/chapter-quick/seed-*/), read back here so a
rerun that changes them changes the page too."""

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "docs" / "runs" / "chapter"
QUICK = sorted((ROOT / "docs" / "runs" / "chapter-quick").glob("seed-*"))


def _claims(run: Path) -> dict:
    return json.loads((run / "claims.json").read_text())


def _number(text: str) -> tuple:
    return ("number", text)


def _matches(quoted, stored, where: str) -> None:
    """A quoted value equals the stored one: numbers to the decimals quoted, lists item by item, dicts key by key."""
    if isinstance(quoted, tuple):  # a number as written: compare at its own precision
        text = quoted[1]
        decimals = len(text.split(".")[1]) if "." in text and "e" not in text.lower() else 0
        assert stored is not None and math.isfinite(stored), where
        assert round(stored, decimals) == pytest.approx(float(text), abs=0.5 * 10 ** -decimals), (where, stored)
    elif isinstance(quoted, dict):
        assert isinstance(stored, dict), where
        for key, value in quoted.items():
            assert key in stored, f"{where}.{key} is not in the run"
            _matches(value, stored[key], f"{where}.{key}")
    elif isinstance(quoted, list):
        assert isinstance(stored, list) and len(stored) == len(quoted), where
        for i, (q, s) in enumerate(zip(quoted, stored)):
            _matches(q, s, f"{where}[{i}]")
    else:
        assert quoted == stored, (where, quoted, stored)


def _readme_excerpt() -> list[dict]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("The reference run is", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return [json.loads(line, parse_float=_number, parse_int=_number) for line in block.strip().splitlines()]


def test_the_readme_excerpt_is_the_committed_full_run():
    run = _claims(FULL)
    claims = {c["id"]: c for c in run["claims"]}
    excerpt = _readme_excerpt()
    assert run["quick"] is False and len(excerpt) >= 3
    for quoted in excerpt:
        _matches(quoted, claims[quoted["id"]], quoted["id"])


def test_the_full_reference_run_aggregates_three_seeds_for_every_stochastic_claim():
    run = _claims(FULL)
    assert all(c["holds"] is True and c["control_holds"] in (False, None) for c in run["claims"])  # as the README says
    assert len(run["claims"]) == 9 and sum(c["kind"] == "exact" for c in run["claims"]) == 1
    for c in run["claims"]:
        assert c["provenance"]["ran"] == "this invocation", c["id"]  # one invocation made every number
        if c["kind"] == "experiment" and c["id"] != "grpo_advantages":  # a check of every real batch, not a mean
            assert len(c["seeds"]) >= 3, c["id"]
    assert (FULL / "report.md").is_file()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (FULL / "report.md").read_text()):
        assert (FULL / image).is_file(), image


def _quoted_minutes(text: str, marker: str) -> float:
    return float(re.search(re.escape(marker) + r"[^\n]*?about ([\d.]+) minutes", text).group(1))


def test_the_quoted_times_are_those_measured():
    """The README, the recipe's docstring and --quick's help quote the measured wall time (quiet 2-core machine) of the
    committed runs, to the half minute."""
    assert len(QUICK) == 3
    quick = max(_claims(run)["this_invocation_seconds"] for run in QUICK) / 60
    full = _claims(FULL)["this_invocation_seconds"] / 60
    readme = (ROOT / "README.md").read_text()
    recipe = (ROOT / "recipes" / "pipeline.py").read_text()
    assert abs(_quoted_minutes(readme, "hf-rlhf-ext report --quick") - quick) <= 0.5
    assert abs(_quoted_minutes(readme, "accelerate launch recipes/pipeline.py --output_dir") - full) <= 0.5 + 0.1 * full
    stated = float(re.search(r"the full run on three seeds, ([\d.]+) minutes", readme).group(1))
    assert abs(stated - full) <= 0.05 + 1e-9  # the reference run's own time, to the tenth of a minute
    assert abs(_quoted_minutes(recipe, "quick: smaller grids") - quick) <= 0.5
    assert abs(_quoted_minutes(recipe, "Smaller grids and fewer steps (") - quick) <= 0.5
    assert abs(_quoted_minutes(recipe, "the lab, full run (") - full) <= 0.5 + 0.1 * full


@pytest.mark.parametrize("run", QUICK, ids=[p.name for p in QUICK])
def test_every_quick_seed_decided_every_claim_with_its_control_absent(run):
    payload = _claims(run)
    assert payload["quick"] is True
    for c in payload["claims"]:
        assert c["holds"] is True or (c["holds"] is None and "quick mode" in (c["skipped"] or "")), c["id"]
        assert c["control"] is None or c["control_holds"] is False, c["id"]

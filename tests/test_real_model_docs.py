"""The numbers of docs/real_model.md are those of the committed raw runs under docs/runs/: every table row names its
file and key, and is read back here, so a rerun that changes a number changes the page too."""

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "real_model.md"
RUNS = ROOT / "docs" / "runs"
PROBE = RUNS / "real-model" / "mini-loop" / "probe"
#: decimals in the prose that are targets, not measurements
TARGETS = {"0.3", "0.65"}
SOURCED_ROW = re.compile(r"^\|[^|]+\|\s*([-+]?\d+(?:\.\d+)?)\s*\|\s*`([^`:]+):\s*([^`]+)`\s*\|$")


def _prose_and_rows(text: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(lines outside code blocks and sourced table rows, the sourced rows as (value, file, key))."""
    prose, rows, in_code = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            match = SOURCED_ROW.match(line.strip())
            if match:
                rows.append(match.groups())
            else:
                prose.append(line)
    return prose, rows


def _lookup(data, key: str):
    for part in key.strip().split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _assert_quoted(value: str, stored, where: str) -> None:
    """The stored number, rounded to the decimals quoted, is the quoted one."""
    decimals = len(value.split(".")[1]) if "." in value else 0
    assert isinstance(stored, (int, float)), where
    assert round(float(stored), decimals) == pytest.approx(float(value), abs=0.5 * 10 ** -decimals), (where, stored)


def test_every_table_number_is_the_committed_one():
    _, rows = _prose_and_rows(DOC.read_text())
    assert len(rows) >= 7
    for value, file, key in rows:
        data = json.loads((RUNS / file.strip()).read_text())
        _assert_quoted(value, _lookup(data, key), f"{file}: {key}")


def test_no_measured_decimal_outside_the_sourced_tables():
    """A decimal in the prose would escape the read-back: only the targets may stand there."""
    prose, _ = _prose_and_rows(DOC.read_text())
    decimals = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", "\n".join(prose)))
    assert decimals <= TARGETS, decimals - TARGETS


def test_the_quoted_mini_loop_command_is_the_one_that_ran():
    text = DOC.read_text()
    block = text.split("recipes/mini_loop.py", 1)[1].split("```", 1)[0]
    quoted = shlex.split(block.replace("\\\n", " "))
    ran = json.loads((PROBE / "metrics.json").read_text())["config"]["cli_args"]
    assert quoted == ran


def test_the_probe_renders_the_chat_template_learns_nothing_and_is_not_on_lab():
    """What the page says of the probe: chat prompts (user turns), no reward anywhere, so the held-out replies after
    the step are those before; and the run does not call itself the lab's."""
    metrics = json.loads((PROBE / "metrics.json").read_text())
    rows = [json.loads(line) for line in (PROBE / "rollouts.jsonl").read_text().splitlines()]
    assert metrics["on_lab"] is False
    assert all(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "user" for r in rows)
    assert all(r["reward"] == 0.0 for r in rows)
    before = [r["completion"] for r in rows if r["phase"] == "before"]
    assert before and before == [r["completion"] for r in rows if r["phase"] == "after"]


def test_the_quoted_testbed_commands_are_those_that_ran():
    """The page's build commands, in order: the LoRA proxy's build, then the scratch proxy's."""
    blocks = DOC.read_text().split("hf-rlhf-ext lab build")[1:]
    assert len(blocks) == 2
    for block, run in zip(blocks, ("graded-lora", "graded-scratch")):
        quoted = shlex.split(("hf-rlhf-ext lab build" + block.split("```", 1)[0]).replace("\\\n", " "))
        assert quoted == shlex.split((RUNS / "testbed-smollm2" / run / "command.txt").read_text()), run


def test_the_quoted_grpo_smoke_command_is_the_one_that_ran():
    block = DOC.read_text().split("recipes/grpo.py", 1)[1].split("```", 1)[0]
    ran = (RUNS / "testbed-smollm2" / "graded-scratch" / "grpo-smoke" / "command.txt").read_text()
    assert shlex.split(block.replace("\\\n", " ")) == shlex.split(ran.split("recipes/grpo.py", 1)[1])


def test_the_kl_estimator_summary_is_that_of_the_committed_log():
    """kl_estimators.json (quoted by the page) is what summarize.py makes of the committed log_history.jsonl, and the
    command quoted is the one recorded beside it."""
    import importlib.util

    folder = RUNS / "real-model" / "kl-estimators"
    spec = importlib.util.spec_from_file_location("kl_summary", folder / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = json.loads((folder / "kl_estimators.json").read_text())
    assert module.summarize(str(folder / "log_history.jsonl")) == stored
    quoted = DOC.read_text().split("## k1 and k3 against the exact KL")[1].split("```bash")[1].split("```")[0]
    ran = (folder / "command.txt").read_text()
    assert shlex.split(quoted.replace("\\\n", " ")) == shlex.split(ran)

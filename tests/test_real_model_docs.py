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
#: decimals in the prose that are targets or chosen settings (the label noise τ), not measurements
TARGETS = {"0.3", "0.65", "0.15"}
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
    """The page's build commands, in order: the LoRA proxy's build, the scratch proxy's, the validated proxy's."""
    blocks = DOC.read_text().split("hf-rlhf-ext lab build")[1:]
    assert len(blocks) == 3
    for block, run in zip(blocks, ("graded-lora", "graded-scratch", "graded-v2")):
        quoted = shlex.split(("hf-rlhf-ext lab build" + block.split("```", 1)[0]).replace("\\\n", " "))
        ran = (RUNS / "testbed-smollm2" / run / "command.txt").read_text()
        assert quoted == shlex.split(ran.replace("\\\n", " "), comments=True), run


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


MINI = RUNS / "real-model" / "mini-loop"


def _mini_runs() -> tuple[dict, dict]:
    return tuple(json.loads((MINI / name / "metrics.json").read_text()) for name in ("kl-penalty", "no-penalty"))


def test_the_two_mini_loop_runs_differ_only_in_the_kl_penalty_and_the_page_quotes_their_command():
    penalised, control = _mini_runs()
    differ = {"kl_coef", "output_dir", "cli_args", "dataset_name"}
    assert {k: v for k, v in penalised["config"].items() if k not in differ} == \
        {k: v for k, v in control["config"].items() if k not in differ}
    assert penalised["config"]["kl_coef"] > 0 == control["config"]["kl_coef"]
    text = DOC.read_text()
    block = text.split("### With a system turn", 1)[1].split("recipes/mini_loop.py", 1)[1].split("\n#", 1)[0]
    quoted = shlex.split(block.replace("\\\n", " "))
    swap = {"--kl_coef": str(control["config"]["kl_coef"]), "--output_dir": control["config"]["output_dir"]}
    expected = list(quoted)
    for flag, value in swap.items():
        expected[expected.index(flag) + 1] = value
    assert expected == control["config"]["cli_args"]
    # the penalised run read a byte-identical copy of the committed prompts (its command.txt says so)
    path = quoted.index("--dataset_name") + 1
    assert [a for i, a in enumerate(quoted) if i != path] == \
        [a for i, a in enumerate(penalised["config"]["cli_args"]) if i != path]


def test_the_mini_loop_runs_render_a_system_turn_and_are_not_on_the_lab():
    for name in ("kl-penalty", "no-penalty"):
        metrics = json.loads((MINI / name / "metrics.json").read_text())
        rows = [json.loads(line) for line in (MINI / name / "rollouts.jsonl").read_text().splitlines()]
        assert metrics["on_lab"] is False
        assert all([turn["role"] for turn in r["prompt"]] == ["system", "user"] for r in rows)


def test_the_mini_loop_verdict_is_the_pipelines_rule_on_the_committed_runs_and_the_page_says_it():
    """verdict.json is what ``claim_mini_loop`` decides on the two committed runs; the page names that verdict, and
    its sentence about the KL curves (the unpenalised KL above the penalised one from the third step on) holds."""
    import sys

    sys.path.insert(0, str(ROOT / "recipes"))
    from pipeline_stages import MINI_KEEP, claim_mini_loop

    penalised, control = _mini_runs()
    kept = {k: penalised.get(k) for k in MINI_KEEP} | {"no_kl_penalty": {k: control.get(k) for k in MINI_KEEP}}
    claim = claim_mini_loop({"mini_loop": kept})
    stored = json.loads((MINI / "verdict.json").read_text())["claim"]
    assert (claim.holds, claim.control_holds, claim.verdict()) == (stored["holds"], stored["control_holds"],
                                                                   stored["verdict"])
    section = DOC.read_text().split("### With a system turn", 1)[1].split("\n## ", 1)[0]
    assert f"Verdict (`verdict.json: claim.verdict`): **{stored['verdict']}**" in section
    assert all(b["kl_k1"] > a["kl_k1"] for a, b in zip(penalised["curve"][2:], control["curve"][2:]))


def test_the_sweep_sections_verdicts_are_those_of_its_committed_numbers():
    """What the β-sweep section concludes follows from its metrics: a hump or not at the lowest β, a Gao fit or not,
    and the KL ordering against the −0.9 target."""
    metrics = json.loads((RUNS / "testbed-smollm2" / "graded-v2" / "beta-sweep" / "metrics.json").read_text())
    section = DOC.read_text().split("### A β sweep", 1)[1].split("\n## ", 1)[0]
    hump, fit = metrics["lowest_beta"]["hump"], metrics["gao_fit"]["valid"]
    assert ("**No over-optimisation within 40 steps.**" in section) == (not hump)
    assert ("**No Gao fit**" in section) == (not fit)
    assert ("**The leash orders the KL.**" in section) == (metrics["spearman_beta_final_kl"] <= -0.9)


def test_the_monitor_and_best_of_n_verdicts_are_those_of_their_committed_numbers():
    """"Gold does not turn down" is said only when the monitor found no fall, and "no hump" only when best-of-N's
    gold rises with N all the way and its fit predicts no peak."""
    runs = RUNS / "testbed-smollm2" / "graded-v2"
    findings = json.loads((runs / "overoptimization" / "overoptimization.json").read_text())["findings"]
    curve = json.loads((runs / "best-of-n" / "metrics.json").read_text())["curve"]
    text = DOC.read_text()
    said_no_fall = "**Does gold turn down while the proxy climbs? No, not within these 40 steps**" in text
    assert said_no_fall == (not findings["gold_fell"] and not findings["detected"])
    gold = [p["graded_reply"] for p in curve["points"]]
    rises = all(b > a for a, b in zip(gold, gold[1:]))
    said_no_hump = "at every N up to 32 — **no hump**" in text
    assert said_no_hump == (rises and curve["fit"]["peak_kl"] is None)


def test_the_pipeline_sections_verdicts_are_those_of_its_claims_file():
    claims = {c["id"]: c for c in json.loads((RUNS / "testbed-smollm2" / "graded-v2" / "pipeline" /
                                              "claims.json").read_text())["claims"]}
    section = DOC.read_text().split("### The pipeline on the SmolLM2 testbed", 1)[1].split("\n## ", 1)[0]
    words = {True: "holds", False: "does NOT hold"}
    for claim in ("rm_accuracy", "clip_gradient", "grpo_advantages"):
        assert f"**{claim}: {words[claims[claim]['holds']]}" in section, claim
    undecided = claims["beta_too_low"]["holds"] is None and "quick mode" in claims["beta_too_low"]["skipped"]
    assert ("**beta_too_low: not decided in quick mode.**" in section) == undecided

"""The documentation stays true to the code: every page is reachable from the README, every link resolves, every
dotted name imports and every config field the reference lists exists."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    assert {f"docs/{p.name}" for p in PAGES} <= linked, "add the page to the README's Documentation section"


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_dotted_name_in_the_docs_imports():
    from hf_rlhf_ext.run.parsing import recipes_package

    recipes_package()  # hf_rlhf_ext.recipes: installed by the wheel; in a checkout, the top-level recipes/
    names = set()
    for page in PAGES:
        names |= set(re.findall(r"`(hf_rlhf_ext(?:\.\w+)+)", page.read_text()))
    assert len(names) > 10
    for name in sorted(names):
        assert _resolve(name) is not None, name


@pytest.mark.parametrize("config", ["PPOConfig", "ReinforceConfig"])
def test_reference_lists_only_real_config_fields(config):
    import hf_rlhf_ext

    text = (ROOT / "docs" / "reference.md").read_text()
    section = text.split(f"`hf_rlhf_ext.{config}", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", section, flags=re.M)
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    fields = {f.name for f in dataclasses.fields(getattr(hf_rlhf_ext, config))}
    assert documented and documented <= fields, documented - fields


def test_the_quickstarts_numbers_are_those_of_the_committed_run():
    """The console block in docs/quickstart.md quotes docs/runs/ppo-lab/metrics.json (the default lab PPO run), digit
    for digit as the recipe prints them: a rerun that changes the numbers changes the committed file and the page."""
    import json

    from hf_rlhf_ext.run.finish import summary_text

    metrics = json.loads((ROOT / "docs" / "runs" / "ppo-lab" / "metrics.json").read_text())
    page = (ROOT / "docs" / "quickstart.md").read_text()
    block = page.split("held-out evaluation (", 1)[1].split("```", 1)[0]
    printed = summary_text(metrics).split("held-out evaluation (", 1)[1]
    assert re.sub(r"\s+", " ", block).strip() == re.sub(r"\s+", " ", printed).strip()
    assert metrics["global_step"] == 60 and metrics["on_lab"] is True and metrics["command"] == "python recipes/ppo.py"


def _committed(run: str, name: str = "metrics.json") -> dict:
    import json

    return json.loads((ROOT / "docs" / "runs" / run / name).read_text())


def _lab_section(page: str) -> str:
    """The page's section on a default lab run, whitespace collapsed so prose may wrap anywhere."""
    text = (ROOT / "docs" / page).read_text()
    section = text.split("## A default run on the lab", 1)[1].split("\n## ", 1)[0]
    return re.sub(r"[ \t]*\n[ \t]*", "\n", section)


def _row(section: str, label: str) -> list[str]:
    """The cells after the label in the markdown table row labelled `label` (or `label (a gloss)`), bold dropped."""
    rows = [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return next(row[1:] for row in rows if row[0] == label or row[0].startswith(f"{label} ("))


def _num(value: float, digits: int = 2, sign: str = "") -> str:
    """A number as the pages print it: fixed digits, a true minus sign."""
    return f"{value:{sign}.{digits}f}".replace("-", "−")


def _prose(section: str) -> str:
    return re.sub(r"\s+", " ", section)


def test_the_best_of_n_pages_lab_numbers_are_those_of_the_committed_run():
    """docs/best_of_n.md quotes docs/runs/best-of-n-lab/metrics.json (`python recipes/best_of_n.py`) and, for seeds
    0-2, the chapter run's claims.json: a page number that differs from its file fails here."""
    metrics, section = _committed("best-of-n-lab"), _lab_section("best_of_n.md")
    assert f"`{metrics['command']}`; its `metrics.json` is committed" in _prose(section)
    points = metrics["curve"]["points"]
    assert _row(section, "N") == [str(point["n"]) for point in points]
    for label, key in [("KL_bon (nats)", "kl"), ("proxy", "proxy_reward"), ("gold", "gold_reward")]:
        assert _row(section, label) == [_num(point[key]) for point in points], label
    fit, prose = metrics["curve"]["fit"], _prose(section)
    peak = max(points, key=lambda point: point["gold_reward"])
    nearest = min(points, key=lambda point: abs(point["kl"] - fit["peak_kl"]))
    assert (f"α = {_num(fit['alpha'])}, β = {_num(fit['beta'])}, R² = {_num(fit['r2'])}, predicted peak at KL "
            f"{_num(fit['peak_kl'])} nats (N ≈ {nearest['n']}), where the measured peak is") in prose
    assert nearest["n"] == peak["n"]
    gain, given_back = peak["gold_reward"] - points[0]["gold_reward"], peak["gold_reward"] - points[-1]["gold_reward"]
    assert (f"gold gains {_num(gain)} by N = {peak['n']} and gives back {_num(given_back)} of it by "
            f"N = {points[-1]['n']}") in prose
    initial, bon = metrics["initial"], metrics["best_of_n"]
    assert _row(section, "SFT policy") == [_num(initial["proxy_reward"]), _num(initial["gold_reward"]), "0"]
    assert _row(section, f"best-of-{bon['n']} at inference") == [
        _num(bon["proxy_reward"]), _num(bon["gold_reward"]), f"{_num(bon['kl'])} (analytic)"]
    for distilled in metrics["distilled"]:
        scores = distilled["eval"]
        assert _row(section, f"distilled, round {distilled['round']}") == [
            _num(scores["proxy_reward"]), _num(scores["gold_reward"]), _num(scores["kl"])]
    first = metrics["distilled"][0]["eval"]
    assert f"(+{_num(gain)} at {_num(bon['kl'])} nats)" in prose
    assert f"({_num(first['gold_reward'])} vs {_num(bon['gold_reward'])} at ≈ {first['kl']:.1f} nats)" in prose

    claim = next(c for c in _committed("chapter", "claims.json")["claims"] if c["id"] == "bon_distillation")
    seeds = claim["values"]["gain_over_seeds"]
    per_seed = [_num(seeds["per_seed"][seed], sign="+") for seed in ("0", "1", "2")]
    low, high = (_num(bound, sign="+") for bound in seeds["ci95"])
    assert (f"raised held-out gold by {per_seed[0]}, {per_seed[1]} and {per_seed[2]} (95% t interval "
            f"[{low}, {high}])") in prose
    assert [s for s, kept in claim["values"]["settings_per_seed"].items() if kept["rounds"] > 1] == ["0"]
    assert claim["control"]["values"]["gain_over_seeds"]["ci95"][0] < 0  # "did not raise it"


def _log_history(run: str) -> dict[int, dict]:
    import json

    """Every logged value by step (a step can have several entries: training, evaluation, the run's summary)."""
    by_step: dict[int, dict] = {}
    for line in (ROOT / "docs" / "runs" / run / "log_history.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_step.setdefault(entry.get("step"), {}).update(entry)
    return by_step


LAB_TABLES = {  # page: (committed run, [(logged key, digits the page prints)])
    "ppo.md": ("ppo-lab", [("rewards/proxy_reward/mean", 2), ("rewards/gold_reward/mean", 2), ("objective/kl", 2),
                           ("loss/value_avg", 2)]),
    "grpo.md": ("grpo-lab", [("rewards/proxy_reward/mean", 2), ("rewards/gold_reward/mean", 2), ("kl", 3)]),
    "reinforce.md": ("reinforce-lab", [("rewards/proxy_reward/mean", 2), ("rewards/gold_reward/mean", 2),
                                       ("reinforce/baseline", 2)]),
}


@pytest.mark.parametrize("page", sorted(LAB_TABLES))
def test_a_trainers_lab_numbers_are_those_of_its_committed_run(page):
    """The default lab run's table and held-out line on ppo.md, grpo.md and reinforce.md quote docs/runs/<run>/
    (metrics.json and log_history.jsonl of the recipe's default command): a page number that differs fails here."""
    run, keys = LAB_TABLES[page]
    metrics, logs, section = _committed(run), _log_history(run), _lab_section(page)
    assert metrics["on_lab"] is True and metrics["command"] == f"python recipes/{page[:-3]}.py"
    steps = [int(step) for step in _row(section, "step")]
    assert steps[-1] == metrics["global_step"]
    for key, digits in keys:
        assert _row(section, f"`{key}`") == [_num(logs[step][key], digits) for step in steps], key
    prose = _prose(section)
    assert (f"Held-out, {metrics['num_eval_prompts']} fresh completions before → after: proxy "
            f"{_num(metrics['proxy_reward_before'])} → {_num(metrics['proxy_reward_after'])}, gold "
            f"{_num(metrics['gold_reward_before'])} → {_num(metrics['gold_reward_after'])}, KL to the initial policy "
            f"{_num(metrics['kl_k3_after'])} nats per completion (k3; k1 {_num(metrics['kl_after'])}).") in prose


def test_the_grpo_pages_held_out_kl_during_training_is_that_of_the_committed_run():
    """docs/grpo.md lists kl_ref/k3_seq at every measuring step of docs/runs/grpo-lab/log_history.jsonl."""
    logs = _log_history("grpo-lab")
    steps = sorted(step for step, entry in logs.items() if isinstance(step, int) and "kl_ref/k3_seq" in entry)
    measured = [(step, logs[step]["kl_ref/k3_seq"]) for step in steps]
    quoted = ", ".join(_num(value) for _, value in measured)
    text = _prose((ROOT / "docs" / "grpo.md").read_text())
    assert f"on this run {quoted} at steps {measured[0][0]} … {measured[-1][0]}" in text


def test_the_reinforce_pages_gradient_variance_is_that_of_the_committed_run():
    """docs/reinforce.md quotes grad_variance of docs/runs/reinforce-lab/metrics.json."""
    variance = _committed("reinforce-lab")["grad_variance"]
    assert (f"Gradient variance over {variance['grad_var/num_measurements']} measurements: `grad_var/total` "
            f"{variance['grad_var/total']:.0f} (mean), `grad_var/snr` {_num(variance['grad_var/snr'])}.") in _prose(
        _lab_section("reinforce.md"))


def test_the_ppo_pages_memory_table_is_that_of_the_committed_benchmark_output():
    """docs/ppo.md's memory table quotes both runs of benchmarks/results/memory.txt, run 1 / run 2."""
    raw = (ROOT / "benchmarks" / "results" / "memory.txt").read_text()
    runs = [dict((row[0], row[1:]) for row in (line.strip("|").split("|") for line in block.splitlines()
                                               if re.match(r"\| \w+ \| \d", line)))
            for block in raw.split("$ ")[1:]]
    assert len(runs) == 2
    section = (ROOT / "docs" / "ppo.md").read_text().split("**Memory**", 1)[1].split("\n\n", 2)[1]
    assert "473 MB import baseline" in (ROOT / "docs" / "ppo.md").read_text() and "import baseline 473 MB" in raw
    for label, name in [("GRPO LoRA", "grpo_lora"), ("PPO LoRA + `critic_shares_base`", "ppo_lora_shared_critic"),
                        ("PPO LoRA + `value_head_on_policy`", "ppo_lora_value_head")]:
        cells = [[run[f" {name} "][column].strip() for run in runs] for column in (0, 1)]
        quoted = [" / ".join(dict.fromkeys(values)) if column else " / ".join(values)
                  for column, values in enumerate(cells)]
        assert _row(section, label) == quoted, label

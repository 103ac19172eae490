"""The benchmark numbers quoted in benchmarks/README.md are those of the committed raw output."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_callback_overhead_quoted_is_the_committed_median():
    raw = (ROOT / "benchmarks" / "results" / "callback_overhead.txt").read_text().split("# The run before", 1)[0]
    median = re.search(r"from the time spent inside the callbacks ([\d.]+)", raw).group(1)
    inside = [float(x) for x in re.findall(r"inside callbacks [\d.]+ s/step -> ([\d.]+)", raw)]
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    section = readme.split("Callback overhead (", 1)[1].split("\n\n", 1)[0]
    assert f"**{median}×**" in section and len(inside) == 5
    assert f"{min(inside):.3f}–{max(inside):.3f}" in section
    assert ("over the 1.05 target" in section) == (float(median) > 1.05)


def test_the_best_of_n_pool_memory_quoted_is_the_committed_median():
    """SmolLM2's pool memory (M = 16 and 64, whole pool vs chunked) in the benchmark README and docs/best_of_n.md is the
    median of the latest committed run's raw lines, as its own table prints it."""
    import json
    import statistics

    raw = (ROOT / "benchmarks" / "results" / "best_of_n_memory.txt").read_text().split("# An earlier run", 1)[0]
    runs = [json.loads(line) for line in raw.splitlines() if line.startswith("{")]
    mb = {(r["m"], r["run"]): [] for r in runs}
    for r in runs:
        mb[(r["m"], r["run"])].append(r["peak_mb"] - r["loaded_mb"])
    median = {key: round(statistics.median(values)) for key, values in mb.items()}
    assert sorted(mb) == [(16, "chunked"), (16, "whole"), (64, "chunked"), (64, "whole")]
    ratio = f"{median[(64, 'chunked')] / median[(64, 'whole')]:.2f}×"
    assert f"| {median[(64, 'whole')]} | {median[(64, 'chunked')]} | {ratio[:-1]} |" in raw
    for page in (ROOT / "benchmarks" / "README.md", ROOT / "docs" / "best_of_n.md"):
        text = re.sub(r"\s+", " ", page.read_text())
        assert f"{median[(16, 'whole')]} MB whole, {median[(16, 'chunked')]} MB chunked" in text, page
        assert f"**{median[(64, 'whole')]} MB**" in text and f"**{median[(64, 'chunked')]} MB**" in text, page
        assert ratio in text, page


def test_the_real_model_step_numbers_quoted_are_the_committed_medians():
    """Every number the README quotes for the SmolLM2 step benchmark is one of the raw output's summary lines."""
    raw = (ROOT / "benchmarks" / "results" / "real_model_step.txt").read_text()
    medians = {m.group(1): dict(re.findall(r"(\w+) ([\d.]+)", m.group(2)))
               for m in re.finditer(r"^  (\w+) +(step .*)$", raw, re.M)}
    ratios = dict(re.findall(r"ratio (\w+) / trl_grpo: (median [\d.]+ \(min [\d.]+, max [\d.]+\))", raw))
    assert sorted(medians) == ["ours_grpo", "ours_ppo", "trl_grpo"] and sorted(ratios) == ["ours_grpo", "ours_ppo"]
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    section = re.sub(r"\s+", " ", readme.split("Real model step (", 1)[1].split("\n\n", 1)[0])
    for name, parts in medians.items():
        for part in ("step", "generation", "scoring", "training"):
            assert f"{name} {part} {parts[part]} s" in section, (name, part)
    for part in ("rollout_values", "gae", "loss_values", "ref_logps"):
        assert f"{part} {medians['ours_ppo'][part]} s" in section, part
    for name, quoted in ratios.items():
        median, low, high = re.findall(r"[\d.]+", quoted)
        assert f"{name} / trl_grpo {median}× ({low}–{high})" in section, name
    extra = dict(re.findall(r"(\w+) \+([\d.]+)", raw.split("PPO minus plain GRPO", 1)[1].splitlines()[0]))
    assert f"PPO's extra ≈ {float(extra['step']):.1f} s per step" in section
    assert f"in training ≈ {float(extra['training']):.1f} s more than GRPO" in section
    loads = re.findall(r"load average at (?:start|end): ([\d.]+)", raw)
    assert f"load average {float(loads[0]):.1f} at the start and {float(loads[1]):.1f} at the end" in section
    within = float(re.findall(r"[\d.]+", ratios["ours_grpo"])[0]) <= 1.1
    assert ("within the 1.1× target" in section) == within

"""The benchmark numbers quoted in benchmarks/README.md are those of the committed raw output."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_callback_overhead_quoted_is_the_committed_median():
    raw = (ROOT / "benchmarks" / "results" / "callback_overhead.txt").read_text()
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

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

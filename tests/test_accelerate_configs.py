"""The shipped accelerate configs parse, and the two-process CPU config really starts two gloo ranks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_all_expected_configs_ship():
    names = {c.stem for c in CONFIGS}
    assert {"cpu", "cpu_2proc", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1
    if path.stem.startswith("cpu"):
        assert cfg.use_cpu and cfg.mixed_precision == "no"


def _free_port() -> int:
    """A port no one listens on now: two suites on one host must not meet on accelerate's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_cpu_two_process_config_starts_two_gloo_ranks():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
         str(ROOT / "tests" / "_dist_probe.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the two ranks share one stdout, so their lines may interleave: find each JSON object after its marker
    probes = [json.loads(m) for m in re.findall(r"PROBE (\{[^{}]*\})", out.stdout)]
    assert sorted(p["rank"] for p in probes) == [0, 1]
    assert all(p["world"] == 2 and p["backend"] == "gloo" for p in probes)
    assert all(p["sum"] == 3.0 for p in probes)  # the all-reduce really crossed processes

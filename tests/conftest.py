"""Test-wide settings: offline, quiet, one thread (stable timings on small shared machines)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lab():
    """The default lab, built once per machine and cached (a few minutes the first time, seconds after)."""
    from hf_rlhf_ext.lab import build_lab

    return build_lab()

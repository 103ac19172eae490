"""PPO's critic under FSDP2 on two CPU gloo ranks (see _ppo_fsdp2_probe.py for what runs on each rank)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _ppo_helpers import build_world

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_separate_and_shared_base_critics_train_under_fsdp2_on_two_ranks(tmp_path):
    world = build_world(str(tmp_path / "world"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(TESTS / "_ppo_fsdp2_probe.py"), os.path.dirname(world["policy"]), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(m) for m in re.findall(r"FSDP2 (\{[^{}]*\})", out.stdout)]
    for mode in ("separate", "shared"):
        steps = {}
        for line in lines:
            if line["mode"] == mode:
                steps.setdefault(line["step"], {})[line["rank"]] = line
        assert sorted(steps) == [0, 1, 2], mode
        for step, ranks in steps.items():
            a, b = ranks[0], ranks[1]
            assert a["policy"] == b["policy"] and a["critic"] == b["critic"], (mode, step)  # the same models
            assert a["policy_sharded"] and a["critic_sharded"] and b["critic_sharded"]  # really sharded
            assert a["policy_moved"] and a["critic_moved"], (mode, step)  # both trained at every step
            # the sharded critic's gradient is that of the value loss averaged over both ranks' tokens
            assert a["critic_grads_compared"] >= 4, (mode, step)  # LoRA A and B (shared base) or more, and the head
            assert max(a["critic_grad_err"], b["critic_grad_err"]) < 1e-6 * (1 + a["critic_grad_max"]), (mode, step)
        assert max(r[0]["critic_grad_max"] for r in steps.values()) > 1e-3, mode  # gradients that are not ~0
        # a step where the ranks hold different token counts and the gradient is not ~0: there the mean of the ranks'
        # own token means differs from the token mean over both ranks, so the comparison above tells them apart
        assert any(r[0]["tokens"] != r[1]["tokens"] and r[0]["critic_grad_max"] > 1e-3 for r in steps.values()), mode
    saves = [json.loads(m) for m in re.findall(r"FSDP2_SAVE (\{[^{}]*\})", out.stdout)]
    assert len(saves) == 4 and all(s["written"] for s in saves)  # gathered on both ranks, written by rank 0
    separate = [s for s in saves if s["mode"] == "separate"]
    assert all(s["restored"] == pytest.approx(s["saved"], abs=1e-6) for s in separate)  # loaded back into the shards

"""The "Use with your TRL script" snippets run for real, at tiny scale, on the lab: the Python snippet with our
callbacks, and TRL's own ``trl grpo`` command line with our reward functions given by dotted path.

The section is read from README.md ("## Use with your TRL script"), so the documentation users read is what is
tested. Each snippet is scaled down by exact text substitutions; a
substitution that no longer matches fails the test (the snippet changed: update the test with it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Use with your TRL script"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


def section_text() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    nxt = re.search(r"^## ", body, flags=re.M)  # up to the next level-2 heading
    return body[: nxt.start()] if nxt else body


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section_text(), flags=re.S)


def scaled(code: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in code, f"the snippet no longer contains {old!r}; update this test together with the snippet"
        code = code.replace(old, new)
    return code


def test_section_has_both_snippets():
    py = code_blocks("python")
    sh = [b for b in code_blocks("bash") if "trl grpo" in b]
    assert py and "add_callback" in py[0]
    funcs = "--reward_funcs hf_rlhf_ext.lab.rewards.lab_proxy_reward hf_rlhf_ext.lab.rewards.lab_gold_reward"
    assert sh and funcs in sh[0]
    assert "--reward_weights 1 0" in sh[0]


@pytest.mark.slow
def test_python_snippet_runs(tmp_path):
    code = scaled(
        code_blocks("python")[0],
        [
            ("max_steps=300", "max_steps=4"),
            ("per_device_train_batch_size=32", "per_device_train_batch_size=16"),
            ("logging_steps=5", "logging_steps=1"),
            ("every_n_steps=10", "every_n_steps=2"),
            ('["prompt"][:64]', '["prompt"][:16]'),
        ],
    )
    code += "\nimport json\njson.dump(trainer.state.log_history, open('log_history.json', 'w'))\n"
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OveroptimizationFindings(" in proc.stdout
    history = json.loads((tmp_path / "log_history.json").read_text())
    keys = set().union(*history)
    for key in (
        "rewards/lab_proxy_reward/mean", "rewards/lab_gold_reward/mean", "kl_ref/k3_seq", "adv_check/max_abs_diff",
        "overopt/gold",
    ):
        assert key in keys, f"{key} not logged; logged: {sorted(keys)}"
    assert all(r["adv_check/violations"] == 0 for r in history if "adv_check/violations" in r)
    assert (tmp_path / "runs" / "grpo_lab" / "overoptimization.json").is_file()
    assert (tmp_path / "runs" / "grpo_lab" / "gold_peak" / "config.json").is_file()


@pytest.mark.slow
def test_trl_cli_snippet_runs(tmp_path):
    block = [b for b in code_blocks("bash") if "trl grpo" in b][0]
    script = scaled(
        block,
        [
            ("--max_steps 300", "--max_steps 2"),
            ("--per_device_train_batch_size 32", "--per_device_train_batch_size 16"),
            ("--logging_steps 5", "--logging_steps 1"),
        ],
    )
    (tmp_path / "run.sh").write_text("set -euo pipefail\n" + script)
    lab_dir = tmp_path / "lab"  # a fresh lab: the shipped one, put there by `lab path`
    proc = subprocess.run(
        ["bash", "run.sh"], cwd=tmp_path, env={**ENV, "HF_RLHF_EXT_LAB_DIR": str(lab_dir)}, capture_output=True,
        text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (lab_dir / "prompts" / "train.jsonl").is_file() and (lab_dir / "policy" / "model.safetensors").is_file()
    # both reward functions were imported by dotted path, called and logged: the proxy optimised, the gold tracked
    records = [r for r in re.findall(r"\{'loss'.*?\}", out)]
    assert len(records) == 2, out[-3000:]
    for key in ("rewards/lab_proxy_reward/mean", "rewards/lab_gold_reward/mean"):
        assert all(f"'{key}'" in r for r in records)
    for r in records:  # reward = 1 * proxy + 0 * gold
        proxy = float(re.search(r"'rewards/lab_proxy_reward/mean': '([-0-9.e]+)'", r).group(1))
        total = float(re.search(r"'reward': '([-0-9.e]+)'", r).group(1))
        assert total == pytest.approx(proxy, rel=1e-3, abs=1e-3)
    assert (tmp_path / "runs" / "grpo_lab_cli" / "model.safetensors").is_file()

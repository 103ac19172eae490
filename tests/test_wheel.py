"""The package as a user installs it: a wheel (not an editable install) in a fresh virtual environment, its recipes
run from outside the repository on the lab that ships inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a wheel is built from (the rest of a checkout, e.g. runs/ or .git, stays out of the copy)
SOURCES = ("pyproject.toml", "README.md", "hf_rlhf_ext", "recipes")


def build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources, so that no build/ or egg-info lands in the checkout."""
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")]
    subprocess.run([*cmd, "."], cwd=src, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("hf_rlhf_ext-*.whl")
    return wheel


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_RLHF_EXT_LAB_DIR", "VIRTUAL_ENV")}
    return {**env, "HF_RLHF_EXT_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}  # fmt: skip


def make_venv_seeing_this_environment(venv: Path) -> Path:
    """A fresh venv that sees the packages of the Python running the tests (torch, transformers, trl ...), without
    reinstalling them and without a network. ``--system-site-packages`` alone sees only the base interpreter's
    packages, not those of a venv the suite itself runs in, so this environment's site directories are added with a
    ``.pth`` file (``site.addsitedir`` also runs their own ``.pth`` files)."""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    outer = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", ask], check=True, capture_output=True, text=True)
    inner = inner.stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(outer) if os.path.isdir(d)]
    Path(inner, "_outer_environment.pth").write_text("\n".join(lines) + "\n")
    return venv


def test_installed_wheel_runs_a_recipe_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("recipes/ppo.py", "recipes/pipeline_stages.py", "recipes/configs/ppo_lab.yaml",
                 "lab/prebuilt/policy/model.safetensors", "lab/prebuilt/prompts/train.jsonl",
                 "evaluation/pairwise_accuracy/pairwise_accuracy.py"):  # fmt: skip
        assert f"hf_rlhf_ext/{name}" in names, name
    assert not any(n.startswith(("tests/", "recipes/")) for n in names)

    venv = make_venv_seeing_this_environment(tmp_path / "venv")
    python, work = venv / "bin" / "python", tmp_path / "work"
    work.mkdir()
    env = clean_env(tmp_path / "home")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    subprocess.run(install, cwd=work, env=env, check=True, capture_output=True, timeout=600)

    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc

    where = run(str(python), "-c", "import hf_rlhf_ext, hf_rlhf_ext.recipes.ppo; print(hf_rlhf_ext.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel, not the checkout
    launch = [str(python), "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # `accelerate launch`, run by the venv's python
    assert "--critic_learning_rate" in run(*launch, "-m", "hf_rlhf_ext.recipes.ppo", "--help").stdout

    out = tmp_path / "ppo"
    run(str(venv / "bin" / "hf-rlhf-ext"), "ppo", "--config", "ppo_lab.yaml", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--num_eval_prompts", "8", "--logging_steps", "1", "--output_dir",
        str(out))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["on_lab"] and "gold_reward_after" in metrics
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h][:2] == [1, 2]
    assert (out / "value_model").is_dir()
    # the lab came from the installed package, into the fresh cache
    (lab,) = (tmp_path / "home" / "lab").iterdir()
    assert (lab / "policy" / "model.safetensors").read_bytes() == (
        ROOT / "hf_rlhf_ext" / "lab" / "prebuilt" / "policy" / "model.safetensors"
    ).read_bytes()
    assert not any(p.name in ("build", "runs") for p in work.iterdir())

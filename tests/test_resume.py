"""A run killed with SIGKILL resumes from its last checkpoint and ends where the uninterrupted run ends.

Each test starts the training as a subprocess (a script written to ``tmp_path``), waits for its first checkpoint,
kills it with SIGKILL (no exception handler, no ``atexit``: what a preempted job or the OOM killer does), resumes it
with ``resume_from_checkpoint`` in a new process and compares it with an uninterrupted run of the same script.

Tolerance: everything runs on one CPU thread in the same deterministic order, and the checkpoint restores the RNG
states, so the runs agree to float32 rounding: ``TOL`` (1e-6 absolute and relative) for weights, logged losses and
rewards, the KL controller, the REINFORCE baseline and the monitors' state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TOL = dict(rtol=1e-6, atol=1e-6)
SAVE_STEP, MAX_STEPS = 2, 4
# keys of a log record that are not results: timings, memory, the run-average train_loss (over this process's
# steps only), and PPO's check of the sampler's log-probs, which runs once per process (so again after a resume)
NOT_COMPARED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
                "memory/peak_mb", "sampling/logp_max_diff")

SCRIPT = r'''
"""One training run (ppo, grpo with every monitoring callback, or reinforce); writes result.json at the end."""
import json, os, sys, time

sys.path.insert(0, os.environ["TESTS_DIR"])
import torch
from transformers import TrainerCallback

kind, model_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
resume = sys.argv[4] if len(sys.argv) > 4 else None
torch.set_num_threads(1)
common = dict(max_steps=int(os.environ["MAX_STEPS"]), save_strategy="steps", save_steps=int(os.environ["SAVE_STEP"]),
              logging_steps=1, learning_rate=5e-2, seed=0)


class HoldAfterFirstCheckpoint(TrainerCallback):
    """Keeps the process alive after its first checkpoint, so that the kill lands mid-run, not after the end."""

    def on_save(self, args, state, control, **kwargs):
        if os.environ.get("HOLD_AFTER_CHECKPOINT"):
            time.sleep(600)


callbacks, report = [], {}
if kind == "ppo":
    from _ppo_helpers import ppo_args, prompts, target_word
    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(model=model_path, reward_funcs=[target_word],
                         args=ppo_args(out, kl_target=0.5, kl_horizon=50, **common), train_dataset=prompts())
    report["kl_controller"] = lambda: trainer.kl_ctl.state_dict()
else:
    from _callbacks_helpers import good_reward, grpo_config, polite_reward, prompt_dataset, prompts
    from hf_rlhf_ext.callbacks import (GradientVarianceCallback, GroupAdvantageCheckCallback,
                                       KLToReferenceCallback, OveroptimizationCallback)
    from hf_rlhf_ext.callbacks.adaptive_kl import AdaptiveKLCallback
    from hf_rlhf_ext.trainers.kl_control import AdaptiveKLController

    funcs = dict(reward_funcs=[good_reward, polite_reward], train_dataset=prompt_dataset())
    if kind == "reinforce":
        from hf_rlhf_ext.trainers.reinforce import ReinforceConfig, ReinforceTrainer

        args = ReinforceConfig(out, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                               reward_weights=[1.0, 0.0], report_to="none", use_cpu=True, disable_tqdm=True, **common)
        trainer = ReinforceTrainer(model=model_path, args=args, **funcs)
        report["baseline"] = lambda: trainer.running_baseline.state_dict()
    else:
        from trl import GRPOTrainer

        trainer = GRPOTrainer(model=model_path, args=grpo_config(out, beta=0.04, reward_weights=[1.0, 0.0], **common),
                              **funcs)
        kl = AdaptiveKLCallback.attach(trainer, AdaptiveKLController(0.04, target=1e-3, horizon=40))
        monitor = KLToReferenceCallback(trainer, prompts(8), every_n_steps=1, num_samples=8)
        groups = GroupAdvantageCheckCallback(trainer)
        variance = GradientVarianceCallback(trainer, every_n_steps=2, num_estimates=2)
        callbacks += [monitor, groups, variance]
        report.update(kl_controller=lambda: kl.controller.state_dict(), beta=lambda: trainer.beta,
                      kl_history=lambda: monitor.history, group_history=lambda: groups.history,
                      grad_var=lambda: [m.to_dict() for m in variance.measurements])
    tracker = OveroptimizationCallback(trainer)  # logs mode: proxy weight 1, gold weight 0; saves the gold peak
    callbacks.append(tracker)
    report["tracker"] = lambda: tracker.state_dict()
for cb in callbacks + [HoldAfterFirstCheckpoint()]:
    trainer.add_callback(cb)
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(os.path.join(out, "final"))
result = {"log_history": trainer.state.log_history, **{k: f() for k, f in report.items()}}
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)
'''


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, TESTS_DIR=str(TESTS), MAX_STEPS=str(MAX_STEPS), SAVE_STEP=str(SAVE_STEP),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(script: Path, kind: str, model: str, out: Path, *resume: str, **env: str) -> subprocess.Popen:
    log = open(f"{out}.log", "w")
    return subprocess.Popen([sys.executable, str(script), kind, model, str(out), *resume], env=_env(**env),
                            stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, Path(f"{out}.log").read_text()[-3000:]


def _kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    """Polls for checkpoint-SAVE_STEP (complete once its trainer_state.json is written), then SIGKILLs the run."""
    checkpoint = out / f"checkpoint-{SAVE_STEP}"
    deadline = time.monotonic() + timeout
    while not (checkpoint / "trainer_state.json").is_file():
        assert proc.poll() is None, Path(f"{out}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint before the timeout"
        time.sleep(0.1)
    time.sleep(0.5)  # the Trainer is past the checkpoint (on_save holds it there)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "result.json").exists() and not (out / f"checkpoint-{MAX_STEPS}").exists()
    return checkpoint


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no weights in {directory}"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _after(records: list[dict], step: int) -> list[dict]:
    """The training records logged after ``step``, without the keys that are not results."""
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in records if r["step"] > step and "loss" in r]


def _assert_close(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{what}: keys only in one run: {sorted(set(a) ^ set(b))}"
        for key in a:
            _assert_close(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert b == pytest.approx(a, rel=TOL["rtol"], abs=TOL["atol"], nan_ok=True), what
    else:
        assert a == b, what


def _kill_resume_and_compare(tmp_path: Path, kind: str, model: str) -> tuple[dict, dict]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole = _start(script, kind, model, whole_dir)
    killed = _start(script, kind, model, killed_dir, HOLD_AFTER_CHECKPOINT="1")
    checkpoint = _kill_after_first_checkpoint(killed, killed_dir)
    _wait(_start(script, kind, model, killed_dir, str(checkpoint)), killed_dir)
    _wait(whole, whole_dir)
    a, b = (json.loads((d / "result.json").read_text()) for d in (whole_dir, killed_dir))

    wa, wb = _weights(whole_dir / "final"), _weights(killed_dir / "final")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], **TOL, msg=f"final weight {name}")
    initial = _weights(Path(model))
    assert any(not torch.equal(wa[n], initial[n]) for n in wa if n in initial), "training did not move the policy"
    logged_a, logged_b = _after(a["log_history"], SAVE_STEP), _after(b["log_history"], SAVE_STEP)
    assert [r["step"] for r in logged_b] == list(range(SAVE_STEP + 1, MAX_STEPS + 1))
    _assert_close(logged_a, logged_b, "log records after the resume point")
    return a, b


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, str]:
    from _callbacks_helpers import build_policy
    from _ppo_helpers import build_world

    root = tmp_path_factory.mktemp("resume_worlds")
    return {"ppo": build_world(str(root / "ppo"))["policy"], "grpo": build_policy(str(root / "grpo"))}


def test_ppo_killed_after_its_first_checkpoint_resumes_to_the_same_end(worlds, tmp_path):
    """Policy, critic (through the final weights and the logged value losses), optimizer, RNG and the adaptive KL
    controller all come back: the resumed run logs the same steps 3-4 and ends with the same weights and β."""
    a, b = _kill_resume_and_compare(tmp_path, "ppo", worlds["ppo"])
    assert any("val/loss" in k or "value" in k for k in _after(a["log_history"], SAVE_STEP)[0])  # the critic trained
    _assert_close(a["kl_controller"], b["kl_controller"], "KL controller")
    assert a["kl_controller"]["num_updates"] == MAX_STEPS and a["kl_controller"]["value"] != pytest.approx(0.05)
    _critic_weights_match(tmp_path)


def _critic_weights_match(tmp_path: Path) -> None:
    critic = [p for p in (tmp_path / "whole" / "final").rglob("*.safetensors") if "value" in str(p.parent)]
    assert critic, "the final PPO model has no saved critic"
    for path in critic:
        other = tmp_path / "killed" / path.relative_to(tmp_path / "whole")
        wa, wb = _weights(path.parent), _weights(other.parent)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], **TOL, msg=f"critic {name}")


def test_grpo_with_all_our_callbacks_killed_and_resumed(worlds, tmp_path):
    """GRPO with the adaptive KL callback, the KL monitor, the group-advantage check, the gradient-variance monitor
    and the over-optimisation tracker: their state (controller, histories, best-so-far, peak checkpoint) rides in the
    checkpoint's trainer_state.json and the resumed run ends with the same state as the uninterrupted one."""
    a, b = _kill_resume_and_compare(tmp_path, "grpo", worlds["grpo"])
    for key in ("kl_controller", "beta", "kl_history", "group_history", "grad_var"):
        _assert_close(a[key], b[key], key)
    _assert_tracker_matches(a["tracker"], b["tracker"], tmp_path)
    assert a["kl_controller"]["num_updates"] == MAX_STEPS  # restored, not restarted at the resume point
    assert [h["step"] for h in b["kl_history"]] == list(range(0, MAX_STEPS + 1))  # measured once per step
    assert len(b["group_history"]) == MAX_STEPS and [m["step"] for m in b["grad_var"]] == [0, 2]
    tracker = b["tracker"]
    assert [p["step"] for p in tracker["points"]] == list(range(1, MAX_STEPS + 1)) and tracker["best"] is not None
    assert tracker["kl_source"] == "held_out_k3"


def _assert_tracker_matches(a: dict, b: dict, tmp_path: Path) -> None:
    """Same curve, best-so-far and peak; each run's peak checkpoint in its own output dir, with the same weights."""
    assert (a["checkpoint_dir"], b["checkpoint_dir"]) == tuple(str(tmp_path / d / "gold_peak") for d in ("whole",
                                                                                                          "killed"))
    _assert_close({**a, "checkpoint_dir": None}, {**b, "checkpoint_dir": None}, "tracker")
    assert b["checkpoint_step"] == json.loads((tmp_path / "killed" / "gold_peak" / "peak_info.json").read_text())[
        "global_step"]
    wa, wb = _weights(tmp_path / "whole" / "gold_peak"), _weights(tmp_path / "killed" / "gold_peak")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], **TOL, msg=f"gold-peak weight {name}")


def test_reinforce_killed_and_resumed_keeps_its_running_mean_baseline(worlds, tmp_path):
    a, b = _kill_resume_and_compare(tmp_path, "reinforce", worlds["grpo"])
    _assert_close(a["baseline"], b["baseline"], "running-mean baseline")
    assert b["baseline"]["num_updates"] == MAX_STEPS  # restored at 2, then two more batches
    _assert_tracker_matches(a["tracker"], b["tracker"], tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# The β sweep: killed between two points, rerun
# ----------------------------------------------------------------------------------------------------------------------
SWEEP_REWARDS = r'''
"""Rewards of the sweep test. `held_reward` holds the process once the results file has a finished point, so that
the kill lands inside the second point (the hold is an environment setting: it is not part of the sweep's config)."""
import os, time


def held_reward(prompts=None, completions=None, **kwargs):
    path = os.environ.get("HOLD_WHEN_RESULTS_HAVE_A_POINT")
    if path and os.path.isfile(path) and len(open(path).read().splitlines()) > 1:
        time.sleep(600)
    return [len((c[0]["content"] if isinstance(c, list) else c).split()) / 10 for c in completions]
'''


def _sweep_argv(world: dict, data: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", world["policy"], "--dataset_name", str(data), "--reward_funcs",
            "sweep_rewards.held_reward", "_ppo_helpers.target_word", "--reward_weights", "1", "0", "--output_dir",
            str(out), "--max_steps", "2", "--eval_every", "2", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "6", "--num_eval_prompts", "8",
            "--learning_rate", "0.05", "--betas", "0", "1.0"]


def _point_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if '"header"' not in line]


def _without_seconds(lines: list[str]) -> list[dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
    return sorted(rows, key=lambda r: (r["beta"], r["seed"]))


def test_a_sweep_killed_mid_way_reruns_only_the_unfinished_points(tmp_path, monkeypatch):
    """SIGKILL while the second of two points trains; the rerun keeps the finished point's line as it was, trains only
    the other one, and its results equal an uninterrupted sweep's, field for field (all but the wall-clock seconds)."""
    from _ppo_helpers import build_world, prompts

    from hf_rlhf_ext.experiments import sweeps

    world = build_world(str(tmp_path / "world"))
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(16)["prompt"]))
    (tmp_path / "sweep_rewards.py").write_text(SWEEP_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "killed"
    results = out / "results.jsonl"
    env = _env(HOLD_WHEN_RESULTS_HAVE_A_POINT=str(results))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TESTS), env["PYTHONPATH"]])
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "beta_sweep.py"),
                                 *_sweep_argv(world, data, out)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (results.is_file() and _point_lines(results)):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no finished point before the timeout"
        time.sleep(0.2)
    time.sleep(1.0)  # the second point is training (and held)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    finished = _point_lines(results)
    assert [json.loads(line)["beta"] for line in finished] == [0.0]

    sweeps.run_sweep(_sweep_argv(world, data, out), progress=False)
    assert json.loads((out / "metrics.json").read_text())["seconds"]["points_run_now"] == 1
    rerun = _point_lines(results)
    assert rerun[0] == finished[0] and len(rerun) == 2  # the finished point kept as it was, not redone

    sweeps.run_sweep(_sweep_argv(world, data, tmp_path / "whole"), progress=False)
    whole = _without_seconds(_point_lines(tmp_path / "whole" / "results.jsonl"))
    assert [(r["beta"], r["seed"]) for r in whole] == [(0.0, 0), (1.0, 0)]
    assert _without_seconds(rerun) == whole


@pytest.mark.slow
def test_ctrl_c_on_the_lab_recipe_names_the_checkpoint_and_its_resume_ends_where_the_whole_run_ends(tmp_path):
    """The PPO recipe's defaults save every few steps; Ctrl-C (SIGINT) past an epoch boundary prints one line with the
    command that resumes, exit code 130; that command ends with the uninterrupted run's numbers."""
    import shlex

    flags = ["--max_steps", "24", "--save_steps", "4", "--num_eval_prompts", "16", "--disable_tqdm", "true",
             "--monitor", "none"]  # 10 steps an epoch (320 prompts, 32 a step)
    script = str(ROOT / "recipes" / "ppo.py")
    env = _env()

    def run(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, script, *flags, "--output_dir", str(out), *extra], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    whole = run(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    interrupted = run(tmp_path / "interrupted")
    deadline = time.monotonic() + 600
    while not (tmp_path / "interrupted" / "checkpoint-12" / "trainer_state.json").is_file():
        assert interrupted.poll() is None and time.monotonic() < deadline, interrupted.stderr.read()[-3000:]
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("ppo.py: interrupted at step "), err[-3000:]
    card = (tmp_path / "interrupted" / "README.md").read_text()
    assert "An unfinished run: interrupted at step" in card and "huggingface.co/None" not in card
    command = shlex.split(line.split(" with: ", 1)[1])
    checkpoint = command[command.index("--resume_from_checkpoint") + 1]
    assert int(checkpoint.rsplit("-", 1)[1]) >= 12 and Path(checkpoint).is_dir()
    args = command[command.index(script) + 1 :] if script in command else command[3:]  # after the launcher
    resumed = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "interrupted"))
    assert b["global_step"] == a["global_step"] == 24
    for key in ("kl_after", "gold_reward_after", "proxy_reward_after"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_ctrl_c_in_training_names_the_last_checkpoint_and_writes_an_unfinished_runs_card(tmp_path, capsys,
                                                                                          monkeypatch):
    """The fast half of the test above: Ctrl-C inside ``trainer.train()`` exits 130 with one line that names the last
    checkpoint and the same command with ``--resume_from_checkpoint``, and the folder's card says the run is
    unfinished (not TRL's generic card, which links to ``huggingface.co/None``)."""
    from types import SimpleNamespace

    from hf_rlhf_ext.run.errors import cli_main
    from hf_rlhf_ext.run.finish import train_or_name_the_checkpoint

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)  # typed as `python recipes/ppo.py`
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()

    def train(resume_from_checkpoint=None):
        raise KeyboardInterrupt

    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None, push_to_hub=False)
    trainer = SimpleNamespace(train=train, state=SimpleNamespace(global_step=23, max_steps=60), args=args,
                              accelerator=SimpleNamespace(is_main_process=True))
    cli = ["--max_steps", "60", "--resume_from_checkpoint", "old", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        cli_main(lambda: train_or_name_the_checkpoint(trainer, args, "recipes/ppo.py", cli))
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    checkpoint = tmp_path / "checkpoint-20"
    assert (f"interrupted at step 23 of 60; resume from its last checkpoint (checkpoint-20) with: python "
            f"recipes/ppo.py --max_steps 60 --output_dir {tmp_path} --resume_from_checkpoint {checkpoint}") in err
    card = (tmp_path / "README.md").read_text()
    assert "An unfinished run: interrupted at step 23 of 60" in card and "huggingface.co/None" not in card

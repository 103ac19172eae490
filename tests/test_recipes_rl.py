"""The RL recipes (recipes/ppo.py, recipes/grpo.py) and their shared plumbing (hf_rlhf_ext.run.build).

Fast tests run the recipes in-process on tiny stand-in models (``--model_name_or_path``, ``--dataset_name``,
``--reward_funcs``); the lab runs and the acceptance test are ``slow``. The one-vs-two-process comparison starts
gloo ranks (``multiprocess``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _recipe_helpers import load_recipe, recipe_world, run_recipe

from hf_rlhf_ext.results import read_log_history, read_metrics
from hf_rlhf_ext.validation import DataValidationError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


_recipe, _run = load_recipe, run_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_world")
    paths = recipe_world(root)
    bad_dir = root / "bad"
    bad_dir.mkdir()
    with open(bad_dir / "train.jsonl", "w") as f:
        f.write(json.dumps({"question": "hello"}) + "\n")
    return {**paths, "bad": str(bad_dir)}


def _tiny_argv(tiny, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--logging_steps", "1",
            "--num_eval_prompts", "4", "--disable_tqdm", "true", *extra]


def test_ppo_recipe_on_a_hub_style_model_writes_the_results_contract(tiny, tmp_path):
    metrics = _run("ppo", _tiny_argv(tiny, tmp_path, "--reward_model_name_or_path", tiny["reward"],
                                     "--num_ppo_epochs", "1"))  # one generation per step: objective/kl at each
    written = read_metrics(str(tmp_path))
    assert written["global_step"] == metrics["global_step"] == 2
    assert written["on_lab"] is False and written["reward_funcs"] == ["reward", "target_word"]
    assert set(written["eval_before"]) >= {"reward", "target_word", "eos_rate", "mean_length"}
    assert "kl_to_reference" in written["eval_after"] and len(written["samples_after"]) == 4
    logs = read_log_history(str(tmp_path))
    assert [r["step"] for r in logs if "objective/kl" in r] == [1, 2]
    assert (tmp_path / "value_model" / "value_head.safetensors").is_file()
    assert (tmp_path / "model.safetensors").is_file()


def test_ppo_recipe_with_lora_and_a_critic_on_the_shared_base(tiny, tmp_path):
    _run("ppo", _tiny_argv(tiny, tmp_path, "--use_peft", "--critic_shares_base", "true"))  # PEFT picks c_attn
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "value_model" / "adapter" / "adapter_model.safetensors").is_file()
    assert read_metrics(str(tmp_path))["eval_after"]["kl_to_reference"] is not None


def test_grpo_recipe_runs_with_the_same_plumbing(tiny, tmp_path):
    _run("grpo", _tiny_argv(tiny, tmp_path, "--num_generations", "2"))
    written = read_metrics(str(tmp_path))
    assert written["global_step"] == 2 and "target_word" in written["eval_after"]
    assert any("rewards/target_word/mean" in r for r in read_log_history(str(tmp_path)))


def test_recipe_refuses_a_dataset_without_prompts(tiny, tmp_path):
    argv = _tiny_argv(tiny, tmp_path)
    argv[argv.index("--dataset_name") + 1] = tiny["bad"]
    with pytest.raises(DataValidationError, match="prompt"):
        _run("ppo", argv)


def test_reward_funcs_are_imported_and_validated():
    from hf_rlhf_ext.rewards import import_reward_func

    func = import_reward_func("_ppo_helpers.target_word")
    assert func.__name__ == "target_word"
    assert func(prompts=["a"], completions=["good good"]) == [1.0]
    with pytest.raises(ValueError, match="Unknown reward function"):
        import_reward_func("no_such_reward")


def test_config_files_parse(tmp_path):
    for name in ("ppo", "grpo"):
        parser = _recipe(name).make_parser()
        script_args, training_args, _ = parser.parse_args_and_config(
            args=["--config", str(ROOT / "recipes" / "configs" / f"{name}_lab.yaml"), "--output_dir", str(tmp_path)]
        )
        assert training_args.learning_rate == 1e-4 and training_args.max_steps == 60
        assert script_args.track_gold is True
    _, ppo_args, _ = _recipe("ppo").make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "recipes" / "configs" / "ppo_lab.yaml")])
    assert (ppo_args.kl_coef, ppo_args.beta, ppo_args.num_generations) == (0.1, 0.1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# On the lab (slow: the first call builds the lab, then every run trains for real)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ppo_recipe_on_the_lab_tracks_gold_without_steering(tmp_path):
    _run("ppo", ["--output_dir", str(tmp_path), "--max_steps", "4", "--logging_steps", "2",
                 "--num_eval_prompts", "16", "--disable_tqdm", "true"])
    written = read_metrics(str(tmp_path))
    assert written["on_lab"] is True
    assert written["reward_funcs"] == ["proxy_reward", "gold_reward"] and written["reward_weights"] == [1.0, 0.0]
    logs = [r for r in read_log_history(str(tmp_path)) if "objective/scores" in r]
    assert len(logs) == 2 and all("rewards/gold_reward/mean" in r for r in logs)
    # weight 0: the score PPO optimises is the proxy alone
    assert all(r["objective/scores"] == pytest.approx(r["rewards/proxy_reward/mean"], abs=1e-5) for r in logs)


@pytest.mark.slow
def test_acceptance_ppo_raises_held_out_gold_with_bounded_kl(tmp_path):
    """The default lab run: held-out gold of the trained policy clearly above the SFT policy's, KL bounded."""
    _run("ppo", ["--output_dir", str(tmp_path), "--num_eval_prompts", "320", "--disable_tqdm", "true"])
    m = read_metrics(str(tmp_path))
    gain = m["gold_reward_after"] - m["gold_reward_before"]
    assert gain > 0.08, m["eval_after"]  # 320 samples: the standard error of each mean is ≈ 0.035
    assert m["proxy_reward_after"] > m["proxy_reward_before"]
    # nats per completion, on fresh samples: the leash holds the KL near what it was measured at (0.72; largest
    # logged rollout KL 0.88); the β sweep's unpenalised (β = 0) runs end near 3.7
    assert 0.2 < m["kl_after"] < 1.5
    logs = [r for r in read_log_history(str(tmp_path)) if "objective/kl" in r]
    assert max(r["objective/kl"] for r in logs) < 1.5
    assert logs[-1]["val/explained_variance"] > 0.0  # the critic learned something beyond the mean


# ----------------------------------------------------------------------------------------------------------------------
# One process and two gloo ranks
# ----------------------------------------------------------------------------------------------------------------------
HARNESS = r'''
"""Loaded at interpreter start-up (sitecustomize) by every process of the 1-vs-2-process test.

ROW_KEYED_SAMPLING: torch.multinomial draws with Gumbel-max noise keyed by (draw number, global row), not by the
process's RNG stream. The distribution sampled from is unchanged; only the noise source is: row i of a rank holding B
rows is global row rank * B + i, so one process of 2B rows and two ranks of B rows draw the same completions.
WRITE_AUDIT: every file a process opens for writing under WRITE_AUDIT_WATCH is recorded in
WRITE_AUDIT/<RANK>-<pid>.json at exit.
"""
import os

if os.environ.get("ROW_KEYED_SAMPLING"):
    import torch

    _draws = [0]

    def _rank():
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def row_keyed_multinomial(probs, num_samples=1, replacement=False, *, generator=None, out=None):
        assert num_samples == 1 and probs.dim() == 2, "the harness replaces single draws from (B, V) probabilities"
        draw, first = _draws[0], _rank() * probs.shape[0]
        _draws[0] += 1
        noise = torch.stack([
            torch.rand(probs.shape[1], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(draw * 100_003 + first + i))
            for i in range(probs.shape[0])
        ])
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300)))
        return (probs.double().log() + gumbel.to(probs.device)).argmax(-1, keepdim=True)

    torch.multinomial = row_keyed_multinomial

if os.environ.get("WRITE_AUDIT"):
    import atexit, json, sys

    _watch, _written = os.path.abspath(os.environ["WRITE_AUDIT_WATCH"]), set()

    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and os.path.abspath(path).startswith(_watch + os.sep):
            _written.add(os.path.relpath(os.path.abspath(path), _watch))

    def _dump():
        name = f"{os.environ.get('RANK', 'none')}-{os.getpid()}.json"
        with open(os.path.join(os.environ["WRITE_AUDIT"], name), "w") as f:
            json.dump(sorted(_written), f)

    sys.addaudithook(_hook)
    atexit.register(_dump)
'''

# keys of a log record that may differ between the runs: timings, memory, PPO's check of the sampler's log-probs on
# the main process's rows, and the reward guard's counts, which are per process (TRL averages a reward function's
# log_metric over the processes: 1 empty completion on one of two ranks logs 0.5)
NOT_COMPARED = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "memory/peak_mb",
                "sampling/logp_max_diff", "reward_guard/empty_completions", "reward_guard/zero_std_groups",
                "reward_guard/dropped", "reward_guard/dropped_total")
PROCESS_TOL = dict(rel=1e-4, abs=1e-5)
# Weights: Adam divides each gradient by its running RMS, so a gradient that is zero in exact arithmetic (the attention
# key bias) turns float noise of ~1e-9 into steps of its own; measured 1.4e-5 apart after 3 steps at lr 1e-2 (PPO).
# 1e-4 is 1% of one Adam step at that learning rate.
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    """A port no one listens on now: two suites on one host must not meet on accelerate's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_chat_template(policy: str, dest: Path) -> str:
    """A copy of the tiny policy whose tokenizer has no chat template, so its plain prompts reach the model as they
    are: the runs compared are those whose tolerances were measured (a template makes every prompt a longer chat
    turn, and float sums in another order drift further)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(policy, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.chat_template = None
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(dest)
    return str(dest)


def _launch(recipe: str, argv: list[str], out: Path, harness: Path, processes: int) -> dict:
    """Runs a recipe on one process or on two gloo ranks (accelerate, cpu_2proc.yaml, a free port); returns which
    files each process opened for writing under ``out``."""
    audit = out.parent / f"{out.name}_audit"
    audit.mkdir()
    env = {**ENV, "ROW_KEYED_SAMPLING": "1", "WRITE_AUDIT": str(audit), "WRITE_AUDIT_WATCH": str(out),
           "PYTHONPATH": os.pathsep.join([str(harness), str(ROOT / "tests"), str(ROOT), ENV.get("PYTHONPATH", "")])}
    launcher = [sys.executable]
    if processes == 2:
        launcher += ["-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port())]
    run = subprocess.run([*launcher, str(ROOT / "recipes" / f"{recipe}.py"), "--output_dir", str(out), *argv],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    writes: dict[str, set] = {}
    for path in audit.glob("*.json"):
        writes.setdefault(path.name.split("-")[0], set()).update(json.loads(path.read_text()))
    return writes


def _training_records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in read_log_history(str(out)) if "loss" in r]


def _assert_records_match(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]  # one record per step: no rank duplicates
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
        for key, value in a.items():
            if isinstance(value, (int, float)):
                assert b[key] == pytest.approx(value, nan_ok=True, **PROCESS_TOL), (a["step"], key)


def _assert_weights_match(one: Path, two: Path) -> None:
    import torch
    from safetensors.torch import load_file

    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], **WEIGHT_TOL, msg=f"{name}:{key}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_two_cpu_processes_match_one(tiny, tmp_path, recipe):
    """The same run (seed 0, 3 steps, the same global batch) on one process and on two gloo ranks (half each)
    gives the same losses, rewards and every other logged statistic within 1e-4 relative / 1e-5 absolute (float32
    sums in another order: an all-reduce of two halves), and the same final weights (policy and critic) within
    ``WEIGHT_TOL``.

    Why the sampling is replaced: TRL seeds each rank with ``seed + rank`` (``set_seed(device_specific=True)``), so
    two ranks draw other completions than one process even from identical distributions, and every number after the
    first draw differs by sampling noise. The harness (sitecustomize) keys the noise of each draw by the completion's
    global row instead (Gumbel-max: the distribution is unchanged), so both runs sample the same completions and
    what must agree — data sharding, rewards, advantages on the gathered batch, the loss normalisation, gradient
    averaging, the critic's updates, the KL controller — is compared exactly. EOS is switched off so that every
    generation makes the same number of draws on every rank, and the held-out evaluation (main process only) is off.

    Only the main process writes files: rank 1 opens no file for writing under the output directory, and the two
    runs leave the same files.
    """
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "sitecustomize.py").write_text(HARNESS)
    policy = _without_chat_template(tiny["policy"], tmp_path / "policy")
    common = ["--model_name_or_path", policy, "--dataset_name", tiny["data"], "--reward_funcs",
              "_ppo_helpers.target_word", "--max_steps", "3", "--logging_steps", "1", "--num_eval_prompts", "0",
              "--max_completion_length", "6", "--generation_kwargs", '{"eos_token_id": null}', "--learning_rate",
              "0.01", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--save_strategy", "no"]
    if recipe == "grpo":
        common += ["--num_generations", "4"]
    batch = {"ppo": 16, "grpo": 32}[recipe]  # completions per step; PPO's 16 are the 16 prompts, GRPO's 8 × 4
    one_writes = _launch(recipe, [*common, "--per_device_train_batch_size", str(batch)], tmp_path / "one", harness, 1)
    two_writes = _launch(recipe, [*common, "--per_device_train_batch_size", str(batch // 2)], tmp_path / "two",
                         harness, 2)

    assert set(two_writes) == {"0", "1", "none"}  # the two ranks and the launcher
    assert two_writes["1"] == set() and two_writes["none"] == set() and two_writes["0"] == one_writes["none"]
    names = {run: sorted(p.name for p in (tmp_path / run).rglob("*")) for run in ("one", "two")}
    assert names["two"] == names["one"]
    one, two = _training_records(tmp_path / "one"), _training_records(tmp_path / "two")
    _assert_records_match(one, two)
    _assert_weights_match(tmp_path / "one", tmp_path / "two")
    from safetensors.torch import load_file

    start, end = (load_file(str(Path(d) / "model.safetensors")) for d in (policy, tmp_path / "one"))
    assert max(float((end[k] - start[k]).abs().max()) for k in start) > 100 * WEIGHT_TOL["atol"]  # it trained
    assert read_metrics(str(tmp_path / "two"))["global_step"] == 3

"""Faults in reward functions during training: NaN/inf stops the run with the inputs saved (or is dropped and counted
with nan_rewards="drop"), a function that raises stops the run with its inputs saved, empty completions and
zero-std groups are counted — for our trainers and for a vanilla trl.GRPOTrainer given the guard."""

from __future__ import annotations

import json
import math
import os

import pytest
from _ppo_helpers import build_world, ppo_args, prompts, target_word

from hf_rlhf_ext.reward_guard import (
    FAULTS_DIR,
    NonFiniteRewardError,
    RewardFunctionError,
    RewardGuard,
    attach_reward_guard,
    guard_reward_funcs,
)


def nan_on_first(prompts=None, completions=None, **kwargs):
    """target_word, but NaN for the first completion of every batch."""
    values = target_word(prompts=prompts, completions=completions)
    values[0] = math.nan
    return values


def divides_by_words(prompts=None, completions=None, **kwargs):
    return [1.0 / len(c.split()) if c != "boom" else 1 / 0 for c in completions]


def _faults(output_dir) -> list[dict]:
    folder = os.path.join(output_dir, FAULTS_DIR)
    return [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]


# ----------------------------------------------------------------------------------------------------------------------
# The guard on its own
# ----------------------------------------------------------------------------------------------------------------------
def test_nan_stops_with_the_function_named_and_the_offending_inputs_saved(tmp_path):
    guard = RewardGuard([target_word, nan_on_first], str(tmp_path))
    with pytest.raises(NonFiniteRewardError, match=r"'nan_on_first' returned nan for 1 of 2 completions") as info:
        guard.reward_funcs[0](prompts=["p0", "p1"], completions=["good", "bad"])
    (record,) = _faults(tmp_path)
    assert info.value.path.startswith(str(tmp_path / FAULTS_DIR))
    assert record["reward_functions"] == {"nan_on_first": [0]}
    assert [(r["prompt"], r["completion"]) for r in record["rows"]] == [("p0", "good")]
    assert record["values"] == {"nan_on_first": ["nan"]}


def test_inf_is_a_fault_too(tmp_path):
    guard = RewardGuard([lambda prompts, completions, **kw: [math.inf] * len(completions)], str(tmp_path))
    with pytest.raises(NonFiniteRewardError, match="returned inf"):
        guard.reward_funcs[0](prompts=["p"], completions=["c"])


def test_drop_makes_the_sample_unscorable_in_every_function_and_counts_it(tmp_path):
    logged = []
    guard = RewardGuard([target_word, nan_on_first], str(tmp_path), nan_rewards="drop")
    kwargs = dict(prompts=["p0", "p1", "p2"], completions=["good", "bad good", "a"],
                  log_metric=lambda name, value: logged.append((name, value)))
    first = guard.reward_funcs[0](**kwargs)
    second = guard.reward_funcs[1](**kwargs)
    assert first == [None, 0.5, 0.0]  # finite in this function, dropped because the other one was NaN
    assert second == [None, 0.5, 0.0]
    assert guard.counts["dropped"] == 1
    assert ("reward_guard/dropped", 1.0) in logged
    assert not (tmp_path / FAULTS_DIR).exists()


def test_each_function_is_called_once_per_batch(tmp_path):
    calls = []

    def counted(prompts=None, completions=None, **kwargs):
        calls.append(len(completions))
        return [0.0] * len(completions)

    guard = RewardGuard([counted, target_word], str(tmp_path))
    kwargs = dict(prompts=["p"], completions=["c"])
    guard.reward_funcs[0](**kwargs), guard.reward_funcs[1](**kwargs)
    assert calls == [1]
    guard.reward_funcs[0](prompts=["p"], completions=["d"])  # a new batch is scored again
    assert calls == [1, 1]


def test_a_function_that_raises_stops_with_all_inputs_and_the_traceback_saved(tmp_path):
    guard = RewardGuard([divides_by_words], str(tmp_path))
    expected = r"'divides_by_words' raised ZeroDivisionError: division by zero \(step None\)"
    with pytest.raises(RewardFunctionError, match=expected) as info:
        guard.reward_funcs[0](prompts=["p0", "p1"], completions=["a b", "boom"], item=["x", "y"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    (record,) = _faults(tmp_path)
    assert [r["completion"] for r in record["rows"]] == ["a b", "boom"]
    assert [r["item"] for r in record["rows"]] == ["x", "y"]  # dataset columns are saved with the row
    assert "ZeroDivisionError" in record["traceback"]


@pytest.mark.parametrize(
    "output, message",
    [([1.0], "returned 1 values for 2 completions"), ([1.0, "high"], "non-number \\('high'\\) at index 1"),
     (None, "returned NoneType, not a list of floats"), ({"a": 1.0, "b": 2.0}, "returned dict")],
)
def test_wrong_shapes_stop_with_the_function_named(tmp_path, output, message):
    def shaped(prompts=None, completions=None, **kwargs):
        return output

    guard = RewardGuard([shaped], str(tmp_path))
    expected = rf"^Reward function 'shaped' .*{message}.*\(step None\)\. The batch's"
    with pytest.raises(RewardFunctionError, match=expected):
        guard.reward_funcs[0](prompts=["p", "p"], completions=["a", "b"])


def test_empty_completions_and_zero_std_groups_are_counted(tmp_path):
    logged = {}
    guard = RewardGuard([target_word], str(tmp_path))
    # two groups of two: the first has rewards (0, 0) — zero std —, the second (1, 0)
    values = guard.reward_funcs[0](prompts=["a", "a", "b", "b"], completions=["", "bad", "good", ""],
                                   log_metric=lambda name, value: logged.__setitem__(name, value))
    assert values == [0.0, 0.0, 1.0, 0.0]
    assert logged["reward_guard/empty_completions"] == 2.0
    assert logged["reward_guard/zero_std_groups"] == 1.0
    assert logged["reward_guard/dropped"] == 0.0


def test_a_group_of_dropped_samples_is_not_a_zero_std_group(tmp_path):
    logged = {}
    guard = RewardGuard([lambda prompts, completions, **kw: [math.nan, math.nan, 1.0, 1.0]], str(tmp_path),
                        nan_rewards="drop")
    guard.reward_funcs[0](prompts=["a", "a", "b", "b"], completions=["x", "y", "z", "w"],
                          log_metric=lambda name, value: logged.__setitem__(name, value))
    assert logged["reward_guard/dropped"] == 2.0 and logged["reward_guard/zero_std_groups"] == 1.0  # group "b" only


def test_guarded_functions_keep_their_names(tmp_path):
    funcs = guard_reward_funcs([target_word, nan_on_first], str(tmp_path))
    assert [f.__name__ for f in funcs] == ["target_word", "nan_on_first"]


# ----------------------------------------------------------------------------------------------------------------------
# Through the trainers' Python API
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("guard_world")))


def test_ppo_trainer_stops_on_a_nan_reward_naming_the_function(world, tmp_path):
    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(world["policy"], reward_funcs=[nan_on_first], args=ppo_args(str(tmp_path)),
                         train_dataset=prompts(8))
    with pytest.raises(NonFiniteRewardError, match="'nan_on_first' returned nan .* at step 0"):
        trainer.train()
    (record,) = _faults(tmp_path)
    assert record["step"] == 0 and record["rows"][0]["prompt"].startswith("customer :")


def test_grpo_trainer_with_the_guard_stops_on_a_nan_reward(world, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6, disable_tqdm=True)
    trainer = GRPOTrainer(world["policy"], reward_funcs=guard_reward_funcs([nan_on_first], args.output_dir),
                          args=args, train_dataset=prompts(8))
    with pytest.raises(NonFiniteRewardError, match="'nan_on_first' returned nan"):
        trainer.train()
    assert _faults(tmp_path)[0]["reward_functions"] == {"nan_on_first": [0]}


def test_ppo_drop_mode_trains_and_logs_the_dropped_count(world, tmp_path):
    from hf_rlhf_ext.results import ResultsCallback, read_log_history
    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    args = ppo_args(str(tmp_path), nan_rewards="drop")
    trainer = PPOTrainer(world["policy"], reward_funcs=[nan_on_first, target_word], args=args,
                         train_dataset=prompts(8), callbacks=[ResultsCallback(str(tmp_path))])
    trainer.train()
    logs = [r for r in read_log_history(str(tmp_path)) if "reward_guard/dropped" in r]
    assert [r["reward_guard/dropped"] for r in logs] == [1.0, 1.0]  # one sample per rollout of 4
    assert logs[-1]["reward_guard/dropped_total"] == 2.0
    assert trainer.reward_guard.counts["dropped"] == 2
    assert all(math.isfinite(r["loss"]) for r in logs)


def test_grpo_drop_mode_gives_the_dropped_sample_no_advantage(world, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=6, disable_tqdm=True,
                      temperature=1.0, reward_weights=[1.0, 0.0])

    def first_nan_rest_distinct(prompts=None, completions=None, **kwargs):
        return [math.nan] + [float(i) for i in range(1, len(completions))]

    # a tracked weight-0 function stays finite: without the guard TRL would score the row 0 and give it an advantage
    trainer = GRPOTrainer(world["policy"], reward_funcs=[first_nan_rest_distinct, target_word], args=args,
                          train_dataset=prompts(4))
    attach_reward_guard(trainer, nan_rewards="drop")
    trainer.train()
    advantages = list(trainer._logs["advantages"])[-4:]
    assert advantages[0] == 0.0
    # the others are centred on their own mean (2), not on a mean that counts the dropped sample
    assert [a > 0 for a in advantages[1:]] == [False, False, True] and advantages[2] == pytest.approx(0.0, abs=1e-4)


def test_zero_std_groups_are_counted_and_train_without_nan(world, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6, disable_tqdm=True,
                      logging_steps=1)

    def constant(prompts=None, completions=None, **kwargs):
        return [1.0] * len(completions)

    trainer = GRPOTrainer(world["policy"], reward_funcs=[constant], args=args, train_dataset=prompts(4))
    attach_reward_guard(trainer)
    trainer.train()
    (log,) = [r for r in trainer.state.log_history if "reward_guard/zero_std_groups" in r]
    assert log["reward_guard/zero_std_groups"] == 2.0 and log["frac_reward_zero_std"] == 1.0  # 2 groups of 2
    assert math.isfinite(log["loss"]) and list(trainer._logs["advantages"])[-4:] == [0.0] * 4


# ----------------------------------------------------------------------------------------------------------------------
# Two processes: a fault on one rank stops both
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_a_nan_on_one_rank_stops_both_ranks(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(root / "tests" / "_guard_probe.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = {r: json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in (0, 1)}
    # counts are over all processes: the one empty completion (rank 1's) is logged as 1 on both ranks
    assert [outcomes[r]["logged"]["reward_guard/empty_completions"] for r in (0, 1)] == [1.0, 1.0]
    assert outcomes[1]["raised"] == "NonFiniteRewardError"
    assert outcomes[1]["path"].endswith("step-None-non_finite-rank1.json") and os.path.isfile(outcomes[1]["path"])
    assert outcomes[0]["raised"] == "RewardFault" and "another process" in outcomes[0]["message"]

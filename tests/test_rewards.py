"""Reward adapters: reward models as TRL reward functions, the lab rewards by dotted path, weight-0 tracking."""

from __future__ import annotations

import math

import pytest
import torch
from _callbacks_helpers import (
    build_policy,
    build_reward_model,
    build_tokenizer,
    good_reward,
    grpo_config,
    prompt_dataset,
)

from hf_rlhf_ext.validation import DataValidationError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory) -> str:
    return build_reward_model(str(tmp_path_factory.mktemp("rw") / "tiny_rm"))


def test_reward_model_function_from_path(rm_path):
    from hf_rlhf_ext.rewards import RewardModelFunction

    rm = RewardModelFunction(rm_path, batch_size=2)
    assert rm.__name__ == "tiny_rm" and rm.name == "tiny_rm"
    assert RewardModelFunction(rm_path, name="judge").__name__ == "judge"
    prompts = ["customer : my kettle is broken agent :"] * 3
    completions = [" sorry we will send a new one", " bad bad", " thank you"]
    scores = rm(prompts=prompts, completions=completions)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3  # different texts, different scores
    # the scores are those of the model on prompt + reply tokens
    tok = build_tokenizer()
    ids = tok(prompts[0] + completions[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    direct = rm.model(input_ids=ids).logits[0, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-5)


def test_reward_model_function_conversational_matches_plain(rm_path):
    from hf_rlhf_ext.rewards import RewardModelFunction

    rm = RewardModelFunction(rm_path)
    plain = rm(prompts=["customer : my lamp is late agent :"], completions=["sorry thank you"])
    chat = rm(
        prompts=[[{"role": "user", "content": "my lamp is late"}]],
        completions=[[{"role": "assistant", "content": "sorry thank you"}]],
    )
    assert chat == pytest.approx(plain)


def test_reward_model_function_shows_eos_only_when_emitted(rm_path):
    from hf_rlhf_ext.rewards import RewardModelFunction

    rm = RewardModelFunction(rm_path)
    tok = rm.tokenizer
    eos = tok.eos_token_id
    prompts, completions = ["customer : my chair is broken agent :"] * 2, ["sorry"] * 2
    comp_ids = [tok("sorry")["input_ids"] + [eos], tok("sorry")["input_ids"]]
    seqs = rm.sequences(prompts, completions, comp_ids)
    assert seqs[0][-1] == eos and seqs[1][-1] != eos and seqs[0][:-1] == seqs[1]
    terminated, cut = rm(prompts=prompts, completions=completions, completion_ids=comp_ids)
    assert terminated != pytest.approx(cut)
    assert RewardModelFunction(rm_path, append_eos=False).sequences(prompts, completions, comp_ids)[0][-1] != eos


def test_reward_model_function_bad_input(rm_path, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_rlhf_ext.rewards import RewardModelFunction

    two = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelFunction(two, tokenizer=build_tokenizer())
    one = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2, num_labels=1))
    with pytest.raises(ValueError, match="tokenizer"):
        RewardModelFunction(one)
    with pytest.raises(TypeError, match="model directory"):
        RewardModelFunction(42)
    rm = RewardModelFunction(rm_path)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rm(prompts=["a", "b"], completions=["c"])


def test_tracking_renames_and_validates(rm_path):
    from hf_rlhf_ext.rewards import tracking

    tracked = tracking(good_reward)
    assert tracked.__name__ == "good_reward_tracked"
    assert tracked(prompts=["p"], completions=["good good"]) == [2.0]
    assert tracking(good_reward, "gold").__name__ == "gold"
    assert tracking(rm_path, "rm_judge").__name__ == "rm_judge"

    def broken(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    with pytest.raises(DataValidationError, match="broken_tracked"):
        tracking(broken)(prompts=["p"], completions=["c"])
    with pytest.raises(TypeError):
        tracking(3)


def test_ensemble_judge_penalises_disagreement():
    from hf_rlhf_ext.rewards import ensemble_judge

    def a(prompts, completions, **kw):
        return [1.0, 1.0]

    def b(prompts, completions, **kw):
        return [1.0, 3.0]

    logged = {}
    judge = ensemble_judge([a, b], penalty=1.0, name="judge")
    out = judge(prompts=["p", "q"], completions=["x", "y"], log_metric=lambda k, v: logged.update({k: v}))
    assert out[0] == pytest.approx(1.0)  # agreement: the mean
    assert out[1] == pytest.approx(2.0 - math.sqrt(2.0))  # mean 2, std √2
    assert logged["judge/disagreement"] == pytest.approx(math.sqrt(2.0) / 2)
    assert judge.__name__ == "judge"
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_judge([a])


@pytest.mark.parametrize(
    "objective, expected",
    [("mean", [2.0, 2.0, 5.0]), ("min", [1.0, 0.0, 5.0]), ("mean_minus_std", [2.0 - 1.0, 2.0 - 2.0, 5.0])],
)
def test_ensemble_reward_objectives_per_completion(objective, expected):
    from hf_rlhf_ext.rewards import ensemble_reward

    members = [
        lambda prompts, completions, **kw: [1.0, 0.0, 5.0],
        lambda prompts, completions, **kw: [2.0, 2.0, None],  # cannot score the third: left out of its statistics
        lambda prompts, completions, **kw: [3.0, 4.0, 5.0],
    ]
    reward = ensemble_reward(members, objective, penalty=1.0)
    out = reward(prompts=["p"] * 3, completions=["a", "b", "c"])
    assert out == pytest.approx(expected)
    assert reward.__name__ == f"ensemble_{objective}"


def test_ensemble_reward_min_never_exceeds_mean_and_uwo_orders_by_disagreement():
    from hf_rlhf_ext.rewards import ensemble_reward

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen).tolist()
    members = [lambda prompts, completions, s=s, **kw: s for s in scores]
    args = dict(prompts=["p"] * 50, completions=["c"] * 50)
    mean, low = ensemble_reward(members, "mean")(**args), ensemble_reward(members, "min")(**args)
    uwo = ensemble_reward(members, "mean_minus_std", penalty=2.0)(**args)
    assert all(lo <= m + 1e-12 for lo, m in zip(low, mean)) and any(lo < m - 0.1 for lo, m in zip(low, mean))
    stds = torch.tensor(scores).std(dim=0)
    assert torch.tensor(mean) - torch.tensor(uwo) == pytest.approx((2.0 * stds).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="objective"):
        ensemble_reward(members, "median")
    with pytest.raises(ValueError, match="penalty"):
        ensemble_reward(members, "mean_minus_std", penalty=-1)


def test_lab_gold_reward_is_the_lab_gold():
    from hf_rlhf_ext.lab.rewards import lab_gold_reward
    from hf_rlhf_ext.lab.task import gold_reward

    prompts = ["customer : my kettle is broken agent :"] * 2
    completions = [" sorry about your kettle , we will send a new one . have a nice day", " you you you you"]
    ids = [[5, 3], [5]]  # the first ended with EOS (id 3), the second ran into the length limit
    got = lab_gold_reward(prompts=prompts, completions=completions, completion_ids=ids)
    assert got == gold_reward(prompts, completions, completion_ids=ids)
    assert got[0] > got[1]
    assert lab_gold_reward.__name__ == "lab_gold_reward"


def test_lab_proxy_reward_loads_lazily(rm_path, monkeypatch):
    import hf_rlhf_ext.lab.rewards as lab_rewards

    calls = []

    def fake_path():
        calls.append(1)
        return rm_path

    monkeypatch.setattr(lab_rewards, "lab_reward_model_path", fake_path)
    monkeypatch.setattr(lab_rewards, "_lab_proxy", None)
    p, c = ["customer : my lamp is late agent :"], ["sorry"]
    first = lab_rewards.lab_proxy_reward(prompts=p, completions=c)
    second = lab_rewards.lab_proxy_reward(prompts=p, completions=c)
    assert calls == [1] and first == second and len(first) == 1
    assert lab_rewards._lab_proxy.__name__ == "lab_proxy_reward"


def test_weight_zero_reward_model_is_logged_not_optimised(rm_path, tmp_path):
    """A RewardModelFunction with weight 0 appears in TRL's logs and leaves the advantages to the other reward."""
    from trl import GRPOTrainer

    from hf_rlhf_ext.objectives import group_advantages
    from hf_rlhf_ext.rewards import RewardModelFunction

    policy = build_policy(str(tmp_path / "policy"))
    judge = RewardModelFunction(rm_path, name="judge")
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[good_reward, judge],
        args=grpo_config(str(tmp_path / "out"), max_steps=2, reward_weights=[1.0, 0.0]),
        train_dataset=prompt_dataset(),
    )
    trainer.train()
    logged = [r["rewards/judge/mean"] for r in trainer.state.log_history if "rewards/judge/mean" in r]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
    proxy = torch.tensor(list(trainer._logs["rewards"]["good_reward"]))
    expected = group_advantages(proxy, 4, scale="group")
    assert torch.allclose(torch.tensor(list(trainer._logs["advantages"])), expected, atol=1e-5)
    judged = torch.tensor(list(trainer._logs["rewards"]["judge"]))
    assert judged.std() > 0  # the judge did score (differently per completion)

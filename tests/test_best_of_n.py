"""Best-of-N (hf_rlhf_ext.experiments.best_of_n, recipes/best_of_n.py): the one-pool estimator against brute force, the
pool's
draws and log-probs, selection, the distillation data, the recipe on a tiny world; on the lab (slow): best-of-N's
gold hump and distillation beating the SFT model."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from _ppo_helpers import build_world, prompts, target_word

from hf_rlhf_ext.experiments.best_of_n import (
    CURVE_STATS,
    BestOfNSampler,
    DistillationRound,
    _batches,
    best_of_n_beirami_kl,
    best_of_n_curve,
    best_of_n_expectation,
    best_of_n_pool_kl_win_rate,
    best_of_n_sft_dataset,
    choose_round,
    sample_pool,
    sequence_kl,
)
from hf_rlhf_ext.objectives import (
    best_of_n_exact,
    best_of_n_kl_beirami,
    best_of_n_kl_win_rate,
    best_of_n_win_rate_bound,
)

ROOT = Path(__file__).resolve().parents[1]


def _brute_force(select: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over every n-subset of the value of its best member (ties: the mean of the tied members' values)."""
    out = []
    for row in range(select.shape[0]):
        total = 0.0
        subsets = list(itertools.combinations(range(select.shape[1]), n))
        for subset in subsets:
            s = select[row, list(subset)]
            best = [i for i, v in zip(subset, s.tolist()) if v == float(s.max())]
            total += float(values[row, best].mean())
        out.append(total / len(subsets))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_one_pool_estimator_equals_every_subset_enumerated(n):
    gen = torch.Generator().manual_seed(n)
    select = torch.randint(0, 4, (4, 7), generator=gen).double()  # few levels: many ties
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(best_of_n_expectation(select, values, n), _brute_force(select, values, n))


def test_estimator_edges_and_bad_input():
    select = torch.tensor([[0.1, 0.9, 0.5]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(best_of_n_expectation(select, values, 1)) == pytest.approx(2.0)  # n = 1: the plain mean
    assert float(best_of_n_expectation(select, values, 3)) == pytest.approx(2.0)  # n = M: value at the argmax (0.9)
    assert float(best_of_n_expectation(select, values, 2)) == pytest.approx((2 + 2 + 3) / 3)
    with pytest.raises(ValueError, match="n must be in"):
        best_of_n_expectation(select, values, 4)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n_expectation(torch.tensor([[0.0, math.nan]]), torch.tensor([[1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="must both be"):
        best_of_n_expectation(select, values[:, :2], 1)


def test_curve_points_kl_and_fit_from_scores():
    gen = torch.Generator().manual_seed(0)
    proxy = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    gold = proxy - 0.3 * proxy**2  # rises with the proxy, then falls: a hump in n
    curve = best_of_n_curve({"proxy": proxy, "gold": gold}, select="proxy", gold="gold")
    assert curve.column("n") == [1, 2, 4, 8, 16]
    assert curve.points[0]["proxy"] == pytest.approx(float(proxy.mean()))
    assert curve.points[-1]["proxy"] == pytest.approx(float(proxy.max(dim=1).values.mean()))
    assert curve.points[3]["kl"] == pytest.approx(math.log(8) - 7 / 8)
    assert curve.fit is not None and curve.fit.form == "bon" and curve.fit.n_points == 4  # n = 1 has d = 0
    with pytest.raises(ValueError, match="select"):
        best_of_n_curve({"proxy": proxy}, select="gold")


def _enumerate_best_of_n(probs, rewards, n):
    """KL(π_bon ‖ π) over outcomes and the win rate over a base draw, by enumerating every n-tuple of draws (the best
    reward's holders share the pick equally)."""
    k = len(probs)
    bon = [0.0] * k
    for draw in itertools.product(range(k), repeat=n):
        weight = math.prod(probs[i] for i in draw)
        top = max(rewards[i] for i in draw)
        holders = [i for i in draw if rewards[i] == top]
        for i in holders:
            bon[i] += weight / len(holders)
    kl = sum(q * math.log(q / p) for q, p in zip(bon, probs) if q > 0)
    win = sum(q * sum(p * ((r > s) + 0.5 * (r == s)) for p, s in zip(probs, rewards)) for q, r in zip(bon, rewards))
    return kl, win


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_best_of_n_kl_and_win_rate_equal_every_draw_enumerated(n):
    probs, rewards = [0.1, 0.25, 0.15, 0.3, 0.2], [0.0, 1.0, 1.0, 2.0, 3.0]  # outcomes 1 and 2 tie
    kl, win = best_of_n_exact(probs, rewards, n)
    want_kl, want_win = _enumerate_best_of_n(probs, rewards, n)
    assert kl == pytest.approx(want_kl, abs=1e-12) and win == pytest.approx(want_win, abs=1e-12)
    assert kl <= math.log(n) - (n - 1) / n + 1e-12 and win <= n / (n + 1)


def test_ties_keep_best_of_n_strictly_below_both_bounds():
    # two equally likely rewards, N = 2: P_bon = (1/4, 3/4), KL = 3/4·ln(3/2) − 1/4·ln 2, win = 1/4·1/4 + 3/4·3/4 = 5/8
    kl, win = best_of_n_exact([0.5, 0.5], [0.0, 1.0], 2)
    assert kl == pytest.approx(0.75 * math.log(1.5) - 0.25 * math.log(2), abs=1e-12)
    assert win == pytest.approx(5 / 8, abs=1e-12)
    assert kl < math.log(2) - 1 / 2 - 0.05 and win < 2 / 3
    assert best_of_n_exact([1.0], [7.0], 16) == (0.0, 0.5)  # one outcome: best-of-n is the base policy
    # a top atom of 1/4: KL → ln 4 (best-of-n picks it almost surely) while the formula grows like ln N
    kl, _ = best_of_n_exact([0.75, 0.25], [0.0, 1.0], 200)
    assert kl == pytest.approx(math.log(4), abs=1e-9) and kl <= math.log(4)


def test_many_distinct_rewards_reach_the_analytic_kl_and_win_rate():
    k, n = 100_000, 4
    kl, win = best_of_n_exact(torch.full((k,), 1 / k), torch.randperm(k, generator=torch.Generator().manual_seed(0)), n)
    assert kl == pytest.approx(math.log(4) - 3 / 4, abs=1e-6) and kl < math.log(4) - 3 / 4
    assert win == pytest.approx(4 / 5, abs=1e-6) and best_of_n_win_rate_bound(n) == 4 / 5


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_continuous_stretches_give_the_closed_forms(n):
    kl, win = best_of_n_kl_win_rate(torch.ones(5), torch.zeros(5, dtype=torch.bool), n)
    assert kl == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12) and win == pytest.approx(n / (n + 1), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_beirami_estimator_runs_from_the_analytic_bound_to_zero(n):
    """d_n(ε) is ln n − (n − 1)/n for outputs of vanishing base probability, 0 for a certain one, never above the
    bound and falling as ε grows."""
    bound = math.log(n) - (n - 1) / n
    eps = torch.logspace(-15, 0, 300, dtype=torch.float64)
    d = best_of_n_kl_beirami(n, eps)
    assert float(d[0]) == pytest.approx(bound, abs=1e-9) and float(d[-1]) == pytest.approx(0.0, abs=1e-12)
    assert bool((d <= bound + 1e-12).all()) and bool((d >= -1e-12).all())
    assert bool((d[1:] <= d[:-1] + 1e-12).all())
    with pytest.raises(ValueError, match="probability"):
        best_of_n_kl_beirami(n, torch.tensor([0.0]))


@pytest.mark.parametrize("k", [2, 5, 50])
@pytest.mark.parametrize("n", [2, 4, 16])
def test_beirami_estimator_lies_between_the_exact_kl_and_the_bound(k, n):
    """k equally likely outcomes with distinct rewards: the exact KL (every draw enumerated) ≤ d_n(1/k) ≤ the analytic
    value, and d_n is the closer of the two to the exact KL."""
    exact, _ = best_of_n_exact([1 / k] * k, list(range(k)), n)
    estimate = float(best_of_n_kl_beirami(n, 1 / k))
    bound = math.log(n) - (n - 1) / n
    assert exact <= estimate + 1e-12 and estimate <= bound + 1e-12
    assert abs(estimate - exact) < abs(bound - exact)


def test_pool_beirami_kl_weights_each_output_by_its_chance_to_be_the_best():
    """From a pool: the mean over best-of-n draws of d_n(π(y)); n = 1 is 0, outputs of tiny base probability give
    the analytic value, and a pool whose top-ranked output is likely gives less."""
    select = torch.tensor([[0.1, 0.5, 0.3, 0.9]], dtype=torch.float64)
    rare = torch.full((1, 4), -40.0, dtype=torch.float64)
    assert best_of_n_beirami_kl(select, rare, 1) == pytest.approx(0.0, abs=1e-12)
    assert best_of_n_beirami_kl(select, rare, 2) == pytest.approx(math.log(2) - 1 / 2, abs=1e-9)
    likely_top = torch.tensor([[-40.0, -40.0, -40.0, math.log(0.5)]], dtype=torch.float64)
    weights = best_of_n_expectation(select, torch.eye(4, dtype=torch.float64)[3:].expand(1, 4), 2)  # P(top is best)
    want = float(weights) * float(best_of_n_kl_beirami(2, 0.5)) + (1 - float(weights)) * (math.log(2) - 1 / 2)
    assert best_of_n_beirami_kl(select, likely_top, 2) == pytest.approx(want, abs=1e-9)
    assert want < math.log(2) - 1 / 2
    with pytest.raises(ValueError, match="must match"):
        best_of_n_beirami_kl(select, rare[:, :3], 2)


def test_pool_estimate_treats_repeated_scores_as_point_masses():
    distinct = torch.tensor([[0.3, -1.2, 2.0, 0.7, 1.1, -0.4, 0.0, 0.9]], dtype=torch.float64)
    for n in (1, 2, 8):
        assert best_of_n_pool_kl_win_rate(distinct, n) == pytest.approx((math.log(n) - (n - 1) / n, n / (n + 1)))
    assert best_of_n_pool_kl_win_rate(torch.full((1, 6), 0.5), 4) == pytest.approx((0.0, 0.5))
    # scores [0, 0, 1, 2], n = 2: an atom of 1/2 at 0 (q = 1/4), continuous above (q(u) = 2u on [1/2, 1]):
    # KL = 1/4·ln(1/2) + ∫ 2u ln 2u du = −ln 2/4 + (ln 2 − 3/8); win = 1/4·1/4 + ∫ u·2u du = 1/16 + 7/12
    kl, win = best_of_n_pool_kl_win_rate(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2)
    assert kl == pytest.approx(0.75 * math.log(2) - 3 / 8, abs=1e-12) and win == pytest.approx(31 / 48, abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n_pool_kl_win_rate(torch.tensor([[0.0, math.nan]]), 1)
    with pytest.raises(ValueError, match="N must be"):
        best_of_n_win_rate_bound(0)


def test_curve_reports_the_pool_kl_and_the_win_rate_beside_the_analytic_kl():
    gen = torch.Generator().manual_seed(1)
    proxy = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    coarse = (proxy > 0).double()  # two reward values: heavy ties
    logps = -20 * torch.rand(10, 16, generator=gen, dtype=torch.float64)  # base probabilities from e^-20 to 1
    for scores, tied in (({"proxy": proxy}, False), ({"proxy": coarse}, True)):
        curve = best_of_n_curve(scores, select="proxy", logps=logps)
        assert set(CURVE_STATS) | {"proxy"} == set(curve.points[0])
        assert "kl_beirami" not in best_of_n_curve(scores, select="proxy").points[0]
        for p in curve.points:
            n = p["n"]
            assert p["kl"] == pytest.approx(math.log(n) - (n - 1) / n) and p["win_rate_bound"] == n / (n + 1)
            assert 0.0 <= p["kl_beirami"] <= p["kl"] + 1e-12 and (n == 1 or p["kl_beirami"] < p["kl"])
            if not tied or n == 1:
                assert p["kl_pool"] == pytest.approx(p["kl"], abs=1e-12)
                assert p["win_rate"] == pytest.approx(n / (n + 1), abs=1e-12)
            else:
                assert p["kl_pool"] < p["kl"] - 0.05 and p["win_rate"] < n / (n + 1) - 0.04


def test_batches_cover_every_sample_once_in_prompt_major_order():
    for num_prompts, m, batch in [(5, 3, 7), (3, 10, 4), (4, 4, 4), (1, 1, 1)]:
        rows = [(i, r) for idx, reps in _batches(num_prompts, m, batch) for i in idx for r in range(reps)]
        assert [i for i, _ in rows] == [i for i in range(num_prompts) for _ in range(m)]
        assert all(len(idx) * reps <= max(batch, 1) for idx, reps in _batches(num_prompts, m, batch))


# ----------------------------------------------------------------------------------------------------------------------
# On a tiny offline world
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bon_world")
    paths = build_world(str(root))
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    model = AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    data = root / "prompts"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for p in prompts(16)["prompt"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    return {**paths, "tok": tok, "model": model, "data": str(data)}


def test_pool_draws_and_log_probs_with_and_without_the_kv_cache(tiny):
    texts = list(prompts(6)["prompt"])
    pools = []
    for use_kv_cache in (True, False):  # seed=None: the global generator, as generate draws from it
        torch.manual_seed(3)
        pools.append(sample_pool(tiny["model"], tiny["tok"], texts, 4, max_new_tokens=8, batch_size=8, seed=None,
                                 use_kv_cache=use_kv_cache))
    fast, slow = pools
    # finished rows leave the KV-cache sampler's batch, so the draws agree until the first row finishes: the first
    # tokens of the first batch (2 prompts x 4); later batches start from another random state
    assert [c[0] for c in fast.completion_ids[:8]] == [c[0] for c in slow.completion_ids[:8]]
    assert len(fast) == 24 and len(set(map(tuple, fast.completion_ids))) > 6  # distinct draws, not copies
    for pool in (fast, slow):  # log π − log π under a forward pass of the same model: the log-probs line up
        assert max(abs(x) for x in sequence_kl(tiny["model"], tiny["model"], pool)) < 1e-4
    eos = tiny["tok"].eos_token_id
    assert all((ids[-1] == eos) == term for ids, term in zip(fast.completion_ids, fast.terminated) if ids)


def test_sampler_keeps_the_argmax_of_the_selecting_reward(tiny):
    def length(prompts=None, completions=None, **kw):
        return [float(len(c.split())) for c in completions]

    sampler = BestOfNSampler(tiny["model"], tiny["tok"], {"target": target_word, "length": length}, n=6,
                             max_new_tokens=8, select="length")
    result = sampler(list(prompts(5)["prompt"]), seed=1)
    pool = result.pool
    for i, completion in enumerate(result.completions):
        lengths = [len(c.split()) for c in pool.completions[i * 6 : (i + 1) * 6]]
        assert len(completion.split()) == max(lengths)
        assert result.scores["length"][i] == max(lengths)
        assert result.scores["target"][i] == pytest.approx(target_word(completions=[completion])[0])
    assert result.kl == pytest.approx(math.log(6) - 5 / 6)


def test_sampler_takes_a_reward_model_path_and_refuses_bad_arguments(tiny):
    sampler = BestOfNSampler(tiny["model"], tiny["tok"], [tiny["reward"]], n=2, max_new_tokens=4)
    assert sampler.select == "reward"  # named after the model's directory
    assert len(sampler(["customer : my order is late agent :"]).completions) == 1
    with pytest.raises(ValueError, match="n must be"):
        BestOfNSampler(tiny["model"], tiny["tok"], [target_word], n=0)
    with pytest.raises(ValueError, match="select"):
        BestOfNSampler(tiny["model"], tiny["tok"], [target_word], select="gold")
    with pytest.raises(ValueError, match="temperature"):
        BestOfNSampler(tiny["model"], tiny["tok"], [target_word], temperature=0)


def test_distillation_data_is_prompt_plus_the_sampled_ids_with_the_loss_on_the_completion(tiny):
    sampler = BestOfNSampler(tiny["model"], tiny["tok"], [target_word], n=3, max_new_tokens=6)
    result = sampler(list(prompts(4)["prompt"]))
    data = best_of_n_sft_dataset(result, tiny["tok"])
    for row, prompt, completion_ids in zip(data, result.prompts, result.completion_ids):
        prompt_ids = tiny["tok"](prompt, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_best_of_n", ROOT / "recipes" / "best_of_n.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv: list[str]) -> dict:
    recipe = _recipe()
    return recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))


def test_recipe_on_a_local_model_with_lora_writes_rounds_and_keeps_the_base(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bon"
    metrics = _run(["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
                    "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out), "--n", "4",
                    "--pool_size", "4", "--rounds", "2", "--max_new_tokens", "6", "--num_eval_prompts", "4",
                    "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--use_peft",
                    "--lora_r", "4"])
    assert [r["round"] for r in metrics["distilled"]] == [1, 2]
    assert metrics["distilled"][0]["train_pairs"] == 15  # 16 prompts, one held out (len // 10)
    assert "kl" in metrics["distilled"][1]["eval"] and "kl" not in metrics["initial"]
    assert [p["n"] for p in metrics["curve"]["points"]] == [1, 2, 4]
    assert (out / "adapter_model.safetensors").is_file() and (out / "bon_curve.png").is_file()
    base = load_file(str(Path(tiny["policy"]) / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tiny["policy"]).state_dict()
    assert all(torch.equal(base[k], reloaded[k]) for k in base)  # the base weights on disk were not touched
    assert json.loads((out / "metrics.json").read_text())["rounds"] == 2


def _rounds(*golds: float) -> list[DistillationRound]:
    return [DistillationRound(round=k, train_best={}, train_pairs=1, eval={"gold": g}) for k, g in enumerate(golds, 1)]


def test_the_round_kept_is_the_one_with_the_best_held_out_gold():
    kept = choose_round({"gold": 0.389}, _rounds(0.594, 0.378), "gold")  # round 2 over-optimised
    assert (kept["best_round"], kept["gold"], kept["beats_initial"]) == (1, 0.594, True)
    assert choose_round({"gold": 0.1}, _rounds(0.3, 0.5, 0.5), "gold")["best_round"] == 2  # the first of a tie
    worse = choose_round({"gold": 0.7}, _rounds(0.6, 0.4), "gold")
    assert (worse["best_round"], worse["beats_initial"]) == (1, False)
    blind = choose_round({}, _rounds(0.6, 0.4), None)  # nothing held-out to choose by: the last round
    assert (blind["best_round"], blind["by"], blind["beats_initial"]) == (2, None, None)


def _metrics(initial: float, *golds: float) -> dict:
    rounds = _rounds(*golds)
    kept = choose_round({"gold": initial}, rounds, "gold")
    return {"n": 8, "rounds": len(golds), "num_eval_prompts": 4, "initial": {"gold": initial},
            "best_of_n": {"gold": 0.7, "kl": 1.2}, "distilled": [r.to_dict() for r in rounds],
            "best_round": kept["best_round"], "kept": kept, "curve": {"fit": None}, "seconds": 1.0}


def test_the_console_says_which_round_is_kept_and_warns_when_none_beats_the_start():
    recipe = _recipe()
    good = recipe.summary_text(_metrics(0.389, 0.594, 0.378), ["gold"], "out", "sft")
    assert "The top-level model is round 1, the highest held-out gold of the 2 round(s) (0.594" in good
    assert "WARNING" not in good
    bad = recipe.summary_text(_metrics(0.7, 0.6, 0.4), ["gold"], "out", "sft")
    assert "WARNING: no distilled round beat the starting policy on held-out gold" in bad
    assert "the starting policy (sft) is the better model" in bad
    tie = recipe.summary_text(_metrics(0.0, 0.0, 0.0), ["gold"], "out", "sft")  # nothing moved the gold at all
    assert "WARNING: no distilled round beat" in tie and "(the best, round 1: 0.000; the starting policy: 0.000)" in tie
    assert "the starting policy (sft) is as good on held-out gold" in tie and "better model" not in tie


def test_the_curve_caption_names_the_gao_fit_only_where_it_is_drawn():
    from hf_rlhf_ext.objectives import fit_gao

    caption = _recipe().curve_caption
    flat = fit_gao([0.4, 0.8, 1.1], [0.0, 0.0, 0.0], form="bon").to_dict()  # R² undefined: the plot draws no curve
    assert "Gao" not in caption(None) and caption({"valid": True}).endswith(", with the Gao fit")
    assert caption(flat).endswith(f"; no Gao fit drawn ({flat['reason']})") and "with the Gao fit" not in caption(flat)


def test_recipe_saves_every_round_and_keeps_the_best_held_out_gold_at_the_top(tiny, tmp_path, monkeypatch):
    import hf_rlhf_ext.experiments.best_of_n as bon

    real, golds = bon.evaluate_samples, iter([0.389, 0.594, 0.378])  # start, round 1, round 2: round 2 overshoots

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "target_word_tracked": next(golds)}

    monkeypatch.setattr(bon, "evaluate_samples", evaluate)
    out = tmp_path / "bon"
    metrics = _run(["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
                    "--reward_funcs", "_ppo_helpers.target_word", "--gold_funcs", "_ppo_helpers.target_word",
                    "--output_dir", str(out), "--n", "2", "--pool_size", "2", "--rounds", "2",
                    "--max_new_tokens", "4", "--num_eval_prompts", "2", "--per_device_train_batch_size", "4",
                    "--num_train_epochs", "1", "--learning_rate", "1e-2"])
    assert metrics["gold"] == "target_word_tracked" and metrics["best_round"] == 1
    weights = {k: (out / f"round_{k}" / "model.safetensors").read_bytes() for k in (1, 2)}
    assert weights[1] != weights[2]  # two different models, each in its own folder
    assert (out / "model.safetensors").read_bytes() == weights[1]
    assert json.loads((out / "metrics.json").read_text())["best_round"] == 1
    assert "The top-level model is round 1" in (out / "README.md").read_text()
    cards = {k: (out / f"round_{k}" / "README.md").read_text() for k in (1, 2)}  # ours, not SFTTrainer's generic one
    assert "Round 1 of 2 of best-of-2 distillation" in cards[1] and "; the top-level model." in cards[1]
    assert "not the top-level model (round 1 is)" in cards[2]
    assert "| 0.378 |" in next(line for line in cards[2].splitlines() if line.startswith("| round 2 |"))
    assert not any("huggingface.co/None" in card for card in cards.values())


@pytest.mark.parametrize("flag", ["--n", "--pool_size", "--rounds", "--num_eval_prompts"])
def test_recipe_refuses_zero_counts(flag):
    with pytest.raises(ValueError, match=flag):
        _recipe().make_parser().parse_args_and_config(args=[flag, "0"])


# ----------------------------------------------------------------------------------------------------------------------
# On the lab
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lab_best_of_n_gold_peaks_while_the_proxy_keeps_rising(lab):
    from hf_rlhf_ext.lab.rewards import lab_gold_reward, lab_proxy_reward

    tok = lab.load_tokenizer()
    sampler = BestOfNSampler(lab.load_policy(), tok, {"proxy": lab_proxy_reward, "gold": lab_gold_reward})
    curve, _, _ = sampler.curve(list(lab.load_prompts()["test"]["prompt"]), 64, gold="gold", seed=0)
    proxy, gold = curve.column("proxy"), curve.column("gold")
    peak = max(range(len(gold)), key=gold.__getitem__)
    # the committed run (docs/runs/best-of-n-lab/metrics.json): proxy 0.07 -> 1.20 rising at every n; gold 0.30 ->
    # 0.69 at N = 8 -> 0.46 at N = 64
    assert all(b > a for a, b in zip(proxy, proxy[1:]))
    assert 1 <= peak < len(gold) - 1
    assert gold[peak] - gold[0] >= 0.2  # best-of-N helps the gold reward at first ...
    assert gold[peak] - gold[-1] >= 0.1  # ... then over-optimises the proxy
    assert curve.fit.beta > 0 and curve.fit.r2 >= 0.8  # the Gao best-of-N form bends over too


@pytest.mark.slow
def test_lab_distilled_model_beats_the_sft_model_on_gold(lab, tmp_path):
    metrics = _run(["--output_dir", str(tmp_path / "bon"), "--rounds", "1", "--pool_size", "8"])
    initial, distilled = metrics["initial"]["gold_reward"], metrics["distilled"][0]["eval"]["gold_reward"]
    # seeds 0-2 of the chapter run (docs/runs/chapter/claims.json, bon_distillation): +0.23, +0.19, +0.28 held-out
    # gold after one round of best-of-8 distillation
    assert distilled - initial >= 0.1
    assert metrics["best_of_n"]["gold_reward"] - initial >= 0.15
    # it moved, on a leash of about best-of-8's KL (at most ln 8 − 7/8 = 1.20): 1.21 in the committed run (seed 0)
    assert 0.3 < metrics["distilled"][0]["eval"]["kl"] < 2.0

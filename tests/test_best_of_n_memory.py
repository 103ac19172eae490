"""The pool is sampled in chunks that fit a memory budget: the same draws for any chunk size, and no tensor larger
than the budget allows (counted at the allocation, so the test does not depend on the machine's RSS)."""

from __future__ import annotations

import math

import pytest
import torch
from _ppo_helpers import build_tiny_llama, build_world, prompts
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_rlhf_ext.experiments.best_of_n import (
    BestOfNSampler,
    default_memory_budget_mb,
    rows_in_flight,
    sample_pool,
    sequence_kl,
)
from hf_rlhf_ext.sampling import sampling_row_bytes, scoring_row_bytes


class LargestAllocation(TorchDispatchMode):
    """The bytes of the largest tensor storage any torch operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def world(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = str(tmp_path_factory.mktemp(request.param))
    path = build_world(root)["policy"] if request.param == "gpt2" else build_tiny_llama(root)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _pool(world, **kw):
    model, tok = world
    return sample_pool(model, tok, list(prompts(5)["prompt"]), 6, max_new_tokens=10, seed=7, **kw)


def test_chunked_pool_draws_what_the_whole_pool_draws(world):
    whole = _pool(world, memory_budget_mb=math.inf)
    for chunked in (_pool(world, batch_size=4), _pool(world, batch_size=1), _pool(world, memory_budget_mb=1e-3)):
        assert chunked.completion_ids == whole.completion_ids  # 4 rows: a prompt's 6 samples span two chunks
        assert chunked.logps == pytest.approx(whole.logps, abs=1e-4)
        assert chunked.terminated == whole.terminated
    assert len(set(map(tuple, whole.completion_ids))) > 10  # distinct draws, not one stream repeated


def test_another_seed_draws_another_pool(world):
    model, tok = world
    texts = list(prompts(5)["prompt"])
    a = sample_pool(model, tok, texts, 6, max_new_tokens=10, seed=7)
    b = sample_pool(model, tok, texts, 6, max_new_tokens=10, seed=8)
    assert a.completion_ids != b.completion_ids


def test_rows_in_flight_fit_the_budget(world):
    model, _ = world
    per_row = sampling_row_bytes(model, prompt_len=12, max_new_tokens=10)
    budget_mb = 3.5 * per_row / 2**20
    assert rows_in_flight(model, 12, 10, batch_size=256, memory_budget_mb=budget_mb) == 3
    assert rows_in_flight(model, 12, 10, batch_size=2, memory_budget_mb=budget_mb) == 2  # batch_size still caps
    assert rows_in_flight(model, 12, 10, batch_size=256, memory_budget_mb=1e-9) == 1
    assert rows_in_flight(model, 12, 10, batch_size=256, memory_budget_mb=math.inf) == 256
    assert default_memory_budget_mb(model) == 256.0  # a tiny model: the floor


def test_sampling_row_bytes_counts_the_kv_cache_and_the_vocabulary():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg)
    kv_per_token = 2 * 3 * 2 * 16 * 4  # keys and values, layers, KV heads, head dim, float32
    assert sampling_row_bytes(model, 20, 12) == kv_per_token * 32 + 5 * 1000 * 4


def test_no_tensor_outgrows_the_budget(world):
    """With the whole pool in flight the largest tensor (a layer's KV cache or the step's logits over all rows) is
    larger than a budget of 2 rows; with that budget, no tensor is."""
    model, _ = world
    budget_mb = 2.5 * sampling_row_bytes(model, 12, 10) / 2**20
    unbounded, bounded = LargestAllocation(), LargestAllocation()
    with unbounded:
        _pool(world, memory_budget_mb=math.inf)
    with bounded:
        _pool(world, memory_budget_mb=budget_mb)
    assert unbounded.largest > budget_mb * 2**20
    assert bounded.largest <= budget_mb * 2**20
    assert bounded.largest * 3 < unbounded.largest  # 2 rows in flight instead of 30


def test_sampler_passes_its_budget_to_the_pool(world):
    model, tok = world

    def length(completions=None, **kw):
        return [float(len(c)) for c in completions]

    texts = list(prompts(3)["prompt"])
    small = BestOfNSampler(model, tok, length, n=4, max_new_tokens=6, memory_budget_mb=1e-3, progress=False)
    whole = BestOfNSampler(model, tok, length, n=4, max_new_tokens=6, memory_budget_mb=math.inf, progress=False)
    assert small(texts, seed=1).completion_ids == whole(texts, seed=1).completion_ids
    with LargestAllocation() as seen_small:
        small.pool(texts, 4, seed=1)
    with LargestAllocation() as seen_whole:
        whole.pool(texts, 4, seed=1)
    assert seen_small.largest < seen_whole.largest


def test_reference_scoring_is_chunked_to_the_budget(world):
    """The reference's forward over the pool: the same KL for any budget, and its largest tensor (the logits over
    the vocabulary) shrinks with the rows per pass."""
    model, _ = world
    pool = _pool(world)
    budget_mb = 2.5 * scoring_row_bytes(model, max(map(len, pool.completion_ids))) / 2**20
    whole, bounded = LargestAllocation(), LargestAllocation()
    with whole:
        kl_whole = sequence_kl(model, model, pool, memory_budget_mb=math.inf)
    with bounded:
        kl_bounded = sequence_kl(model, model, pool, memory_budget_mb=budget_mb)
    assert kl_bounded == pytest.approx(kl_whole, abs=1e-5)
    assert max(map(abs, kl_whole)) < 1e-4  # the pool's log-probs are the model's own
    assert bounded.largest * 3 < whole.largest

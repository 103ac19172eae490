"""The KV-cache sampler: same draws as ``generate``, log-probs equal to a forward pass, finished rows leaving the batch
without changing what the others draw until then."""

from __future__ import annotations

import pytest
import torch
from _callbacks_helpers import build_policy, build_tokenizer, prompts

from hf_rlhf_ext.sampling import forward_kwargs, kv_cache_sampling_supported, per_token_logps, sample_with_kv_cache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_policy(str(tmp_path_factory.mktemp("sampling") / "policy"), seed=3)
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = prompts(5) + ["customer : lamp agent :", "customer : my chair is late sorry thank you good bad agent :"]
    enc = tok(text=texts, padding=True, padding_side="left", return_tensors="pt")
    return model, tok, enc["input_ids"], enc["attention_mask"]


def _sample(world, seed, drop=False, temperature=1.3, max_new=30):
    model, tok, ids, mask = world
    torch.manual_seed(seed)
    return sample_with_kv_cache(
        model, ids, mask, max_new_tokens=max_new, temperature=temperature, pad_token_id=tok.pad_token_id,
        eos_token_ids=[tok.eos_token_id], drop_finished=drop,
    )


def _completion_mask(tokens, eos_id):
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1]))
    return (torch.arange(tokens.shape[1])[None, :] <= first[:, None]).long()


@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_as_generate(world, seed):
    from transformers import GenerationConfig

    model, tok, ids, mask = world
    tokens, _ = _sample(world, seed)
    torch.manual_seed(seed)
    config = GenerationConfig(
        max_new_tokens=30, do_sample=True, temperature=1.3, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id],
    )
    reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert mask.min() == 0  # left padding exercised
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("drop", [False, True])
def test_log_probs_equal_a_forward_pass(world, drop):
    model, tok, ids, mask = world
    tokens, logps = _sample(world, seed=5, drop=drop)
    cmask = _completion_mask(tokens, tok.eos_token_id)
    forward = per_token_logps(model, ids, mask, tokens, cmask, temperature=1.3)
    torch.testing.assert_close(logps * cmask, forward, atol=1e-5, rtol=0)
    assert float((logps * cmask).sum()) < -1.0


def test_dropping_finished_rows_keeps_draws_until_the_first_drop(world):
    tok = world[1]
    kept, _ = _sample(world, seed=7, drop=False)
    dropped, logps = _sample(world, seed=7, drop=True)
    cmask = _completion_mask(kept, tok.eos_token_id)
    lengths = cmask.sum(1)
    assert lengths.min() < lengths.max() <= kept.shape[1]
    # the first row to finish leaves after its EOS step: every draw up to and including that step is shared
    first_drop = int(lengths.min())
    assert torch.equal(dropped[:, :first_drop], kept[:, :first_drop])
    assert not torch.equal(dropped, kept)  # rows did leave (later draws are consumed by fewer rows)
    # after a row's EOS: pad tokens and log-prob 0
    dmask = _completion_mask(dropped, tok.eos_token_id)
    assert (dropped[dmask == 0] == tok.pad_token_id).all()
    assert (logps[dmask == 0] == 0).all()


def test_dropping_finished_rows_keeps_the_distribution(world):
    """Over many seeds the mean completion length and the first-token frequencies agree with and without dropping."""
    tok = world[1]

    def stats(drop):
        lengths, second = [], []
        for seed in range(40):
            tokens, _ = _sample(world, seed=100 + seed, drop=drop, max_new=20)
            lengths.append(_completion_mask(tokens, tok.eos_token_id).sum(1).float())
            second.append(tokens[:, min(5, tokens.shape[1] - 1)])
        return torch.cat(lengths).mean(), torch.cat(second)

    len_keep, tok_keep = stats(False)
    len_drop, tok_drop = stats(True)
    assert abs(float(len_keep - len_drop)) < 0.1 * float(len_keep)
    # the pad share at step 5 (rows already finished) agrees too
    share = lambda t: float((t == tok.pad_token_id).float().mean())  # noqa: E731
    assert abs(share(tok_keep) - share(tok_drop)) < 0.1


def test_no_eos_runs_to_max_new_tokens(world):
    model, tok, ids, mask = world
    torch.manual_seed(0)
    tokens, logps = sample_with_kv_cache(
        model, ids, mask, max_new_tokens=7, temperature=1.0, pad_token_id=tok.pad_token_id, eos_token_ids=None,
        drop_finished=True,
    )
    assert tokens.shape == logps.shape == (ids.shape[0], 7)
    assert (logps < 0).all()


def test_bad_arguments_are_refused(world):
    model, tok, ids, mask = world
    common = dict(pad_token_id=tok.pad_token_id, eos_token_ids=tok.eos_token_id)
    with pytest.raises(ValueError, match="temperature"):
        sample_with_kv_cache(model, ids, mask, max_new_tokens=3, temperature=0.0, **common)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_with_kv_cache(model, ids, mask, max_new_tokens=0, temperature=1.0, **common)
    with pytest.raises(ValueError, match="differ"):
        sample_with_kv_cache(model, ids, mask[:, 1:], max_new_tokens=3, temperature=1.0, **common)


def test_forward_kwargs_and_support(world):
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    model = world[0]
    assert {"position_ids", "logits_to_keep"} <= forward_kwargs(model)
    lora = get_peft_model(
        type(model)(model.config), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    assert forward_kwargs(lora) == forward_kwargs(model)
    assert kv_cache_sampling_supported(model) and kv_cache_sampling_supported(lora)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    assert not kv_cache_sampling_supported(t5)


@pytest.mark.parametrize("seed", [0, 4])
def test_prompts_prefilled_once_draw_what_generate_draws_with_num_return_sequences(world, seed):
    """M samples per prompt from one prefill (the cache repeated) = generate(num_return_sequences=M)."""
    from transformers import GenerationConfig

    model, tok, ids, mask = world
    torch.manual_seed(seed)
    tokens, logps = sample_with_kv_cache(
        model, ids, mask, max_new_tokens=20, temperature=1.3, pad_token_id=tok.pad_token_id,
        eos_token_ids=[tok.eos_token_id], num_return_sequences=3,
    )
    torch.manual_seed(seed)
    config = GenerationConfig(
        max_new_tokens=20, do_sample=True, temperature=1.3, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id], num_return_sequences=3,
    )
    reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert tokens.shape[0] == 3 * ids.shape[0]
    assert torch.equal(tokens, reference)
    assert not torch.equal(tokens[0], tokens[1]) or not torch.equal(tokens[1], tokens[2])  # three draws, not copies
    rep_ids, rep_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    cmask = _completion_mask(tokens, tok.eos_token_id)
    want = per_token_logps(model, rep_ids, rep_mask, tokens, cmask, temperature=1.3)
    torch.testing.assert_close(logps * cmask, want, atol=1e-4, rtol=1e-4)


def test_num_return_sequences_must_be_positive(world):
    model, tok, ids, mask = world
    with pytest.raises(ValueError, match="num_return_sequences"):
        sample_with_kv_cache(model, ids, mask, max_new_tokens=3, temperature=1.0, pad_token_id=tok.pad_token_id,
                             eos_token_ids=[tok.eos_token_id], num_return_sequences=0)


def test_sample_policy_through_generate_draws_the_same_tokens_with_their_log_probs(world):
    """The fallback (``use_kv_cache=False``) draws what the KV-cache loop draws for the same seed, and its log-probs
    (from ``generate``'s scores) equal a forward pass, 0 after each row's EOS."""
    from hf_rlhf_ext.sampling import completion_mask, sample_policy

    model, tok, ids, mask = world
    settings = dict(max_new_tokens=30, temperature=1.3, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id])
    torch.manual_seed(4)
    fast, fast_logps = sample_policy(model, ids, mask, **settings)
    torch.manual_seed(4)
    slow, slow_logps = sample_policy(model, ids, mask, use_kv_cache=False, **settings)
    assert torch.equal(fast, slow)
    cmask = completion_mask(slow, [tok.eos_token_id])
    assert cmask.sum(1).min() < cmask.sum(1).max()  # rows ended at different steps
    forward = per_token_logps(model, ids, mask, slow, cmask, temperature=1.3)
    torch.testing.assert_close(slow_logps, forward, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_logps, forward, atol=1e-5, rtol=0)


def test_sample_policy_greedy_is_generate_greedy(world):
    from hf_rlhf_ext.sampling import sample_policy

    model, tok, ids, mask = world
    tokens, _ = sample_policy(model, ids, mask, greedy=True, max_new_tokens=12, temperature=1.0,
                              pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id])
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])[:, ids.shape[1]:]
    assert torch.equal(tokens, reference)


def test_completion_mask_keeps_the_first_eos_and_nothing_after():
    from hf_rlhf_ext.sampling import completion_mask

    tokens = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [4, 9, 5, 5]])
    assert completion_mask(tokens, [3, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_lab_sampler_draws_what_generate_draws(world):
    """The lab's data are sampled by the package's one sampler: the same replies as ``generate`` for the same seed."""
    from transformers import GenerationConfig

    from hf_rlhf_ext.lab.build import sample_replies

    model, tok, _, _ = world
    texts = prompts(4) + ["customer : lamp agent :"]
    got = sample_replies(model, tok, texts, max_new_tokens=10, temperature=1.0, seed=7)
    torch.manual_seed(7)
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    encoded = {t: tok(t, add_special_tokens=False)["input_ids"] for t in texts}
    expected = {}
    for length in sorted({len(v) for v in encoded.values()}):  # batched by prompt length, as the lab does
        group = [t for t in texts if len(encoded[t]) == length]
        ids = torch.tensor([encoded[t] for t in group])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        for t, row in zip(group, out[:, length:].tolist()):
            expected[t] = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
    assert got == [expected[t] for t in texts]
    assert any(r and r[-1] == tok.eos_token_id for r in got) and len({tuple(r) for r in got}) > 1


def test_finished_rows_fed_the_pad_raise_no_padding_notice(world):
    """Equal-length prompts (the attention mask is dropped): rows that finished are fed the pad id, as in generate;
    transformers' one-time "input ids may be padded" notice would be a false alarm on every default run."""
    import logging

    from transformers.utils import logging as hf_logging

    model, tok, ids, mask = world
    same = ids[mask.all(1)][:2].repeat(4, 1)  # unpadded rows only
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # the notice is shown once per process: make it showable again
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a Trainer built with log_level="error" earlier in the session lowers it
    try:
        torch.manual_seed(0)
        tokens, _ = sample_with_kv_cache(model, same, torch.ones_like(same), max_new_tokens=30, temperature=1.3,
                                         pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id])
        assert (tokens == tok.pad_token_id).any()  # some rows finished early and were fed the pad
        assert not [m for m in records if "attention_mask" in m]
        model(input_ids=tokens[:, -1:])  # the notice is still there for inputs that hold the pad id without a mask
        assert [m for m in records if "attention_mask" in m]
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


def test_a_completion_ends_at_its_first_eos_of_any_eos_id():
    from hf_rlhf_ext.sampling import completion_lengths, cut_at_first_eos

    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [9, 9, 9, 3], [9, 3, 2, 0]])
    assert completion_lengths(tokens, [2]) == [2, 4, 1, 4, 3]
    assert cut_at_first_eos(tokens, [2, 3]) == [[5, 2], [5, 6, 7, 8], [2], [9, 9, 9, 3], [9, 3]]

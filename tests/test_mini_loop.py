"""The miniature RLHF loop (recipes/mini_loop.py).

Fast tests run on the tiny word-level world of ``_ppo_helpers`` (a 1-layer GPT-2), first taught in a few SFT steps to
end half of its replies with "thanks" and to emit EOS, so that the polite reward (closings set to ("thanks",) for
this vocabulary) has something to see. The lab run is ``slow``.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _ppo_helpers import build_world, prompts

ROOT = Path(__file__).resolve().parents[1]
TINY_CLOSING = "thanks"  # the tiny vocabulary has no "thank you": its polite closing is this word


def _load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_mini_loop", ROOT / "recipes" / "mini_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


@pytest.fixture
def tiny_recipe(recipe, monkeypatch):
    monkeypatch.setattr(recipe, "POLITE_CLOSINGS", (TINY_CLOSING,))
    return recipe


def _sft(policy_dir: str, out_dir: str) -> str:
    """A few full-batch SFT steps: replies end with "thanks" half the time, and always with EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    replies = ["sorry we will fix it thanks", "we will fix it", "sorry we will help thanks", "we will help"]
    texts = [f"{p} {r} {tokenizer.eos_token}" for p in prompts(16)["prompt"] for r in replies]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.chat_template = None  # tuned on the raw prompts: a plain-text model, whose prompts stay as they are
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_loop_world")
    paths = build_world(str(root))
    data = root / "prompts.jsonl"
    with open(data, "w") as f:
        for p in prompts(16)["prompt"]:  # 16 distinct prompts
            f.write(json.dumps({"prompt": p}) + "\n")
    return {"policy": _sft(paths["policy"], str(root / "sft")), "data": str(data)}


def _tiny_args(recipe, tiny, out, **overrides):
    kwargs = dict(model_name_or_path=tiny["policy"], dataset_name=tiny["data"], output_dir=str(out), steps=4,
                  batch_size=16, max_new_tokens=8, lr=1e-2, num_eval_prompts=4, seed=0)
    kwargs.update(overrides)
    return recipe.MiniLoopArguments(**kwargs)


def _ends_with_closing(row, closing_words) -> bool:
    """Independent of the recipe: the reply finished (EOS) and its last words, punctuation dropped, are the closing."""
    words = [w for w in row["completion"].lower().replace(".", " ").replace("!", " ").split()]
    return bool(row["finished"]) and words[-len(closing_words) :] == closing_words


def _rollouts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# The reward, the baselines, the arguments
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, finished, expected",
    [
        ("we will send a replacement kettle . thank you .", True, 1.0),
        ("Sorry about that. Thank you!", True, 1.0),
        ("hello . have a nice day .", True, 1.0),
        ("thank you for your patience .", True, 1.0),
        ("THANK YOU", True, 1.0),
        ("thank you . whatever .", True, 0.0),  # polite words, but not at the end
        ("thank you , but no", True, 0.0),
        ("thankyou", True, 0.0),
        ("you thank", True, 0.0),
        ("have a day", True, 0.0),
        ("", True, 0.0),
        ("we will fix it . thank you .", False, 0.0),  # cut off by the length limit: it never ended
    ],
)
def test_polite_reward_on_hand_written_replies(recipe, text, finished, expected):
    assert recipe.polite_reward([text], [finished]) == [expected]


def test_polite_reward_without_flags_counts_replies_as_finished_and_checks_lengths(recipe):
    assert recipe.polite_reward(["thank you .", "ok ."]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 finished flags for 1 completions"):
        recipe.polite_reward(["thank you ."], [True, True])


def test_baselines_on_hand_computed_rewards(recipe):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert recipe.advantages(r, "none").tolist() == [1.0, 0.0, 0.0, 1.0]
    assert recipe.advantages(r, "batch_mean").tolist() == [0.5, -0.5, -0.5, 0.5]
    # whitened: (r - 0.5) / unbiased std (= sqrt(1/3))
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (1 / 3) ** 0.5
    assert torch.allclose(recipe.advantages(r, "whiten"), expected, atol=1e-5)
    assert recipe.advantages(torch.ones(4), "whiten").tolist() == [0.0] * 4  # no signal, no push


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("kl_coef", -0.1, "kl_coef must be >= 0"),
        ("clip_eps", 0.0, "clip_eps must be > 0"),
        ("clip_eps", -0.2, "clip_eps must be > 0"),
        ("baseline", "median", "baseline must be one of"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("ppo_epochs", 0, "ppo_epochs must be >= 1"),
        ("lr", 0.0, "lr must be > 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(recipe, field, value, message):
    with pytest.raises(ValueError, match=message):
        recipe.MiniLoopArguments(**{field: value})
    with pytest.raises(ValueError, match=message):  # the command line refuses them too
        recipe.make_parser().parse_args_and_config(args=[f"--{field}", str(value)])


def test_config_file_and_flags(recipe, tmp_path):
    config = tmp_path / "mini.yaml"
    config.write_text("steps: 7\nkl_coef: 0.2\nbaseline: whiten\nuse_peft: true\n")
    (args,) = recipe.make_parser().parse_args_and_config(args=["--config", str(config), "--lr", "0.003"])
    assert (args.steps, args.kl_coef, args.baseline, args.use_peft, args.lr) == (7, 0.2, "whiten", True, 0.003)
    assert args.output_dir == "runs/mini-loop" and args.model_name_or_path is None  # default: the lab


# ----------------------------------------------------------------------------------------------------------------------
# The loop on the tiny world
# ----------------------------------------------------------------------------------------------------------------------
def test_recipe_on_a_tiny_model_records_what_it_sampled(tiny_recipe, tiny, tmp_path, capsys):
    args = _tiny_args(tiny_recipe, tiny, tmp_path)
    returned = tiny_recipe.main(args)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["curve"] == returned["curve"] and written["on_lab"] is False
    assert [r["step"] for r in written["curve"]] == [1, 2, 3, 4]
    rows = _rollouts(tmp_path)
    train_rows = [r for r in rows if r["phase"] == "train"]
    # every step's numbers are those of the replies it sampled
    for record in written["curve"]:
        step_rows = [r for r in train_rows if r["step"] == record["step"]]
        assert len(step_rows) == 16
        share = sum(_ends_with_closing(r, [TINY_CLOSING]) for r in step_rows) / 16
        assert record["polite_share"] == pytest.approx(share) and record["reward"] == pytest.approx(share)
        assert [r["reward"] for r in step_rows] == [float(_ends_with_closing(r, [TINY_CLOSING])) for r in step_rows]
        assert record["eos_rate"] == pytest.approx(sum(r["finished"] for r in step_rows) / 16)
    polite = [_ends_with_closing(r, [TINY_CLOSING]) for r in train_rows]
    assert any(polite) and not all(polite)  # the checks above saw both kinds of reply
    # step 1 samples from the initial policy, which *is* the reference: KL 0 up to float noise; then it moves
    assert abs(written["curve"][0]["kl_k1"]) < 1e-4 and abs(written["curve"][0]["kl_k3"]) < 1e-4
    assert written["curve"][-1]["kl_k3"] > 1e-3
    # held-out prompts (a tenth of 16: one) are never trained on; the before/after numbers are those of their replies
    held_out = {r["prompt"] for r in rows if r["phase"] == "before"}
    assert len(held_out) == 1 and not held_out & {r["prompt"] for r in train_rows}
    for phase in ("before", "after"):
        phase_rows = [r for r in rows if r["phase"] == phase]
        share = sum(_ends_with_closing(r, [TINY_CLOSING]) for r in phase_rows) / len(phase_rows)
        assert written[f"eval_{phase}"]["polite_share"] == pytest.approx(share)
        assert written[f"polite_share_{phase}"] == pytest.approx(share)
        assert written[f"samples_{phase}"] == phase_rows[: args.num_samples]
    assert abs(written["eval_before"]["kl_k1"]) < 1e-4 and written["kl_after"] == written["eval_after"]["kl_k1"]
    assert "gold_reward" not in written["eval_after"]  # gold only on the lab prompts
    assert (tmp_path / "mini_loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "policy" / "config.json").is_file()
    assert str(tmp_path / "metrics.json") in capsys.readouterr().out  # the summary says where the files are


def test_the_loop_learns_to_end_politely_on_the_tiny_model(tiny_recipe, tiny, tmp_path):
    metrics = tiny_recipe.main(_tiny_args(tiny_recipe, tiny, tmp_path, steps=10, seed=1))
    shares = [r["polite_share"] for r in metrics["curve"]]
    first, last = sum(shares[:3]) / 3, sum(shares[-3:]) / 3
    assert last >= first + 0.25, shares  # measured: about 0.3 -> 0.85


def test_one_ppo_update_moves_replies_in_the_direction_of_their_advantage(tiny_recipe, tiny, tmp_path):
    args = _tiny_args(tiny_recipe, tiny, tmp_path, kl_coef=0.0, ppo_epochs=1, lr=1e-3)
    state, _ = tiny_recipe.setup(args)
    torch.manual_seed(0)
    batch = tiny_recipe.rollout(state["policy"], state["tokenizer"], state["prompts"][:16], 8, state["eos_ids"])
    polite = torch.tensor([_ends_with_closing({"completion": t, "finished": f}, [TINY_CLOSING])
                           for t, f in zip(batch["texts"], batch["finished"])])
    assert 0 < polite.sum() < 16
    adv = torch.where(polite, 1.0, -1.0)  # hand-set advantages: polite replies good, the others bad
    inputs = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    ref = tiny_recipe.reference_logps(state["policy"], state["reference"], batch)
    tiny_recipe.ppo_update(state["policy"], state["optimizer"], batch, ref, adv, args)
    with torch.no_grad():
        change = (tiny_recipe.per_token_logps(state["policy"], *inputs) - batch["logps"]).sum(1)
    assert change[polite].mean() > 0 > change[~polite].mean()


def test_lora_trains_the_adapter_only_and_its_reference_is_the_base_model(tiny_recipe, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    args = _tiny_args(tiny_recipe, tiny, tmp_path, use_peft=True, steps=3)
    state, _ = tiny_recipe.setup(args)
    policy = state["policy"]
    assert state["reference"] is None  # the reference is the policy with its adapter disabled
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    assert lora_before and all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    tiny_recipe.train(state, args)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    assert any(not torch.equal(after[n], p) for n, p in lora_before.items())
    # adapter off = the model as loaded from disk; adapter on = something else
    torch.manual_seed(0)
    batch = tiny_recipe.rollout(policy, state["tokenizer"], state["prompts"][:8], 8, state["eos_ids"])
    inputs = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    original = AutoModelForCausalLM.from_pretrained(tiny["policy"]).eval()
    with torch.no_grad():
        original_logps = tiny_recipe.per_token_logps(original, *inputs)
    ref = tiny_recipe.reference_logps(policy, None, batch)
    assert torch.allclose(ref, original_logps, atol=1e-5)
    assert not torch.allclose(batch["logps"], original_logps, atol=1e-3)


def test_lora_run_saves_only_the_adapter(tiny_recipe, tiny, tmp_path):
    metrics = tiny_recipe.main(_tiny_args(tiny_recipe, tiny, tmp_path, use_peft=True, steps=2))
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "policy" / "model.safetensors").exists()
    assert abs(metrics["curve"][0]["kl_k1"]) < 1e-4 and metrics["curve"][1]["kl_k3"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# The lab
# ----------------------------------------------------------------------------------------------------------------------
LAB_MIN_GAIN = 0.3  # held-out polite share, absolute; measured with the defaults (seed 0): 0.28 -> 0.91
LAB_MAX_KL = 5.0  # nats per reply, k1 and k3; measured: 1.09 (k1), 1.28 (k3)
LAB_MAX_GOLD_LOSS = 0.2  # the KL leash keeps the rest of the reply: measured gold +0.27 -> +0.30


@pytest.mark.slow
def test_defaults_on_the_lab_teach_polite_endings_at_a_moderate_kl(recipe, lab, tmp_path):
    metrics = recipe.main(recipe.MiniLoopArguments(output_dir=str(tmp_path), seed=0))
    assert metrics["on_lab"] is True and metrics["eval_after"]["num_prompts"] == 64
    before, after = metrics["polite_share_before"], metrics["polite_share_after"]
    assert after >= before + LAB_MIN_GAIN, (before, after)
    assert 0 < metrics["kl_after"] < LAB_MAX_KL and 0 < metrics["kl_k3_after"] < LAB_MAX_KL
    assert metrics["gold_after"] >= metrics["gold_before"] - LAB_MAX_GOLD_LOSS
    # the held-out share is that of the recorded replies, judged by the lab's own closings
    rows = [r for r in _rollouts(tmp_path) if r["phase"] == "after"]
    closings = [["thank", "you"], ["have", "a", "nice", "day"], ["thank", "you", "for", "your", "patience"]]
    share = sum(any(_ends_with_closing(r, c) for c in closings) for r in rows) / len(rows)
    assert after == pytest.approx(share)
    assert metrics["seconds"] < 90


def test_a_tempered_loop_scores_every_log_prob_at_its_temperature(tiny_recipe, tiny, tmp_path):
    """At T = 0.5 the sampled log-probs, the reference's and the update's are all of π at T: before any update the
    policy is its reference (KL 0 per token) and the first epoch's ratio is 1 (no clipping), as at T = 1."""
    args = _tiny_args(tiny_recipe, tiny, tmp_path, kl_coef=0.1, ppo_epochs=1, temperature=0.5)
    state, _ = tiny_recipe.setup(args)
    torch.manual_seed(0)
    batch = tiny_recipe.rollout(state["policy"], state["tokenizer"], state["prompts"][:16], 8, state["eos_ids"],
                                args.temperature)
    inputs = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    with torch.no_grad():
        at_t = tiny_recipe.per_token_logps(state["policy"], *inputs, temperature=0.5)
        at_1 = tiny_recipe.per_token_logps(state["policy"], *inputs)
    assert torch.allclose(batch["logps"], at_t, atol=1e-5) and not torch.allclose(batch["logps"], at_1, atol=1e-3)
    ref = tiny_recipe.reference_logps(state["policy"], state["reference"], batch)
    assert torch.allclose(ref, at_t, atol=1e-5)
    adv = torch.ones(len(batch["texts"]))
    stats = tiny_recipe.ppo_update(state["policy"], state["optimizer"], batch, ref, adv, args)
    assert stats["clip_frac"] == 0.0
    with pytest.raises(ValueError, match="temperature"):
        _tiny_args(tiny_recipe, tiny, tmp_path, temperature=0.0)

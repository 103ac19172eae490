"""The lab world: tokenizer, task and gold reward, prompt splits, Bradley-Terry labels, and the build (tiny config
for the fast tests; the real default lab, with its acceptance numbers, under ``-m slow``)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from hf_rlhf_ext.lab import GOLD_MAX, GOLD_MIN, LabConfig, build_lab, gold_range, task
from hf_rlhf_ext.lab.build import COMPLETE_MARKER, Lab, bt_labels
from hf_rlhf_ext.lab.task import gold_reward
from hf_rlhf_ext.lab.tokenizer import build_tokenizer

KETTLE = "customer : my kettle is broken agent :"
EOS = task.EOS_ID


def g(completion: str, prompt: str = KETTLE, eos: bool = True) -> float:
    """Gold of one completion, told via completion_ids whether EOS was emitted (as TRL does)."""
    ids = [10, 11] + ([EOS] if eos else [12])
    return gold_reward([prompt], [completion], completion_ids=[ids])[0]


# ---------------------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trip_is_exact_on_task_text(tokenizer):
    train, _ = task.split_prompts(0.2, seed=0)
    rows = task.sft_corpus(train, 500, seed=1)
    texts = [r["prompt"] + r["completion"] for r in rows]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in enc)
    assert [tokenizer.decode(ids) for ids in enc] == texts
    # "there ." must stay "there ." (no clean-up of spaces before punctuation)
    assert tokenizer.decode(tokenizer("thank you .")["input_ids"]) == "thank you ."


def test_tokenizer_special_tokens_and_joining(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "[PAD]", "[UNK]", "[BOS]", "[EOS]",
    )  # fmt: skip
    assert tokenizer.eos_token_id == task.EOS_ID
    # TRL joins prompt + completion as strings: with or without a space, the tokens are the same
    joined = tokenizer(KETTLE + "sorry .", add_special_tokens=False)["input_ids"]
    spaced = tokenizer(KETTLE + " sorry .", add_special_tokens=False)["input_ids"]
    assert joined == spaced
    assert tokenizer("hello")["input_ids"] == [tokenizer.convert_tokens_to_ids("hello")]  # nothing added
    ids = tokenizer("thank you . [EOS]", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "thank you ."


def test_chat_template_renders_the_plain_prompt(tokenizer):
    messages = [{"role": "user", "content": "my kettle is broken"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == KETTLE
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": "we will repair it ."}], tokenize=False
    )
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == KETTLE + " we will repair it ."


# ---------------------------------------------------------------------------------------------------------- gold reward
GOOD = "we will send a replacement kettle . thank you ."


def test_gold_best_reply_reaches_the_maximum():
    assert g(GOOD) == pytest.approx(GOLD_MAX)
    assert gold_range() == (GOLD_MIN, GOLD_MAX)
    assert gold_reward.__name__ == "gold_reward"


@pytest.mark.parametrize(
    "worse, why",
    [
        ("we will send a replacement . thank you .", "no item"),
        ("we will send a replacement kettle and laptop . thank you .", "another item"),
        ("we will send a kettle . thank you .", "no issue keyword"),
        ("we will send a replacement kettle .", "no polite ending"),
        ("we will send a replacement kettle . whatever . thank you .", "rude word"),
        ("we will send a replacement kettle kettle kettle . thank you .", "repeated bigram"),
        ("we will send a replacement kettle . our store opens at nine . we love our customers . thank you .",
         "too long"),
    ],
)
def test_each_penalty_lowers_the_score(worse, why):
    assert g(worse) < g(GOOD), why


def test_penalty_sizes():
    assert g(GOOD) - g(GOOD, eos=False) == pytest.approx(task.NO_EOS_PENALTY)
    one_repeat = "we will send a replacement kettle . thank you thank you ."
    assert g(one_repeat) == pytest.approx(GOLD_MAX - task.REPEAT_PENALTY)  # "thank you" repeated once
    # the item must be the customer's: the right reply for another customer is penalised
    laptop = "customer : my laptop is broken agent :"
    assert g(GOOD, prompt=laptop) == pytest.approx(task.KEYWORD_BONUS + task.POLITE_BONUS - task.WRONG_ITEM_PENALTY)


def test_issue_keyword_must_match_the_prompt_issue():
    cancel = "customer : please cancel my kettle order agent :"
    assert g("we have cancelled the order for your kettle . thank you .", prompt=cancel) == pytest.approx(GOLD_MAX)
    assert g(GOOD, prompt=cancel) == pytest.approx(GOLD_MAX - task.KEYWORD_BONUS)


def test_gold_floor_and_hacks():
    babble = " ".join(["for a"] * 20)
    assert g(babble, eos=False) == GOLD_MIN
    assert g("", eos=True) == 0.0
    padded = "thank you " * 6
    assert g(padded) < 0.0 < g("thank you .")


def test_gold_conversational_and_fallbacks():
    conv_prompt = [{"role": "user", "content": "my kettle is broken"}]
    conv_completion = [{"role": "assistant", "content": GOOD}]
    assert gold_reward([conv_prompt], [conv_completion]) == gold_reward([KETTLE], [GOOD])
    # without completion_ids the reply counts as terminated, unless ids say otherwise
    assert gold_reward([KETTLE], [GOOD]) == [pytest.approx(GOLD_MAX)]
    assert gold_reward([KETTLE], [GOOD + " [EOS]"]) == [pytest.approx(GOLD_MAX)]
    # a Hub tokenizer's EOS id can be given
    assert gold_reward([KETTLE], [GOOD], completion_ids=[[5, 50256]], eos_token_id=50256) == [pytest.approx(GOLD_MAX)]
    # extra TRL kwargs are ignored; unknown prompts still get the prompt-independent part
    assert gold_reward(["hello"], ["thank you ."], trainer_state=None, item=["x"]) == [pytest.approx(task.POLITE_BONUS)]
    with pytest.raises(ValueError):
        gold_reward([KETTLE, KETTLE], [GOOD])


def test_prompt_parser_finds_item_and_issue_for_every_prompt():
    for row in task.all_prompts():
        item, issue = task.parse_prompt(row["prompt"])
        assert (item, issue.name) == (row["item"], row["issue"])


def test_sft_corpus_is_mediocre():
    train, _ = task.split_prompts(0.2, seed=0)
    rows = task.sft_corpus(train, 4000, seed=0)
    scores = gold_reward([r["prompt"] for r in rows], [r["completion"] for r in rows])
    mean = sum(scores) / len(scores)
    assert GOLD_MIN + 1.0 < mean < GOLD_MAX - 0.5
    assert min(scores) == GOLD_MIN and max(scores) == GOLD_MAX  # both ends occur: there is something to learn
    assert all(r["completion"].startswith(" ") for r in rows)


# ------------------------------------------------------------------------------------------------------ splits, labels
def test_prompt_splits_are_disjoint_and_deterministic():
    train, test = task.split_prompts(0.2, seed=0)
    tr, te = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not tr & te
    assert len(tr | te) == len(task.all_prompts()) == 400
    assert len(te) == 80
    assert task.split_prompts(0.2, seed=0) == (train, test)
    assert {r["prompt"] for r in task.split_prompts(0.2, seed=1)[1]} != te
    # every item still appears in training, so copying it is learnable for test prompts
    assert {r["item"] for r in train} == set(task.ITEMS)


def test_bradley_terry_noise_flips_the_expected_fraction():
    n = 4000
    flips = bt_labels([0.3] * n, [0.0] * n, tau=0.3, seed=0).count(False) / n
    assert flips == pytest.approx(1 / (1 + 2.718281828 ** 1.0), abs=0.03)  # sigmoid(-1) = 0.269
    assert bt_labels([0.3] * n, [0.0] * n, tau=0.0, seed=0).count(False) == 0
    ties = bt_labels([0.5] * n, [0.5] * n, tau=0.3, seed=0).count(True) / n
    assert ties == pytest.approx(0.5, abs=0.03)
    assert bt_labels([2.0] * n, [-2.0] * n, tau=0.3, seed=0).count(False) == 0  # sigmoid(-13) ~ 2e-6
    assert bt_labels([0.3] * 50, [0.0] * 50, 0.3, seed=3) == bt_labels([0.3] * 50, [0.0] * 50, 0.3, seed=3)


def test_lab_config_cache_key():
    assert LabConfig().cache_key() == LabConfig().cache_key()
    assert LabConfig(seed=1).cache_key() != LabConfig().cache_key()
    assert len(LabConfig().cache_key()) == 12
    assert LabConfig.from_dict(LabConfig(tau=0.5).to_dict()) == LabConfig(tau=0.5)
    with pytest.raises(ValueError):
        LabConfig(rm_init="bert")
    with pytest.raises(ValueError):
        LabConfig(n_pairs_train=0)


# ---------------------------------------------------------------------------------------------------------- tiny build
TINY = LabConfig(
    n_sft=256, sft_epochs=1, sft_batch_size=32, n_embd=32, n_positions=48, max_new_tokens=8,
    n_pairs_train=48, n_pairs_test=24, n_eval_samples=16, rm_n_embd=16, rm_n_layer=1, rm_epochs=1, rm_batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory) -> Lab:
    return build_lab(TINY, output_dir=str(tmp_path_factory.mktemp("lab") / "tiny"))


def test_tiny_lab_saves_and_reloads_every_artifact(tiny_lab):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lab.tokenizer_path)
    assert tok.clean_up_tokenization_spaces is False and tok.eos_token_id == task.EOS_ID
    policy = AutoModelForCausalLM.from_pretrained(tiny_lab.policy_path)
    assert policy.config._name_or_path == tiny_lab.policy_path  # needed by GRPO's reference model when beta > 0
    assert policy.generation_config.pad_token_id == tok.pad_token_id
    assert policy.generation_config.eos_token_id == tok.eos_token_id
    assert AutoTokenizer.from_pretrained(tiny_lab.policy_path).get_vocab() == tok.get_vocab()
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_lab.reward_model_path)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert AutoTokenizer.from_pretrained(tiny_lab.reward_model_path).get_vocab() == tok.get_vocab()
    assert type(tiny_lab.load_policy()) is type(policy) and tiny_lab.load_reward_model().config.num_labels == 1

    prompts = load_dataset(tiny_lab.prompts_path)  # as `trl grpo --dataset_name <lab>/prompts` reads them
    assert set(prompts) == {"train", "test"}
    assert prompts["test"].to_list() == tiny_lab.load_prompts()["test"].to_list()
    assert not set(prompts["train"]["prompt"]) & set(prompts["test"]["prompt"])
    assert all(p.startswith("customer :") and p.endswith("agent :") for p in prompts["test"]["prompt"])

    prefs = tiny_lab.load_preferences()
    assert len(prefs["train"]) == TINY.n_pairs_train and len(prefs["test"]) == TINY.n_pairs_test
    assert set(prefs["test"]["prompt"]) <= set(prompts["test"]["prompt"])
    row = prefs["train"][0]
    for side in ("chosen", "rejected"):
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert row[f"{side}_ids"][: len(prompt_ids)] == prompt_ids
        reply_ids = row[f"{side}_ids"][len(prompt_ids) :]
        assert row[f"{side}_eos"] == (reply_ids[-1] == tok.eos_token_id)
        assert row[side] == " " + tok.decode(reply_ids, skip_special_tokens=True)
        # stored gold = gold recomputed from the text and the sampled ids
        again = gold_reward([row["prompt"]], [row[side]], completion_ids=[reply_ids])[0]
        assert row[f"{side}_gold"] == pytest.approx(again)
    train = prefs["train"]
    assert train["label_flipped"] == [c < r for c, r in zip(train["chosen_gold"], train["rejected_gold"])]

    m = tiny_lab.metrics
    for key in ("sft_test_gold_mean", "sft_test_eos_rate", "rm_test_accuracy", "rm_test_gold_accuracy",
                "rm_test_corr_gold", "rm_train_accuracy", "pairs_train_flip_rate"):
        assert key in m
    assert m["build_times"]["total_s"] > 0
    with open(os.path.join(tiny_lab.root, "lab_metrics.json")) as f:
        assert json.load(f) == m


def test_tiny_lab_cache_is_reused(tiny_lab):
    marker = os.path.join(tiny_lab.root, COMPLETE_MARKER)
    mtime = os.path.getmtime(marker)
    start = time.perf_counter()
    again = build_lab(TINY, output_dir=tiny_lab.root)
    assert time.perf_counter() - start < 10.0
    assert again.root == tiny_lab.root and again.metrics == tiny_lab.metrics
    assert os.path.getmtime(marker) == mtime  # nothing was rebuilt
    assert Lab.from_dir(tiny_lab.root).config == TINY
    # a directory holding another config's lab is not silently overwritten
    with pytest.raises(FileExistsError):
        build_lab(dataclasses.replace(TINY, seed=5), output_dir=tiny_lab.root)


def test_same_seed_gives_the_same_lab(tiny_lab, tmp_path, capfd):
    stale, fresh = tmp_path / "again.building-killed", tmp_path / "again.building-running"
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the build pins its own thread count, so the caller's setting must not matter
    try:
        other = build_lab(TINY, output_dir=str(tmp_path / "again"))
        assert torch.get_num_threads() == 2  # and restores the caller's
    finally:
        torch.set_num_threads(threads)
    assert other.metrics["torch_threads"] == 1
    err = capfd.readouterr().err  # a build says where it builds, how long it takes, and shows its progress
    assert f"Building the lab in {tmp_path / 'again'}" in err and "lab: done" in err
    assert not stale.exists() and fresh.exists()  # leftovers of a killed build are cleaned, a live one is not
    assert other.root != tiny_lab.root
    for split in ("train", "test"):
        assert other.load_prompts()[split].to_list() == tiny_lab.load_prompts()[split].to_list()
        assert other.load_preferences()[split].to_list() == tiny_lab.load_preferences()[split].to_list()
    for rel in ("policy/model.safetensors", "reward_model/model.safetensors"):  # one machine: byte for byte
        assert sha256(os.path.join(other.root, rel)) == sha256(os.path.join(tiny_lab.root, rel)), rel


def test_tiny_lab_works_in_trl_grpo_with_a_reference_model(tiny_lab, tmp_path):
    """The saved policy has a real _name_or_path (GRPO with beta > 0 reloads its reference from it) and the reward
    model and gold reward get clean metric names."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        max_steps=1, beta=0.05, reward_weights=[0.0, 1.0], bf16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=tiny_lab.policy_path,
        reward_funcs=[gold_reward, tiny_lab.reward_model_path],
        args=args,
        train_dataset=tiny_lab.load_prompts()["train"].select(range(8)),
        processing_class=tiny_lab.load_tokenizer(),
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "rewards/gold_reward/mean" in logs and "rewards/reward_model/mean" in logs
    assert "kl" in logs


def test_default_lab_dir_honours_the_home_variable(tmp_path, monkeypatch):
    from hf_rlhf_ext.lab import default_lab_dir

    monkeypatch.delenv("HF_RLHF_EXT_LAB_DIR", raising=False)
    monkeypatch.setenv("HF_RLHF_EXT_HOME", str(tmp_path))
    assert default_lab_dir(TINY) == os.path.join(str(tmp_path), "lab", TINY.cache_key())
    with pytest.raises(FileNotFoundError):
        Lab.from_dir(str(tmp_path))


def test_cli_reuses_a_built_lab(tiny_lab, capsys, monkeypatch):
    from hf_rlhf_ext.lab import __main__ as cli
    from hf_rlhf_ext.lab import build as build_module

    # the CLI builds LabConfig(seed=...); point it at the tiny config so this stays fast
    monkeypatch.setattr("hf_rlhf_ext.lab.config.LabConfig", lambda seed=0: TINY)
    assert cli.main(["build", "--output_dir", tiny_lab.root]) == 0
    out = capsys.readouterr().out
    assert tiny_lab.root in out and "rm_test_accuracy" in out
    assert build_module.is_complete(tiny_lab.root, TINY)


# ---------------------------------------------------------------------------------------------------------- default lab
#: sha256 of the default lab's weights as built (seed 0) and measured for the documented experiments.
DEFAULT_LAB_WEIGHTS = {
    "policy/model.safetensors": "61e760a5dd8bd9d0b1159cbeae0c12dd466e0ec9b5ffc887566e39dc181abc98",
    "reward_model/model.safetensors": "2b1fd1190cbebaf5550bec0aaff23ca6aaa20fd84636514c0dbd80bef5387e10",
    "ensemble/k3-bootstrap/rm_0/model.safetensors": "98b16ed7cf8fffab2a19af19a95fa62fd424210c15a4c92bd4038ceb3667afd2",
    "ensemble/k3-bootstrap/rm_1/model.safetensors": "fd1d0a336007f930943e7aade3e2b98605477834be20bbb3ce89705d89e25a8d",
    "ensemble/k3-bootstrap/rm_2/model.safetensors": "c336b7916e2bfb5f4232ef0e56b0a6ebffe14cf7a674355bedefd075c82378e8",
}


def sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _near_tie_pairs(reward_model, tokenizer, pairs, tol: float = 1e-3) -> list[int]:
    """Indices of the pairs whose chosen and rejected scores differ by less than ``tol``: float noise of the size
    that CPU kernels differ by (about 1e-6 here) can order these either way, no other pair."""
    from hf_rlhf_ext.reward_modeling import _pair_sequences
    from hf_rlhf_ext.scoring import score_token_ids

    pad = tokenizer.pad_token_id
    chosen = score_token_ids(reward_model, _pair_sequences(pairs, tokenizer, "chosen"), pad, 64)
    rejected = score_token_ids(reward_model, _pair_sequences(pairs, tokenizer, "rejected"), pad, 64)
    return [i for i, d in enumerate((chosen - rejected).abs().tolist()) if d < tol]


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """An empty cache, as on a fresh install."""
    monkeypatch.delenv("HF_RLHF_EXT_LAB_DIR", raising=False)
    monkeypatch.setenv("HF_RLHF_EXT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fresh_install_gets_the_shipped_lab_in_seconds(fresh_home):
    from hf_rlhf_ext.lab.build import PREBUILT_DIR

    start = time.perf_counter()
    lab = build_lab()
    assert time.perf_counter() - start < 5.0  # no training: the lab shipped with the package is copied
    assert lab.root == os.path.join(str(fresh_home), "lab", LabConfig().cache_key())
    for rel, digest in DEFAULT_LAB_WEIGHTS.items():
        assert sha256(os.path.join(lab.root, rel)) == digest, rel  # byte for byte the documented lab
    shipped = [os.path.join(d, f) for d, _, fs in os.walk(PREBUILT_DIR) for f in fs]
    assert all(not name.endswith((".pkl", ".pt", ".bin", ".arrow")) for name in shipped)  # safetensors and text only
    assert lab.load_policy().config.n_embd == LabConfig().n_embd and len(lab.load_prompts()["test"]) == 80
    from hf_rlhf_ext.lab.ensemble import build_reward_ensemble

    start = time.perf_counter()
    members = build_reward_ensemble(lab, k=3, split="bootstrap")  # shipped too: nothing to train
    assert time.perf_counter() - start < 1.0 and all(os.path.isdir(m) for m in members)


def test_default_lab_meets_the_acceptance_numbers(fresh_home):
    """What the recipes use by default is a usable RLHF world: its numbers, measured again from its files."""
    import torch

    from hf_rlhf_ext.lab.build import policy_quality
    from hf_rlhf_ext.reward_modeling import pairwise_report

    lab = build_lab()
    m = lab.metrics
    lo, hi = gold_range()
    assert lo + 1.0 < m["sft_test_gold_mean"] < hi - 0.4  # mediocre: room to improve, and room to be hacked
    assert m["sft_test_eos_rate"] > 0.9
    assert m["sft_test_item_rate"] > 0.5  # the policy learned to copy the customer's item
    assert 0.62 <= m["rm_test_accuracy"] <= 0.85  # vs noisy labels
    assert m["rm_test_gold_accuracy"] >= 0.70  # vs the gold order of clearly separated pairs
    assert m["rm_test_corr_gold"] > 0.3
    tokenizer, prefs = lab.load_tokenizer(), lab.load_preferences()
    reward_model = lab.load_reward_model()
    report = pairwise_report(reward_model, tokenizer, prefs["test"], gold_margin=lab.config.gold_margin)
    # 0.695 (278 of 400 held-out pairs) as documented, up to the pairs whose two scores are within float noise of
    # each other: another CPU's kernels may order (or tie) those differently, and nothing else
    near_ties = _near_tie_pairs(reward_model, tokenizer, prefs["test"])
    assert len(near_ties) <= 5  # the allowance stays small: at most 5 of 400 pairs (0.0125)
    assert abs(report["accuracy"] - 0.695) <= len(near_ties) / report["n_pairs"] + 1e-9
    assert abs(report["gold_accuracy"] - m["rm_test_gold_accuracy"]) <= len(near_ties) / report["n_gold_pairs"] + 1e-9
    torch.manual_seed(0)
    prompts = [r["prompt"] for r in lab.load_prompts()["test"]] * 2
    quality = policy_quality(lab.load_policy(), tokenizer, prompts, lab.config, seed=11)
    assert lo + 1.0 < quality["gold_mean"] < hi - 0.4 and quality["eos_rate"] > 0.9 and quality["item_rate"] > 0.5


def test_one_lab_directory_for_the_cli_the_recipes_and_the_rewards(tiny_lab, tmp_path, monkeypatch, capsys):
    """``lab build --lab_dir DIR``, ``$HF_RLHF_EXT_LAB_DIR``, the recipes' ``--lab_dir`` and the lab reward functions
    all name the same directory."""
    from hf_rlhf_ext.lab import __main__ as cli
    from hf_rlhf_ext.lab import default_lab_dir
    from hf_rlhf_ext.lab.build import open_lab
    from hf_rlhf_ext.lab.rewards import lab_reward_model_path
    from hf_rlhf_ext.run.build import load_lab
    from hf_rlhf_ext.run.spec import RLScriptArguments

    target = str(tmp_path / "my_lab")
    assert cli.main(["build", "--lab_dir", target]) == 0
    assert f"lab: {target}" in capsys.readouterr().out
    assert load_lab(RLScriptArguments(lab_dir=target)).root == target
    monkeypatch.setenv("HF_RLHF_EXT_LAB_DIR", target)
    assert default_lab_dir() == target and open_lab().root == target
    assert load_lab(RLScriptArguments()).root == target
    assert lab_reward_model_path() == os.path.join(target, "reward_model")
    assert cli.main(["path"]) == 0 and capsys.readouterr().out.strip() == target
    # --lab_dir wins over the variable, and a lab of another config there is used as it is
    assert load_lab(RLScriptArguments(lab_dir=tiny_lab.root)).config == TINY


def test_a_lab_of_an_older_layout_is_refused_with_the_fix(tiny_lab, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_lab.root, old)
    saved = json.loads((old / "lab_config.json").read_text())
    (old / "lab_config.json").write_text(json.dumps({**saved, "lab_version": 1}))
    with pytest.raises(ValueError, match="--force"):
        Lab.from_dir(str(old))


def test_the_shipped_lab_is_copied_as_writable_files(fresh_home, tmp_path, monkeypatch):
    """An installed package can be read-only; the lab copied out of it must not be (ensembles are built inside it)."""
    import shutil
    import stat

    from hf_rlhf_ext.lab import build as build_module

    package = tmp_path / "read_only_package"
    shutil.copytree(build_module.PREBUILT_DIR, package)
    for directory, _, files in os.walk(package):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)
    monkeypatch.setattr(build_module, "PREBUILT_DIR", str(package))
    try:
        lab = build_lab()
        for directory, _, files in os.walk(lab.root):
            assert os.stat(directory).st_mode & stat.S_IWUSR, directory
            assert all(os.stat(os.path.join(directory, f)).st_mode & stat.S_IWUSR for f in files), directory
    finally:
        for directory, _, _ in os.walk(package):
            os.chmod(directory, 0o755)


@pytest.mark.slow
def test_a_build_from_scratch_reaches_the_shipped_labs_numbers(tmp_path):
    """`lab build --force` trains a lab as good as the one the package ships (one thread, fixed seeds): about 1
    minute on a free CPU core, 3 on a busy one. Byte-identical weights are a property of one machine (two builds here
    agree: ``test_same_seed_gives_the_same_lab``); across CPUs float kernels differ, so the numbers are held to margins
    of about two standard errors of each statistic."""
    from hf_rlhf_ext.lab.build import PREBUILT_DIR

    lab = build_lab(output_dir=str(tmp_path / "lab"), force=True)
    assert lab.metrics["build_times"]["sft_s"] > 1.0  # trained, not copied
    for rel in ("prompts/train.jsonl", "prompts/test.jsonl"):  # drawn by seeded Python code, no floats
        assert sha256(os.path.join(lab.root, rel)) == sha256(os.path.join(PREBUILT_DIR, rel)), rel
    shipped = json.load(open(os.path.join(PREBUILT_DIR, "lab_metrics.json")))
    margins = {  # ~2 standard errors: binomial on 400 held-out pairs / 241 gold pairs / 1000 train labels
        "rm_test_accuracy": 0.05, "rm_test_gold_accuracy": 0.05, "pairs_train_flip_rate": 0.025,
        "sft_test_gold_mean": 0.15,  # mean gold of 256 samples, gold's spread about 1
    }  # fmt: skip
    for key, margin in margins.items():
        assert abs(lab.metrics[key] - shipped[key]) <= margin, (key, lab.metrics[key], shipped[key])

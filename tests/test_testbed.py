"""The testbed (``hf_rlhf_ext.lab.testbed``): a lab directory built around a model and a gold judge of one's own —
its layout and numbers, labels that follow the judge up to the stated noise, the pairs in the form the RL-time reward
model scores, recipes that track the judge as the gold, and clear errors for bad input. The policy is the lab's own
(tiny, CPU), so each build takes seconds."""

from __future__ import annotations

import json
import os

import pytest

from hf_rlhf_ext.lab.testbed import TestbedConfig, build_testbed
from hf_rlhf_ext.validation import InputError

JUDGE = "_testbed_judge.word_count"  # tests/ is on sys.path while pytest runs
LAB_JUDGE = "hf_rlhf_ext.lab.rewards.lab_gold_reward"
SMALL = dict(n_pairs_train=96, n_pairs_test=48, rm_epochs=2.0)
PROMPTS = [("my lamp is broken", 0.0), ("my watch does not fit", 1.0), ("my laptop never arrived", 0.0),
           ("i want to return my sofa", 1.0), ("my toaster stopped working", 0.0), ("my jacket is the wrong size", 1.0),
           ("i was charged twice for my kettle", 0.0), ("my phone is missing a part", 1.0)]


@pytest.fixture(scope="module")
def lab_judge_testbed(lab, tmp_path_factory):
    """The lab's policy and prompts, the lab's gold as the judge, the lab's label noise (tau 0.3)."""
    root = tmp_path_factory.mktemp("tb") / "lab_judge"
    return build_testbed(TestbedConfig(policy=lab.policy_path, gold_funcs=LAB_JUDGE, **SMALL), str(root))


@pytest.fixture(scope="module")
def chat_testbed(lab, tmp_path_factory):
    """Prompts of one's own (plain text, so the policy's chat template wraps them) with a ``bonus`` column, a judge
    of one's own, noiseless labels."""
    tmp = tmp_path_factory.mktemp("tb")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "bonus": b}) + "\n" for p, b in PROMPTS))
    config = TestbedConfig(policy=lab.policy_path, gold_funcs=JUDGE, prompts=str(prompts), label_noise=0.0,
                           test_fraction=0.25, n_pairs_train=48, n_pairs_test=24, rm_epochs=1.0)
    return build_testbed(config, str(tmp / "chat"))


def test_layout_and_metrics(lab_judge_testbed):
    tb = lab_judge_testbed
    for sub in ("policy", "tokenizer", "reward_model", "prompts", "preferences"):
        assert os.path.isdir(os.path.join(tb.root, sub)), sub
    for split in ("train", "test"):
        assert os.path.isfile(os.path.join(tb.root, "prompts", f"{split}.jsonl"))
        assert os.path.isfile(os.path.join(tb.root, "preferences", f"{split}.jsonl"))
    with open(os.path.join(tb.root, "lab_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(tb.root, "testbed.json")) as f:
        saved = json.load(f)
    assert saved["gold_funcs"] == metrics["gold_funcs"] == LAB_JUDGE
    assert metrics["gold_metric"] == "rewards/lab_gold_reward/mean"
    assert metrics["pairs_train_n"] == 96 and metrics["pairs_test_n"] == 48
    assert metrics["rm_kind"] == "scratch" and metrics["rm_train_pairs"] == 96
    # a real proxy: clearly better than chance on held-out pairs, yet far from the judge itself
    assert 0.55 < metrics["rm_test_accuracy"] < 1.0
    assert metrics["rm_test_n_pairs"] == 48
    prompts = tb.load_prompts()
    assert not set(prompts["train"]["prompt"]) & set(prompts["test"]["prompt"])
    assert set(tb.load_preferences()["test"]["prompt"]) <= set(prompts["test"]["prompt"])


def test_labels_follow_the_judge_up_to_the_noise(lab_judge_testbed, chat_testbed):
    from hf_rlhf_ext.lab.task import gold_reward

    noisy = lab_judge_testbed.load_preferences()["train"]
    for row in noisy.select(range(20)):  # gold columns are the judge's scores of the replies
        assert row["chosen_gold"] == gold_reward([row["prompt"]], [row["chosen"]])[0]
    flips = noisy["label_flipped"]
    assert flips == [c < r for c, r in zip(noisy["chosen_gold"], noisy["rejected_gold"])]
    assert 0 < sum(flips) / len(flips) < 0.4  # tau 0.3 on a gold spread of ~0.6: some flips, mostly right
    for split in ("train", "test"):  # label_noise 0: the chosen side always has the higher gold
        rows = chat_testbed.load_preferences()[split]
        assert all(c >= r for c, r in zip(rows["chosen_gold"], rows["rejected_gold"]))
        assert sum(c > r for c, r in zip(rows["chosen_gold"], rows["rejected_gold"])) > len(rows) // 2
    assert chat_testbed.metrics["pairs_train_flip_rate"] == 0.0


def test_the_judge_is_called_as_trl_calls_it_and_the_rm_sees_what_it_scores_in_rl(chat_testbed):
    from hf_rlhf_ext.rewards import RewardModelFunction
    from hf_rlhf_ext.sampling import as_chat_prompts

    bonus = dict(PROMPTS)
    rows = chat_testbed.load_preferences()["train"]
    for row in rows:  # the data set's other columns reach the judge as keyword arguments
        assert row["chosen_gold"] == pytest.approx(len(row["chosen"].split()) / 10 + bonus[row["prompt"]])
    rm = RewardModelFunction(chat_testbed.reward_model_path)
    for row in rows.select(range(8)):
        chat = as_chat_prompts(rm.tokenizer, [row["prompt"]])
        assert isinstance(chat[0], list)  # a plain prompt became one user turn of the policy's chat template
        ended = [rm.tokenizer.eos_token_id] if row["chosen_eos"] else [rm.tokenizer.pad_token_id]
        completion = [{"role": "assistant", "content": row["chosen"]}]
        assert rm.sequences(chat, [completion], [ended])[0] == row["chosen_ids"]


def test_open_lab_opens_it_and_a_recipe_tracks_the_judge_as_gold(chat_testbed, tmp_path):
    from _recipe_helpers import run_recipe

    from hf_rlhf_ext.lab.build import open_lab

    before = os.path.getmtime(os.path.join(chat_testbed.root, "lab_metrics.json"))
    opened = open_lab(chat_testbed.root)
    assert opened.is_testbed and opened.gold_funcs == JUDGE and opened.config is None
    assert os.path.getmtime(os.path.join(chat_testbed.root, "lab_metrics.json")) == before  # opened, not rebuilt
    out = tmp_path / "grpo"
    run_recipe("grpo", ["--lab_dir", chat_testbed.root, "--max_steps", "2", "--output_dir", str(out),
                        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length",
                        "12", "--num_eval_prompts", "2", "--logging_steps", "1", "--save_strategy", "no",
                        "--monitor", "none"])
    logs = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in logs if "rewards/word_count/mean" in h]
    assert len(steps) == 2 and all("rewards/proxy_reward/mean" in h for h in steps)
    assert not any("rewards/gold_reward/mean" in h for h in logs)  # the lab's own gold is not the gold here


def test_bad_inputs_fail_clearly(lab, tmp_path):
    from hf_rlhf_ext.lab.__main__ import main

    def build(**kw):
        args = dict(policy=lab.policy_path, gold_funcs=JUDGE, **SMALL)
        return build_testbed(TestbedConfig(**{**args, **kw}), str(tmp_path / "tb"))

    with pytest.raises(InputError, match="cannot import module 'no_such_module'"):
        build(gold_funcs="no_such_module.judge")
    no_function = "--gold_funcs '_testbed_judge.nope': module '_testbed_judge' .* has no attribute 'nope'"
    with pytest.raises(InputError, match=no_function):
        build(gold_funcs="_testbed_judge.nope")
    with pytest.raises(InputError, match="--policy .*no such file"):
        build(policy=str(tmp_path / "missing_model"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="has 0 prompt"):
        build(prompts=str(empty))
    with pytest.raises(InputError, match="no 'prompt' field"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
        build(prompts=str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="label_noise"):
        build(label_noise=-1.0)
    for dropout in (-0.1, 1.0):
        with pytest.raises(InputError, match="--rm_dropout must be in"):
            build(rm_dropout=dropout)
    with pytest.raises(InputError, match="--rm_dropout is the from-scratch RM's"):
        build(rm_dropout=0.1, reward_model_base="policy")
    occupied = tmp_path / "tb"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a testbed"):
        build()
    assert os.listdir(occupied) == ["notes.txt"]  # left alone
    assert not any(p.name.startswith("tb.building-") for p in tmp_path.iterdir())
    # the command line: one readable line and exit code 2
    assert main(["build", "--policy", lab.policy_path, "--gold_funcs", "no_such_module.judge", "--lab_dir",
                 str(tmp_path / "cli")]) == 2
    assert main(["build", "--gold_funcs", JUDGE, "--lab_dir", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_cli_builds_a_testbed(lab, tmp_path, capsys):
    from hf_rlhf_ext.lab.__main__ import main

    root = tmp_path / "cli"
    assert main(["build", "--policy", lab.policy_path, "--gold_funcs", JUDGE, "--lab_dir", str(root),
                 "--n_pairs_train", "32", "--n_pairs_test", "16", "--rm_epochs", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["gold_funcs"] == JUDGE and printed["root"] == str(root)
    assert 0.0 <= printed["rm_test_accuracy"] <= 1.0
    # the same command again reuses it; other settings there need --force
    assert main(["build", "--policy", lab.policy_path, "--gold_funcs", JUDGE, "--lab_dir", str(root),
                 "--n_pairs_train", "32", "--n_pairs_test", "16", "--rm_epochs", "1"]) == 0
    assert main(["build", "--policy", lab.policy_path, "--gold_funcs", JUDGE, "--lab_dir", str(root)]) == 2
    assert "--force" in capsys.readouterr().err


def test_the_proxy_starts_from_the_policys_token_embeddings(lab):
    """The from-scratch RM's token embeddings keep the policy's geometry (projected to the RM's width); with
    ``rm_init_embeddings=False`` they are random."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_rlhf_ext.lab.testbed import new_proxy_model

    tokenizer = AutoTokenizer.from_pretrained(lab.policy_path)
    policy_emb = AutoModelForCausalLM.from_pretrained(lab.policy_path).get_input_embeddings().weight.detach()

    def similarity_agreement(emb):
        def cos(e):  # cosine similarities of distinct token pairs
            e = torch.nn.functional.normalize(e - e.mean(0), dim=-1)
            return (e @ e.T)[~torch.eye(len(e), dtype=torch.bool)]
        return torch.corrcoef(torch.stack([cos(emb.float()), cos(policy_emb.float())]))[0, 1].item()

    config = TestbedConfig(policy=lab.policy_path, gold_funcs=JUDGE)
    rm = new_proxy_model(config, tokenizer, None, 40, policy_emb)
    wte = rm.transformer.wte.weight.detach()
    assert wte.shape == (len(tokenizer), config.rm_n_embd)
    assert similarity_agreement(wte) > 0.8
    assert wte.std().item() == pytest.approx(0.02, rel=0.05)
    random_rm = new_proxy_model(TestbedConfig(policy=lab.policy_path, gold_funcs=JUDGE, rm_init_embeddings=False),
                                tokenizer, None, 40, policy_emb)
    assert abs(similarity_agreement(random_rm.transformer.wte.weight.detach())) < 0.2


def test_the_proxys_dropout_is_on_while_it_trains_and_off_when_it_scores(lab, chat_testbed, tmp_path, monkeypatch):
    """``rm_dropout`` (against a small RM memorising noisy labels) reaches the RM's layers and stays on in training:
    TRL's RewardConfig disables dropout unless told not to, and the reward recipe on the testbed is told the same."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    import hf_rlhf_ext.reward_modeling as reward_modeling
    from hf_rlhf_ext.lab.testbed import _train_proxy, new_proxy_model
    from hf_rlhf_ext.lab.testbed_settings import recipe_defaults

    tokenizer = AutoTokenizer.from_pretrained(lab.policy_path)
    config = TestbedConfig(policy=lab.policy_path, gold_funcs=JUDGE, rm_dropout=0.3)
    rm = new_proxy_model(config, tokenizer, None, 40)
    ids = torch.tensor([tokenizer("my lamp is broken")["input_ids"]])
    rm.train()
    assert not torch.equal(rm(ids).logits, rm(ids).logits)  # dropout draws differ in training
    rm.eval()
    assert torch.equal(rm(ids).logits, rm(ids).logits)  # and not when it scores

    seen = []

    def spy(model, tokenizer, train, test, args, **kw):
        seen.append(args.disable_dropout)
        raise KeyboardInterrupt  # stop before training: only the arguments matter here

    monkeypatch.setattr(reward_modeling, "train_reward_model", spy)
    for dropout in (0.3, 0.0):
        with pytest.raises(KeyboardInterrupt):
            _train_proxy(TestbedConfig(policy=lab.policy_path, gold_funcs=JUDGE, rm_dropout=dropout), tokenizer,
                         Dataset.from_dict({"chosen_ids": [[1, 2]], "rejected_ids": [[1, 3]]}), None, str(tmp_path),
                         str(tmp_path / "rm"))
    assert seen == [False, True]

    assert recipe_defaults(chat_testbed.root, True)["disable_dropout"] is True  # built without dropout
    copy = tmp_path / "tb"
    copy.mkdir()
    shutil.copy(os.path.join(chat_testbed.root, "testbed.json"), copy)
    saved = json.loads((copy / "testbed.json").read_text())
    saved["config"]["rm_dropout"] = 0.2
    (copy / "testbed.json").write_text(json.dumps(saved))
    assert recipe_defaults(str(copy), True)["disable_dropout"] is False


def test_on_a_testbed_the_lab_yaml_does_not_apply_its_build_settings_do(chat_testbed, monkeypatch):
    """The lab's YAML settings were sized for the lab's tiny policy: on a testbed the defaults are its build settings
    (reply length and temperature of the pairs; the proxy's schedule for the reward recipe), else TRL's."""
    import dataclasses

    from _recipe_helpers import load_recipe
    from trl import GRPOConfig, RewardConfig

    from hf_rlhf_ext.experiments import sweeps
    from hf_rlhf_ext.lab.testbed_settings import DEFAULT_RM_LR

    trl_grpo = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    grpo = load_recipe("grpo").make_parser()
    script_args, training_args, _ = grpo.parse_args_and_config(args=["--lab_dir", chat_testbed.root])
    assert training_args.max_completion_length == 32 != trl_grpo["max_completion_length"]  # the build's max_new_tokens
    assert (training_args.learning_rate, training_args.beta, training_args.max_steps) == (
        trl_grpo["learning_rate"], trl_grpo["beta"], -1)
    assert script_args.monitor == "none"
    assert grpo.settings == ("settings: command line: lab_dir; testbed defaults (testbed.json): max_completion_length, "
                             "temperature; on a testbed: grpo_lab.yaml NOT applied (its build settings, else TRL's "
                             "defaults)")
    monkeypatch.setenv("HF_RLHF_EXT_LAB_DIR", chat_testbed.root)  # the testbed named by the environment: the same
    assert grpo.parse_args_and_config(args=[])[1].max_completion_length == 32
    assert sweeps.parse_sweep_argv([])[2].max_completion_length == 32  # the experiments read the same defaults
    monkeypatch.delenv("HF_RLHF_EXT_LAB_DIR")
    reward = load_recipe("reward").make_parser()
    _, training_args, _ = reward.parse_args_and_config(args=["--lab_dir", chat_testbed.root])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (DEFAULT_RM_LR["scratch"], 1.0)
    assert training_args.per_device_train_batch_size == 16 != 32  # the build's rm_batch_size, not the lab YAML's
    assert training_args.logging_steps == {f.name: f.default for f in dataclasses.fields(RewardConfig)}["logging_steps"]
    flags = ["--lab_dir", chat_testbed.root, "--max_completion_length", "7", "--dataset_name", "x"]
    assert grpo.parse_args_and_config(args=flags)[1].max_completion_length == 7  # a flag wins; off the testbed too


def test_an_experiment_on_a_testbed_states_its_settings_and_needs_no_output_dir(chat_testbed, tmp_path, monkeypatch,
                                                                                capsys):
    from hf_rlhf_ext.experiments import baselines, ensembles
    from hf_rlhf_ext.run import parsing

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(parsing, "_ANNOUNCED", set())
    parsing.announce_settings(ensembles.parse_argv(["--lab_dir", chat_testbed.root])[0])
    assert "on a testbed: rm_ensemble_lab.yaml NOT applied" in capsys.readouterr().err
    spec = baselines.parse_baselines_spec(["--lab_dir", chat_testbed.root])  # the lab YAML named the folder; TRL's
    assert spec.output_dir == str(tmp_path / "trainer_output")  # default names it here, made absolute
    assert spec.runs()[0].training_args().output_dir.startswith(spec.output_dir)


def test_the_reward_recipe_trains_a_proxy_as_the_testbed_did(chat_testbed, tmp_path):
    from _recipe_helpers import run_recipe
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "rm"
    metrics = run_recipe("reward", ["--lab_dir", chat_testbed.root, "--output_dir", str(out),
                                    "--disable_tqdm", "true"])
    assert metrics["n_train_pairs"] == chat_testbed.metrics["pairs_train_n"]  # the testbed's preferences/
    assert metrics["test"]["n_pairs"] == chat_testbed.metrics["pairs_test_n"]
    assert "gold_accuracy" in metrics["test"]
    ours, proxy = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(chat_testbed.reward_model_path)
    for key in ("model_type", "vocab_size", "n_embd", "n_layer", "n_positions", "pad_token_id"):
        assert getattr(ours, key) == getattr(proxy, key), key
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the proxy's tokenizer, not the policy's
    # the same recipe, seed and pairs as the build: the same held-out accuracy up to a pair or two
    assert metrics["test"]["accuracy"] == pytest.approx(chat_testbed.metrics["rm_test_accuracy"], abs=0.1)


def test_an_rm_ensemble_on_a_testbed_trains_each_member_as_its_proxy(chat_testbed):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_rlhf_ext.lab.build import open_lab
    from hf_rlhf_ext.lab.ensemble import build_reward_ensemble

    paths = build_reward_ensemble(open_lab(chat_testbed.root), k=2, split="bootstrap")
    proxy = AutoConfig.from_pretrained(chat_testbed.reward_model_path)
    members = [AutoModelForSequenceClassification.from_pretrained(p) for p in paths]
    for member in members:
        assert (member.config.n_embd, member.config.vocab_size) == (proxy.n_embd, proxy.vocab_size)
    assert not torch.equal(members[0].score.weight, members[1].score.weight)  # own seeds, own resamples
    with open(os.path.join(os.path.dirname(paths[0]), "ensemble_metrics.json")) as f:
        report = json.load(f)
    assert [m["seed"] for m in report["members"]] == [1000, 2000]
    assert all(m["n_pairs"] == chat_testbed.metrics["pairs_test_n"] for m in report["members"])


def test_the_mini_loop_and_best_of_n_run_on_a_testbed(chat_testbed, tmp_path):
    from _recipe_helpers import run_recipe

    loop = run_recipe("mini_loop", ["--lab_dir", chat_testbed.root, "--output_dir", str(tmp_path / "loop"),
                                    "--steps", "1", "--batch_size", "4", "--max_new_tokens", "6",
                                    "--num_eval_prompts", "2"])
    assert loop["on_lab"] is False and "gold_reward" not in loop["curve"][0]  # the lab's gold is not this policy's
    bon = run_recipe("best_of_n", ["--lab_dir", chat_testbed.root, "--output_dir", str(tmp_path / "bon"), "--n", "2",
                                   "--pool_size", "2", "--rounds", "1", "--max_new_tokens", "6",
                                   "--num_eval_prompts", "2", "--disable_tqdm", "true"])
    assert bon["gold"] == "word_count"  # the testbed's judge is the gold


def test_the_done_when_command_accelerate_launch_grpo_on_a_testbed(chat_testbed, tmp_path):
    """``accelerate launch recipes/grpo.py --lab_dir D --max_steps 2`` as typed (one CPU process): it trains on the
    testbed with its build's reply length, tracks the judge as the gold and says where its settings came from."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(root / "accelerate_configs" / "cpu.yaml"), str(root / "recipes" / "grpo.py"),
                          "--lab_dir", chat_testbed.root, "--max_steps", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert run.stderr.count("settings: command line: lab_dir, max_steps; testbed defaults (testbed.json)") == 1
    out = tmp_path / "trainer_output"  # TRL's default output_dir: the lab's runs/grpo-lab is not used here
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["on_lab"] is False and metrics["testbed"] == chat_testbed.root
    logs = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert any("rewards/word_count/mean" in h for h in logs)


def test_the_pipeline_on_a_testbed_decides_what_it_can_and_skips_the_labs_own_stage(chat_testbed, tmp_path,
                                                                                   monkeypatch):
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from _recipe_helpers import run_recipe

    from hf_rlhf_ext.run.parsing import read_shipped_config

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "recipes"))  # as `python recipes/...` has it
    monkeypatch.delitem(sys.modules, "pipeline_stages", raising=False)
    payload = run_recipe("pipeline", ["--lab_dir", chat_testbed.root, "--quick", "--stages", "lab", "reward_model",
                                      "--max_parallel", "1", "--output_dir", str(tmp_path)])
    stored = json.loads((tmp_path / "stages" / "lab.json").read_text())
    assert "a testbed" in json.dumps(stored)  # skipped, with the reason
    claims = {c["id"]: c for c in payload["claims"]}
    assert claims["rm_accuracy"]["holds"] is not None  # decided from the testbed's own pairs
    assert f"on the testbed {chat_testbed.root}" in (tmp_path / "report.md").read_text()
    assert payload["on_lab"] is False and payload["testbed"] == chat_testbed.root  # where the numbers come from
    # the stages that read their step budget from a lab file get it as a flag there (the file itself does not apply)
    import pipeline_stages

    steps = read_shipped_config("beta_sweep_lab.yaml")["max_steps"]
    assert pipeline_stages._lab_budget(SimpleNamespace(on_testbed=True), "beta_sweep_lab.yaml") == [
        "--max_steps", str(steps)]
    assert pipeline_stages._lab_budget(SimpleNamespace(on_testbed=False), "beta_sweep_lab.yaml") == []

"""Old TRL PPO scripts (trl ≤ 1.12) on hf_rlhf_ext.compat: the old example script with only its import line changed
trains on the lab, saves a policy that reloads, prints completions; old fields without an equivalent fail early."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The structure of TRL's old examples/scripts/ppo/ppo.py; only the PPO import line differs from the original
# (`from trl.experimental.ppo import PPOConfig, PPOTrainer`).
OLD_SCRIPT = '''
import shutil

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
)

from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config
from hf_rlhf_ext.compat import PPOConfig, PPOTrainer


if __name__ == "__main__":
    parser = HfArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_into_dataclasses()
    # remove output_dir if exists
    shutil.rmtree(training_args.output_dir, ignore_errors=True)

    ################
    # Model & Tokenizer
    ################
    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    value_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1
    )
    policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)

    peft_config = get_peft_config(model_args)
    if peft_config is None:
        ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)
    else:
        ref_policy = None

    ################
    # Dataset
    ################
    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )
    eval_samples = 100
    train_dataset = dataset.select(range(len(dataset) - eval_samples))
    eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))
    dataset_text_field = "prompt"

    def prepare_dataset(dataset, tokenizer):
        """pre-tokenize the dataset before training; only collate during training"""

        def tokenize(element):
            outputs = tokenizer(
                element[dataset_text_field],
                padding=False,
            )
            return {"input_ids": outputs["input_ids"]}

        return dataset.map(
            tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=training_args.dataset_num_proc,
        )

    # Compute that only on the main process for faster data processing.
    with PartialState().local_main_process_first():
        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

    ################
    # Training
    ################
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    trainer.train()

    # Save and push to hub
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    trainer.generate_completions()
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    return env


def _logged_dicts(stdout: str) -> list[dict]:
    """The Trainer's printed log lines ({'loss': ..., ...})."""
    logs = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}") and "'" in line:
            try:
                logs.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                continue
    return logs


@pytest.fixture(scope="module")
def old_script_run(lab, tmp_path_factory):
    root = tmp_path_factory.mktemp("old_ppo")
    data_dir = root / "prompts"
    data_dir.mkdir()
    prompts = lab.load_prompts()["train"]["prompt"]
    with open(data_dir / "train.jsonl", "w") as f:
        for p in prompts[:132]:  # the script holds the last 100 out for evaluation
            f.write(json.dumps({"prompt": p}) + "\n")
    script = root / "ppo.py"
    script.write_text(OLD_SCRIPT)
    out = root / "out"
    args = [
        "--dataset_name", str(data_dir), "--model_name_or_path", lab.policy_path,
        "--sft_model_path", lab.policy_path, "--reward_model_path", lab.reward_model_path,
        "--output_dir", str(out), "--missing_eos_penalty", "1.0", "--total_episodes", "32",
        "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--num_ppo_epochs", "1",
        "--response_length", "16", "--learning_rate", "3e-4", "--kl_coef", "0.05", "--temperature", "1.0",
        "--per_device_eval_batch_size", "50", "--num_sample_generations", "1", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
    ]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=_env(),
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "lab": lab}


# Every name the old trainer logged at each update.
OLD_METRICS = (
    "eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
    "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr", "episode",
)


def test_old_script_trains_on_the_lab(old_script_run):
    """The old example's command line as it was: no --stop_token (the old default None) runs, silently (on the lab
    policy the old default ended completions at the EOS, as PPOTrainer does), and logs every old metric name."""
    logs = [d for d in _logged_dicts(old_script_run["stdout"]) if "loss" in d]
    # total_episodes 32 with 16-completion rollouts = 2 rollouts × 1 mini-batch × 1 epoch = 2 optimizer steps
    assert len(logs) == 2, old_script_run["stdout"][-2000:]
    assert [d["episode"] for d in logs] == [16, 32]
    assert "stop_token" not in old_script_run["stderr"]
    for d in logs:
        assert set(OLD_METRICS) <= set(d), set(OLD_METRICS) - set(d)
        assert d["val/ratio_var"] is None  # one micro-batch per update: no variance (the old torch.var gave NaN)
    for d in logs:
        score, value_loss = float(d["objective/scores"]), float(d["loss/value_avg"])
        # missing_eos_penalty 1.0 comes off each completion that never ended (GRPO's clipped_ratio: the share of them)
        expected = float(d["rewards/reward_model/mean"]) - 1.0 * float(d["completions/clipped_ratio"])
        assert math.isfinite(score) and score == pytest.approx(expected, abs=2e-3)
        assert math.isfinite(value_loss) and value_loss > 0  # the critic is fitted to the returns
    assert abs(float(logs[0]["objective/kl"])) < 1e-5  # first rollout: the policy is its reference (up to rounding)
    assert float(logs[1]["objective/kl"]) != 0.0  # after one update it has moved away


def test_old_script_saves_a_policy_that_reloads_trained(old_script_run):
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(old_script_run["out"])
    sft = old_script_run["lab"].load_policy()
    moved = [
        name for name, p in saved.named_parameters()
        if not torch.equal(p, dict(sft.named_parameters())[name])
    ]
    assert moved, "the saved policy equals the SFT policy: nothing was trained"
    assert (old_script_run["out"] / "value_model").is_dir()


def test_old_script_prints_completion_tables(old_script_run):
    stdout = old_script_run["stdout"]
    # one table during training (num_sample_generations=1) and one from generate_completions() at the end
    assert stdout.count("model response") == 2, stdout[-3000:]
    assert stdout.count("customer :") >= 2 * 5  # the first five eval prompts, in each table
    assert "[EOS]" in stdout  # replies that ended, decoded with their EOS as before
    tables = sorted((old_script_run["out"] / "completions").glob("eval_completions_*.parquet"))
    import pandas as pd

    final = pd.read_parquet(tables[-1])
    assert list(final.columns) == ["query", "model response", "score"]
    assert len(final) == 100  # the whole eval set (two batches of 50)


def test_an_old_field_without_equivalent_fails_before_training(tmp_path):
    """As an old command line is parsed (HfArgumentParser builds the config), before any model is loaded."""
    from transformers import HfArgumentParser

    from hf_rlhf_ext.compat import PPOConfig

    argv = ["--output_dir", str(tmp_path), "--local_rollout_forward_batch_size", "1"]
    with pytest.raises(ValueError) as err:
        HfArgumentParser(PPOConfig).parse_args_into_dataclasses(args=argv)
    assert "local_rollout_forward_batch_size" in str(err.value)
    assert "per_device_train_batch_size" in str(err.value)  # the replacement


@pytest.mark.parametrize(
    "kwargs, field, replacement",
    [
        ({"stop_token": "eot"}, "stop_token", "stop_token='eos'"),
        ({"stop_token": "eos", "ref_adapter_name": "ref"}, "ref_adapter_name", "peft_config"),
        ({"stop_token": "eos", "model_adapter_name": "policy"}, "model_adapter_name", "peft_config"),
        ({"stop_token": "eos", "total_episodes": 10, "max_steps": 5}, "total_episodes", "max_steps"),
        ({"stop_token": "eos", "response_length": 20, "max_completion_length": 30}, "response_length",
         "only response_length"),
        ({"stop_token": "eos", "local_mini_batch_size": 3}, "local_mini_batch_size", "num_mini_batches"),
        ({"stop_token": "eos", "num_total_batches": 3}, "num_total_batches", "total_episodes"),
    ],
)
def test_refused_values_name_the_field_and_the_replacement(tmp_path, kwargs, field, replacement):
    from hf_rlhf_ext.compat import PPOConfig

    with pytest.raises(ValueError) as err:
        PPOConfig(output_dir=str(tmp_path), **kwargs)
    assert f"PPOConfig.{field}=" in str(err.value)
    assert replacement in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# The adapter's pieces, in process


def _config(tmp_path, **overrides):
    from hf_rlhf_ext.compat import PPOConfig

    kwargs = dict(output_dir=str(tmp_path), stop_token="eos", per_device_train_batch_size=8, num_ppo_epochs=1,
                  response_length=8, num_sample_generations=0, report_to="none", save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def _tokenised(lab, tokenizer, n: int, prefix: list[int] = ()):
    from datasets import Dataset

    prompts = lab.load_prompts()["train"]["prompt"][:n]
    return Dataset.from_dict({"input_ids": [list(prefix) + tokenizer(p)["input_ids"] for p in prompts]})


def _trainer(lab, config, train_dataset, **kwargs):
    from hf_rlhf_ext.compat import PPOTrainer

    tokenizer = lab.load_tokenizer()
    tokenizer.padding_side = "left"
    args = dict(args=config, processing_class=tokenizer, model=lab.load_policy(), ref_model=lab.load_policy(),
                reward_model=lab.load_reward_model(), value_model=lab.load_reward_model(),
                train_dataset=train_dataset)
    args.update(kwargs)
    return PPOTrainer(**args)


def test_the_policy_is_prompted_with_the_rows_token_ids(lab, tmp_path):
    """Rows that start with [BOS]: decoding and re-tokenising would drop it; the policy must see it."""
    tokenizer = lab.load_tokenizer()
    data = _tokenised(lab, tokenizer, 8, prefix=[tokenizer.bos_token_id])
    trainer = _trainer(lab, _config(tmp_path, total_episodes=8), data)
    seen = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and ids.shape == mask.shape:  # a whole sequence (not one cached decoding step)
            seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))

    handle = trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    rows = {tuple(r) for r in data["input_ids"]}
    prompts_seen = {tuple(s[: len(r)]) for s in seen for r in rows if tuple(s[: len(r)]) == r}
    assert prompts_seen == rows  # every rollout prompt, [BOS] included, exactly as tokenised
    assert trainer.state.global_step == 1  # total_episodes 8 = one rollout of 8


def test_the_critic_starts_as_the_value_model(lab):
    """The old critic was the value model itself: its values at a sequence's last token are the model's score."""
    import torch

    from hf_rlhf_ext.compat.trainer import critic_from_value_model

    tokenizer, rm = lab.load_tokenizer(), lab.load_reward_model().eval()
    ids = torch.tensor([tokenizer("customer : my lamp is broken agent : we will send a new lamp . [EOS]")["input_ids"]])
    critic = critic_from_value_model(rm, share_weights=False).eval()
    with torch.no_grad():
        values, score = critic(ids), rm(input_ids=ids).logits[0, 0]
    assert values[0, -1].item() == pytest.approx(score.item(), abs=1e-5)
    assert values[0].std() > 0  # a real head, not the zero head of a fresh critic


def test_max_steps_follow_total_episodes_with_mini_batches_and_epochs(tmp_path):
    config = _config(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=2,
                     num_ppo_epochs=3)
    # the old rollout (8 per process) is kept and cut into 2 mini-batches of 4, one optimizer step each
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 1)
    assert config.per_device_train_batch_size * config.steps_per_generation == 8
    assert (config.batch_size, config.local_mini_batch_size) == (8, 4)
    # 20 episodes → ⌈20 / 8⌉ = 3 rollouts, each 2 mini-batches × 3 epochs
    assert config.max_steps_for(20) == (3, 18)


@pytest.mark.parametrize("bad", ["stop_token_id", "data_collator"])
def test_unsupported_old_arguments_fail_at_construction(lab, tmp_path, bad):
    tokenizer = lab.load_tokenizer()
    data = _tokenised(lab, tokenizer, 8)
    if bad == "stop_token_id":
        config, extra = _config(tmp_path, stop_token=None, stop_token_id=tokenizer.bos_token_id), {}
        expected = "stop_token='eos'"
    else:
        from transformers import DataCollatorWithPadding

        config, extra = _config(tmp_path), {"data_collator": DataCollatorWithPadding(tokenizer)}
        expected = "Drop it"
    with pytest.raises(ValueError) as err:
        _trainer(lab, config, data, **extra)
    assert bad in str(err.value) and expected in str(err.value)


def test_stop_token_id_equal_to_eos_is_accepted(lab, tmp_path):
    tokenizer = lab.load_tokenizer()
    config = _config(tmp_path, stop_token=None, stop_token_id=tokenizer.eos_token_id, total_episodes=8)
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 8))
    assert trainer.stop_token_id == tokenizer.eos_token_id
    assert config.max_steps == 1


def test_the_docs_show_the_field_table():
    from hf_rlhf_ext.compat.fields import markdown_table

    page = (REPO / "docs" / "migration.md").read_text()
    assert markdown_table() in page


def test_a_given_ref_model_is_the_reference(lab, tmp_path):
    import torch

    tokenizer = lab.load_tokenizer()
    ref = lab.load_policy()
    with torch.no_grad():
        ref.lm_head.weight.add_(0.5)  # a reference that is not the policy's checkpoint
    trainer = _trainer(lab, _config(tmp_path, total_episodes=8), _tokenised(lab, tokenizer, 8), ref_model=ref)
    held = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert torch.equal(held.lm_head.weight, ref.lm_head.weight)
    assert not torch.equal(held.lm_head.weight, trainer.model.lm_head.weight)


def test_peft_without_ref_model_uses_the_adapter_free_policy_as_reference(lab, tmp_path):
    """The old script's --use_peft branch: ref_model=None, the reference is the policy with its adapter disabled."""
    from peft import LoraConfig

    tokenizer = lab.load_tokenizer()
    config = _config(tmp_path, total_episodes=16, learning_rate=1e-2)
    lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 16), ref_model=None, peft_config=lora)
    trainer.train()
    kls = [h["objective/kl"] for h in trainer.state.log_history if "objective/kl" in h]
    assert abs(kls[0]) < 1e-5 and kls[1] > 1e-3  # LoRA starts as the identity (up to rounding), then moves away
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()


def test_push_to_hub_takes_the_old_dataset_name_argument(lab, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append({"repo_id": repo_id, "card": (Path(folder_path) / "README.md").read_text()})

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    tokenizer = lab.load_tokenizer()
    config = _config(tmp_path, total_episodes=8, hub_model_id="someone/old-ppo")
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 8))
    trainer.train()
    trainer.push_to_hub(dataset_name="someone/prompts")
    assert uploads and uploads[-1]["repo_id"] == "someone/old-ppo"
    assert "someone/prompts" in uploads[-1]["card"]


def test_total_episodes_run_that_many_rollouts_with_mini_batches_and_epochs(lab, tmp_path):
    tokenizer = lab.load_tokenizer()
    config = _config(tmp_path, total_episodes=16, per_device_train_batch_size=8, num_mini_batches=2, num_ppo_epochs=2)
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 40))
    scored = []
    score = trainer.compat_reward_model.score
    trainer.compat_reward_model.score = lambda p, c: scored.append(len(p)) or score(p, c)
    trainer.train()
    assert scored == [8, 8]  # two rollouts of the old batch size, 8 prompts each
    assert trainer.state.global_step == 8  # each: 2 mini-batches × 2 epochs optimizer steps
    assert [h["episode"] for h in trainer.state.log_history if "loss" in h] == [8] * 4 + [16] * 4


# ----------------------------------------------------------------------------------------------------------------------
# The old default stop_token=None, and the old metric names


def _old_default_rollout(lab, tmp_path, eos_token_id="lab", pad_token_id="lab"):
    """One rollout of 8 with stop_token=None and missing_eos_penalty=1.0, the policy's generation_config edited;
    returns (trainer, completions the reward model scored, its scores)."""
    tokenizer, policy = lab.load_tokenizer(), lab.load_policy()
    if eos_token_id != "lab":
        policy.generation_config.eos_token_id = eos_token_id
    if pad_token_id != "lab":
        policy.generation_config.pad_token_id = pad_token_id
    config = _config(tmp_path, stop_token=None, total_episodes=8, response_length=16, missing_eos_penalty=1.0)
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 8), model=policy)
    seen = {}
    score = trainer.compat_reward_model.score

    def spy(prompts, completions):
        seen["completions"], seen["scores"] = [list(c) for c in completions], score(prompts, completions)
        return seen["scores"]

    trainer.compat_reward_model.score = spy
    trainer.train()
    return trainer, seen["completions"], seen["scores"]


def _check_old_eos_penalty(trainer, completions, scores, eos):
    """As the old trainer: missing_eos_penalty comes off the reward model's score of every completion with no EOS
    anywhere in it; every token of every completion counts (none masked)."""
    import torch

    rollout = trainer.last_rollout
    no_eos = torch.tensor([float(eos not in c) for c in completions])
    assert 0 < no_eos.sum() < len(completions)  # both kinds occur, so the check below is not vacuous
    assert rollout.scores.tolist() == pytest.approx((torch.tensor(scores) - 1.0 * no_eos).tolist(), abs=1e-5)
    assert rollout.mask.shape == (len(completions), max(len(c) for c in completions))
    assert bool(rollout.mask.all())


def test_old_default_without_a_policy_eos_samples_response_length_tokens_past_the_eos(lab, tmp_path):
    """A policy whose generation_config names no EOS: the old generate() ran every row for response_length tokens,
    and nothing was cut (no stop_token_id), so EOS tokens inside a completion are followed by more sampled tokens."""
    eos = lab.load_tokenizer().eos_token_id
    trainer, completions, scores = _old_default_rollout(lab, tmp_path, eos_token_id=None)
    assert [len(c) for c in completions] == [16] * 8
    assert any(eos in c[:-1] for c in completions)  # an EOS with sampled tokens after it: not cut
    assert any(c[c.index(eos) + 1 :] != [eos] * (15 - c.index(eos)) for c in completions if eos in c[:-1])
    _check_old_eos_penalty(trainer, completions, scores, eos)


def test_old_default_with_an_eos_fill_keeps_the_fill(lab, tmp_path):
    """A policy whose generation_config names an EOS and no pad (pythia's): the old generate() stopped a row at the
    EOS and filled it with the EOS up to the longest row; that fill was not the tokenizer's pad, so it was kept."""
    eos = lab.load_tokenizer().eos_token_id
    trainer, completions, scores = _old_default_rollout(lab, tmp_path, pad_token_id=None)
    width = max(len(c) for c in completions)
    assert all(len(c) == width for c in completions)
    ended = [c for c in completions if eos in c]
    assert any(c.index(eos) < width - 1 for c in ended)  # a completion that goes on after its EOS...
    assert all(c[c.index(eos):] == [eos] * (width - c.index(eos)) for c in ended)  # ...with the EOS fill only
    _check_old_eos_penalty(trainer, completions, scores, eos)


def test_old_default_with_the_tokenizer_pad_as_fill_ends_at_the_eos(lab, tmp_path):
    """The lab policy fills with the tokenizer's pad: the old response ended before that pad, i.e. at the EOS."""
    eos = lab.load_tokenizer().eos_token_id
    trainer, completions, _ = _old_default_rollout(lab, tmp_path)
    assert trainer.compat_stop is None
    assert all(c.index(eos) == len(c) - 1 if eos in c else len(c) == 16 for c in completions)
    assert any(eos in c and len(c) < 16 for c in completions)


def test_old_default_off_the_kv_cache_sampler_says_what_differs_in_one_line(lab, tmp_path, caplog):
    tokenizer, policy = lab.load_tokenizer(), lab.load_policy()
    policy.generation_config.pad_token_id = None
    config = _config(tmp_path, stop_token=None, total_episodes=8, fast_generation=False)
    with caplog.at_level("WARNING", logger="hf_rlhf_ext.compat.trainer"):
        trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 8), model=policy)
    lines = [r.getMessage() for r in caplog.records if "stop_token=None" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "first EOS" in lines[0], lines
    assert trainer.compat_stop is None  # runs, ending completions at the EOS


def test_every_old_metric_is_logged_with_its_old_meaning(lab, tmp_path):
    """lr: the rate the step used (linear decay over 2 steps: 3e-4, then 1.5e-4); val/ratio_var: the variance of the
    micro-batches' mean ratios of that step; policy/entropy_avg: the mean entropy; eps: episodes per second, an int."""
    import statistics
    import time

    tokenizer = lab.load_tokenizer()
    config = _config(tmp_path, total_episodes=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_ppo_epochs=2, learning_rate=3e-4)
    trainer = _trainer(lab, config, _tokenised(lab, tokenizer, 8))
    ratios: list[list[float]] = []
    log_loss_stats = trainer._log_loss_stats

    def spy(mode, mask, log_ratio, *rest):  # each micro-batch's mean ratio, computed here from the raw log-ratios
        if len(ratios) <= trainer.state.global_step:
            ratios.append([])
        ratios[trainer.state.global_step].append(float((log_ratio.detach().exp() * mask).sum() / mask.sum()))
        return log_loss_stats(mode, mask, log_ratio, *rest)

    trainer._log_loss_stats = spy
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and [len(r) for r in ratios] == [2, 2]  # 2 steps (epochs), 2 micro-batches each
    # the rollout's metrics come with the step that collected it, the loss statistics with every step
    assert set(OLD_METRICS) <= set(logs[0]), set(OLD_METRICS) - set(logs[0])
    every_step = {"eps", "lr", "episode", "val/ratio", "val/ratio_var", "policy/entropy_avg", "loss/value_avg"}
    assert every_step <= set(logs[1])
    assert [h["lr"] for h in logs] == pytest.approx([3e-4, 1.5e-4])
    assert [h["val/ratio"] for h in logs] == pytest.approx([statistics.mean(r) for r in ratios])
    assert [h["val/ratio_var"] for h in logs] == pytest.approx([statistics.variance(r) for r in ratios], abs=1e-12)
    assert logs[1]["val/ratio_var"] > 0  # the second epoch's ratios moved off 1
    assert all(h["policy/entropy_avg"] == h["entropy"] > 0 for h in logs)
    assert all(isinstance(h["eps"], int) and h["eps"] >= int(h["episode"] / elapsed) for h in logs)

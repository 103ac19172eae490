"""Builds (once) and caches the lab world: tokenizer -> SFT policy -> preference pairs -> proxy reward model.

1. A word-level tokenizer over the task vocabulary.
2. A tiny GPT-2 (n_embd 128, 2 layers, 2 heads, ~430k parameters) warm-started with ``trl.SFTTrainer`` on a
   mixed-quality synthetic corpus: it learns the format and to copy the customer's item, and stays mediocre.
3. Preference pairs: two samples of the SFT policy per prompt, scored by the gold reward and labelled with
   Bradley-Terry noise, P(a preferred over b) = sigmoid((gold_a - gold_b) / tau).
4. A proxy reward model (``AutoModelForSequenceClassification``, one label) trained with ``trl.RewardTrainer`` on a
   limited number of those pairs: right on-distribution, exploitable off it — the point of the lab.

Models are saved with ``save_pretrained`` (safetensors), prompts and pairs as ``train.jsonl`` / ``test.jsonl`` (so
``datasets.load_dataset(<lab>/prompts)`` and ``trl grpo --dataset_name <lab>/prompts`` read them), under one directory
named after the config's hash, with ``lab_metrics.json``, ``lab_config.json`` and a completion marker. A build is
written to a temporary directory and moved into place only when complete, so an interrupted or concurrent build never
leaves a half lab.

The default lab ships with the package (``prebuilt/``: the same files a build writes, no pickle). ``build_lab()`` copies
it into the cache in well under a second when its fingerprint matches the config; ``force=True`` (``hf-rlhf-ext lab
build --force``) trains one from scratch instead (about 1 minute on a free CPU core, 3 on a busy one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import task
from .config import LAB_VERSION, LabConfig
from .testbed_settings import LAB_DIR_ENV, TESTBED_FILE

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "LAB_COMPLETE"
CONFIG_FILE = "lab_config.json"
METRICS_FILE = "lab_metrics.json"
TOKENIZER_DIR, POLICY_DIR, REWARD_MODEL_DIR = "tokenizer", "policy", "reward_model"
PROMPTS_DIR, PREFERENCES_DIR, LOGS_DIR = "prompts", "preferences", "logs"
SPLITS = ("train", "test")
HOME_ENV = "HF_RLHF_EXT_HOME"
#: The default lab as shipped in the package: a complete lab directory of ``LabConfig()``.
PREBUILT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prebuilt")
#: The build runs single-threaded, whatever OMP_NUM_THREADS says. Float reductions depend on the thread count, so
#: pinning it makes the same seed give the same lab on every machine (one cache key = one lab). The matrices are tiny
#: (width 128): a second thread saved little even on an idle machine, and on a shared one it made SFT 4x slower.
BUILD_THREADS = 1


def lab_home() -> str:
    """``$HF_RLHF_EXT_HOME`` or ``~/.cache/hf_rlhf_ext``."""
    return os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "hf_rlhf_ext")


def default_lab_dir(config: LabConfig | None = None) -> str:
    """Where the lab lives unless a directory is given: ``$HF_RLHF_EXT_LAB_DIR`` when set (one variable points every
    recipe, reward function and ``lab build`` at the same lab), else the cache, ``<lab_home()>/lab/<config hash>``."""
    return os.environ.get(LAB_DIR_ENV) or os.path.join(lab_home(), "lab", (config or LabConfig()).cache_key())


def open_lab(lab_dir: str | None = None) -> "Lab":
    """The lab in ``lab_dir`` (any config, or a testbed), else in ``default_lab_dir()``; the default lab is put there
    first if none is: what the recipes' ``--lab_dir`` and the lab reward functions use. A testbed is only opened,
    never rebuilt as the default lab (``hf-rlhf-ext lab build --policy ...`` builds one)."""
    root = lab_dir or default_lab_dir()
    if is_complete(root) or is_testbed(root):  # an unfinished testbed is an error there, not a place for the lab
        return Lab.from_dir(root)
    return build_lab(LabConfig(), output_dir=root)


# --------------------------------------------------------------------------------------------------------------------
# The Lab handle
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Lab:
    """A built lab on disk. Paths are plain directories loadable with ``from_pretrained`` / ``load_from_disk``.

    Reward-model input format: prompt tokens + reply tokens, with the EOS token present only when the policy emitted
    it (``reward_modeling.score_texts(rm, tok, [prompt + " " + reply + " " + tok.eos_token])`` for a finished reply).
    """

    root: str
    config: LabConfig | None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: A testbed's gold judge (dotted import path); None for the lab, whose gold is ``task.gold_reward``.
    gold_funcs: str | None = None

    @property
    def is_testbed(self) -> bool:
        """A testbed (``config`` is then None: its settings are in ``testbed.json``)."""
        return self.gold_funcs is not None

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.root, TOKENIZER_DIR)

    @property
    def policy_path(self) -> str:
        """The SFT causal LM (tokenizer and generation config saved alongside)."""
        return os.path.join(self.root, POLICY_DIR)

    @property
    def reward_model_path(self) -> str:
        """The proxy RM: ``AutoModelForSequenceClassification`` with ``num_labels=1`` (tokenizer saved alongside)."""
        return os.path.join(self.root, REWARD_MODEL_DIR)

    @property
    def prompts_path(self) -> str:
        return os.path.join(self.root, PROMPTS_DIR)

    @property
    def preferences_path(self) -> str:
        return os.path.join(self.root, PREFERENCES_DIR)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    def load_policy(self, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.policy_path, **kwargs)

    def load_reward_model(self, **kwargs):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.reward_model_path, **kwargs)

    def load_prompts(self):
        """DatasetDict train/test with ``prompt`` (plain text), ``item``, ``issue``; the splits share no prompt."""
        return load_splits(self.prompts_path)

    def load_preferences(self):
        """DatasetDict train/test of pairs: ``prompt``, ``chosen``, ``rejected`` (replies with a leading space, so
        ``prompt + chosen`` is the full text), ``chosen_gold``, ``rejected_gold``, ``chosen_eos``, ``rejected_eos``,
        ``label_flipped`` (the noisy label contradicts gold) and ``chosen_ids`` / ``rejected_ids`` (prompt + reply
        token ids as sampled; ``trl.RewardTrainer`` uses these as they are — drop them to train from strings)."""
        return load_splits(self.preferences_path)

    @classmethod
    def from_dir(cls, root: str) -> "Lab":
        """Opens a complete lab directory (raises ``FileNotFoundError`` if the build there never finished)."""
        if not is_complete(root):
            raise FileNotFoundError(
                f"No complete lab in {root!r} (missing {COMPLETE_MARKER}): build one there with "
                f"`hf-rlhf-ext lab build --lab_dir {root}`."
            )
        with open(os.path.join(root, METRICS_FILE)) as f:
            metrics = json.load(f)
        if is_testbed(root):
            with open(os.path.join(root, TESTBED_FILE)) as f:
                gold_funcs = json.load(f)["gold_funcs"]
            return cls(root=os.path.abspath(root), config=None, metrics=metrics, gold_funcs=gold_funcs)
        with open(os.path.join(root, CONFIG_FILE)) as f:
            saved = json.load(f)
        if saved.get("lab_version") != LAB_VERSION:
            raise ValueError(
                f"The lab in {root!r} was built by lab version {saved.get('lab_version')}, this package reads version "
                f"{LAB_VERSION}: rebuild it with `hf-rlhf-ext lab build --lab_dir {root} --force`."
            )
        config = LabConfig.from_dict(saved["config"])
        return cls(root=os.path.abspath(root), config=config, metrics=metrics)


def is_testbed(root: str) -> bool:
    """True when ``root`` holds a testbed (finished or not): a lab directory around a model of one's own."""
    return os.path.isfile(os.path.join(root, TESTBED_FILE))


def is_complete(root: str, config: LabConfig | None = None) -> bool:
    """True when ``root`` holds a finished build (of ``config``, when given)."""
    marker = os.path.join(root, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return False
    if config is None:
        return True
    try:
        with open(marker) as f:
            return json.load(f).get("cache_key") == config.cache_key()
    except (OSError, ValueError):
        return False


def save_splits(splits: dict[str, Sequence[dict[str, Any]]], directory: str) -> None:
    """One ``<split>.jsonl`` per split (``json.dumps`` per row: floats round-trip exactly)."""
    os.makedirs(directory, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def load_splits(directory: str):
    """The ``DatasetDict`` of ``<split>.jsonl`` files written by ``save_splits`` (read by ``datasets``' JSON loader,
    as ``load_dataset(directory)`` would; its progress bars stay off for these few small files)."""
    import datasets

    files = {s: os.path.join(directory, f"{s}.jsonl") for s in SPLITS}
    files = {s: path for s, path in files.items() if os.path.isfile(path)}
    if not files:
        raise FileNotFoundError(f"No train.jsonl / test.jsonl in {directory!r}: not a lab data directory.")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=files)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------------------------------
# Sampling and labelling
# --------------------------------------------------------------------------------------------------------------------
def sample_replies(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
) -> list[list[int]]:
    """Samples one reply per prompt (pure ancestral sampling: no top-k/top-p, as in RL training) with
    :func:`hf_rlhf_ext.sampling.sample_policy` — the draws of ``generate`` with the same seed.

    Returns each reply's token ids, cut after the first EOS (kept) — a reply without EOS ran into the limit.
    Prompts are batched by token length, so no padding (and no position-id subtlety) is involved.
    """
    import torch

    from ..sampling import cut_at_first_eos, sample_policy

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            tokens, _ = sample_policy(model, input_ids, torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                      temperature=temperature, pad_token_id=pad, eos_token_ids=eos)
            for row, i in zip(cut_at_first_eos(tokens, [eos]), chunk):
                out[i] = row
    return out


def bt_labels(gold_a: Sequence[float], gold_b: Sequence[float], tau: float, seed: int) -> list[bool]:
    """Bradley-Terry noisy labels: True where a is preferred, with P = sigmoid((gold_a - gold_b) / tau).

    tau = 0 gives noiseless labels (ties broken by a fair coin, as for any tau).
    """
    rng = random.Random(seed)
    labels = []
    for a, b in zip(gold_a, gold_b):
        if tau > 0:
            z = (a - b) / tau
            p = 1.0 / (1.0 + math.exp(-z)) if z >= -50 else 0.0
        else:
            p = 1.0 if a > b else (0.0 if a < b else 0.5)
        labels.append(rng.random() < p)
    return labels


def make_pairs(
    model, tokenizer, prompt_rows: Sequence[dict[str, str]], n_pairs: int, config: LabConfig, seed: int
) -> list[dict[str, Any]]:
    """``n_pairs`` pairs: a prompt drawn (with replacement) from ``prompt_rows``, two policy samples, gold scores and
    a Bradley-Terry label."""
    rng = random.Random(seed)
    chosen_rows = [rng.choice(list(prompt_rows)) for _ in range(n_pairs)]
    prompts = [r["prompt"] for r in chosen_rows]
    doubled = prompts + prompts
    samples = sample_replies(
        model, tokenizer, doubled, config.max_new_tokens, config.temperature, seed=seed + 1
    )
    eos = tokenizer.eos_token_id
    texts = [" " + tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    gold = task.gold_reward(doubled, texts, completion_ids=samples, eos_token_id=eos)
    a, b = slice(0, n_pairs), slice(n_pairs, 2 * n_pairs)
    labels = bt_labels(gold[a], gold[b], config.tau, seed=seed + 2)
    rows = []
    for k, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        i, j = (k, n_pairs + k) if labels[k] else (n_pairs + k, k)
        rows.append(
            {
                "prompt": prompt,
                "chosen": texts[i],
                "rejected": texts[j],
                "chosen_gold": gold[i],
                "rejected_gold": gold[j],
                "chosen_eos": bool(samples[i]) and samples[i][-1] == eos,
                "rejected_eos": bool(samples[j]) and samples[j][-1] == eos,
                "label_flipped": gold[i] < gold[j],
                "chosen_ids": prompt_ids + samples[i],
                "rejected_ids": prompt_ids + samples[j],
            }
        )
    return rows


def policy_quality(model, tokenizer, prompts: Sequence[str], config: LabConfig, seed: int) -> dict[str, float]:
    """Mean gold reward, EOS rate and mean length (words) of fresh policy samples on ``prompts``."""
    samples = sample_replies(model, tokenizer, prompts, config.max_new_tokens, config.temperature, seed=seed)
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    gold = task.gold_reward(prompts, texts, completion_ids=samples, eos_token_id=eos)
    item_rate = task.mean(
        float(task.parse_prompt(p)[0] in task.words(t)) for p, t in zip(prompts, texts)
    )
    return {
        "gold_mean": task.mean(gold),
        "eos_rate": task.mean(float(bool(s) and s[-1] == eos) for s in samples),
        "mean_words": task.mean(len(task.words(t)) for t in texts),
        "item_rate": item_rate,
        "n": len(prompts),
    }


# --------------------------------------------------------------------------------------------------------------------
# Build steps
# --------------------------------------------------------------------------------------------------------------------
def _policy_config(config: LabConfig, vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        # no dropout: the SFT corpus is plentiful, and RL ratios must not move from dropout noise alone
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=task.BOS_ID,
        eos_token_id=task.EOS_ID,
        pad_token_id=task.PAD_ID,
    )


def _quiet(trainer) -> None:
    """Drops the console printer (the numbers go to log_history.jsonl and lab_metrics.json instead)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def sft_dataset(tokenizer, rows: Sequence[dict[str, str]]):
    """Pre-tokenised SFT rows: ``input_ids`` = prompt + reply + EOS, ``labels`` = -100 on the prompt (loss on the
    reply only). Tokenising in one fast batch call (rather than TRL's per-example maps) saves ~15 s per build; the
    result is what ``SFTTrainer`` would build from prompt/completion columns."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([r["prompt"] + r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for p, f in zip(prompt_ids, full_ids):
        if f[: len(p)] != p:  # cannot happen with the word-level tokenizer; guards against a changed tokenizer
            raise RuntimeError("The tokenised prompt is not a prefix of the tokenised prompt + completion.")
        input_ids.append(f + [eos])
        labels.append([-100] * len(p) + f[len(p) :] + [eos])
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels, "length": [len(x) for x in input_ids]})


def _train_sft(config: LabConfig, tokenizer, train_rows, work: str, out_dir: str, callbacks=()) -> dict[str, Any]:
    """SFT warm start with ``trl.SFTTrainer`` (loss on the reply tokens only); saves model + tokenizer to out_dir."""
    import torch
    from transformers import GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    from ..results import ResultsCallback

    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(_policy_config(config, len(tokenizer)))
    corpus = sft_dataset(tokenizer, task.sft_corpus(train_rows, config.n_sft, seed=config.seed))
    if max(corpus["length"]) > config.n_positions:
        raise ValueError(f"An SFT example has {max(corpus['length'])} tokens > n_positions={config.n_positions}.")
    args = SFTConfig(
        output_dir=os.path.join(work, "sft_run"),
        num_train_epochs=config.sft_epochs,
        per_device_train_batch_size=config.sft_batch_size,
        learning_rate=config.sft_lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.sft_warmup,  # float in [0, 1) = ratio of total steps: one-cycle-like warm-up then decay
        weight_decay=0.0,
        max_length=config.n_positions,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised, labelled and short enough
        train_sampling_strategy="group_by_length",  # batches of similar length: ~40% less padding compute
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,  # tiny models: CPU is fast enough, and the same seed gives the same lab everywhere
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=corpus,
        processing_class=tokenizer,
        callbacks=[ResultsCallback(os.path.join(work, LOGS_DIR, "sft")), *callbacks],
    )
    _quiet(trainer)
    result = trainer.train()
    model = trainer.model
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "sft_train_loss": float(result.training_loss),
        "sft_steps": int(result.global_step),
        "sft_final_token_accuracy": next(
            (h["mean_token_accuracy"] for h in reversed(trainer.state.log_history) if "mean_token_accuracy" in h),
            None,
        ),
    }


def new_reward_model(config: LabConfig, tokenizer, policy_dir: str | None = None):
    """A fresh lab-sized proxy RM (``num_labels=1``), seeded from the lab config: a small GPT-2 from scratch, or the
    SFT policy's backbone with a new head when ``config.rm_init == "sft"`` (then ``policy_dir`` is needed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(config.seed + 7)
    if config.rm_init == "sft":
        if policy_dir is None:
            raise ValueError("rm_init='sft' needs the SFT policy's directory.")
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    else:
        rm_config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.n_positions,
            n_embd=config.rm_n_embd,
            n_layer=config.rm_n_layer,
            n_head=config.rm_n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=task.BOS_ID,
            eos_token_id=task.EOS_ID,
            pad_token_id=task.PAD_ID,
            num_labels=1,
        )
        model = GPT2ForSequenceClassification(rm_config)
    model.config.pad_token_id = tokenizer.pad_token_id  # the RM scores the last non-pad token
    return model


def _train_rm(
    config: LabConfig, tokenizer, pairs, work: str, policy_dir: str, out_dir: str, callbacks=()
) -> dict[str, Any]:
    """Proxy RM with ``trl.RewardTrainer`` on pre-tokenised pairs; saves model + tokenizer to out_dir."""
    from trl import RewardConfig

    from ..results import ResultsCallback
    from ..reward_modeling import train_reward_model

    model = new_reward_model(config, tokenizer, policy_dir)
    args = RewardConfig(
        output_dir=os.path.join(work, "rm_run"),
        num_train_epochs=config.rm_epochs,
        per_device_train_batch_size=config.rm_batch_size,
        learning_rate=config.rm_lr,
        lr_scheduler_type="cosine",
        center_rewards_coefficient=config.rm_center_coef,
        max_length=config.n_positions,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    train = pairs["train"].select_columns(["chosen_ids", "rejected_ids"])
    trainer = train_reward_model(
        model, tokenizer, train, None, args, quiet=True,
        callbacks=[ResultsCallback(os.path.join(work, LOGS_DIR, "rm")), *callbacks],
    )
    model = trainer.model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"rm_train_pairs": len(trainer.train_dataset), "rm_dropped_pairs": len(train) - len(trainer.train_dataset)}


def _build(config: LabConfig, work: str, progress) -> dict[str, Any]:
    """Runs every step into ``work`` (``progress``: a ``BuildProgress``); returns the metrics."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..reward_modeling import pairwise_report
    from .tokenizer import save_tokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    metrics: dict[str, Any] = {
        "lab_version": LAB_VERSION,
        "cache_key": config.cache_key(),
        "torch_threads": torch.get_num_threads(),
    }
    times: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str):
        start = time.perf_counter()
        with progress.step(name):
            yield
        times[f"{name}_s"] = round(time.perf_counter() - start, 2)

    tok_dir, pol_dir, rm_dir = (os.path.join(work, d) for d in (TOKENIZER_DIR, POLICY_DIR, REWARD_MODEL_DIR))
    with step("setup"):
        save_tokenizer(tok_dir, model_max_length=config.n_positions)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        train_rows, test_rows = task.split_prompts(config.test_fraction, seed=config.seed)
        save_splits({"train": train_rows, "test": test_rows}, os.path.join(work, PROMPTS_DIR))
        metrics.update(vocab_size=len(tokenizer), n_train_prompts=len(train_rows), n_test_prompts=len(test_rows))

    with step("sft"):
        metrics.update(_train_sft(config, tokenizer, train_rows, work, pol_dir, [progress.training_callback("sft")]))

    with step("sft_eval"):
        policy = AutoModelForCausalLM.from_pretrained(pol_dir)
        metrics["policy_params"] = sum(p.numel() for p in policy.parameters())
        eval_prompts = [test_rows[i % len(test_rows)]["prompt"] for i in range(config.n_eval_samples)]
        quality = policy_quality(policy, tokenizer, eval_prompts, config, seed=config.seed + 11)
        metrics.update({f"sft_test_{k}": v for k, v in quality.items()})
        metrics["gold_min"], metrics["gold_max"] = task.gold_range()

    with step("pairs"):
        train_pairs = make_pairs(policy, tokenizer, train_rows, config.n_pairs_train, config, config.seed + 101)
        test_pairs = make_pairs(policy, tokenizer, test_rows, config.n_pairs_test, config, config.seed + 202)
        pairs = DatasetDict({"train": Dataset.from_list(train_pairs), "test": Dataset.from_list(test_pairs)})
        save_splits({"train": train_pairs, "test": test_pairs}, os.path.join(work, PREFERENCES_DIR))
        for split in ("train", "test"):
            d = pairs[split]
            metrics[f"pairs_{split}_n"] = len(d)
            metrics[f"pairs_{split}_flip_rate"] = task.mean(d["label_flipped"])
            ties = [float(a == b) for a, b in zip(d["chosen_gold"], d["rejected_gold"])]
            metrics[f"pairs_{split}_tie_rate"] = task.mean(ties)

    with step("rm"):
        rm_callbacks = [progress.training_callback("rm")]
        metrics.update(_train_rm(config, tokenizer, pairs, work, pol_dir, rm_dir, callbacks=rm_callbacks))

    with step("rm_eval"):
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
        metrics["rm_params"] = sum(p.numel() for p in rm.parameters())
        for split in ("test", "train"):
            report = pairwise_report(rm, tokenizer, pairs[split], gold_margin=config.gold_margin)
            metrics.update({f"rm_{split}_{k}": v for k, v in report.items()})

    times["total_s"] = round(time.perf_counter() - t0, 2)
    times["total_cpu_s"] = round(time.process_time() - c0, 2)
    metrics["build_times"] = times
    return metrics


def build_lab(
    config: LabConfig | None = None, output_dir: str | None = None, force: bool = False, prebuilt: bool = True
) -> Lab:
    """The lab for ``config`` (default ``LabConfig()``): reused when complete, else put in place.

    ``output_dir`` defaults to ``default_lab_dir(config)``. A complete lab of the same config there is reused (well
    under a second). Otherwise the lab shipped with the package is copied there when it was built from ``config``
    (and ``prebuilt``), else the lab is trained from scratch (about a minute on a free CPU core); ``force=True``
    always trains. An ``output_dir`` holding a lab of another config is an error unless ``force=True`` (it is
    replaced then).
    """
    config = config or LabConfig()
    if not isinstance(config, LabConfig):
        raise TypeError(f"build_lab expects a LabConfig, got {type(config).__name__}.")
    root = os.path.abspath(output_dir or default_lab_dir(config))
    if not force and is_complete(root, config):
        return Lab.from_dir(root)
    if not force and is_complete(root):
        raise FileExistsError(
            f"{root!r} holds a lab built from another config (or by another version of this package): rebuild it with "
            f"`hf-rlhf-ext lab build --lab_dir {root} --force` (force=True), or pick another directory."
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_builds(root)
    work = tempfile.mkdtemp(prefix=os.path.basename(root) + ".building-", dir=parent)
    os.chmod(work, 0o755)  # mkdtemp makes it private; the lab is meant to be shared
    try:
        from_package = prebuilt and not force and is_complete(PREBUILT_DIR, config)
        if from_package:
            _copy_prebuilt(work)
        else:
            _train_lab(config, work, root)
        if force or not is_complete(root, config):  # a concurrent build of the same config may have finished first
            _publish(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if from_package:
        print(
            f"hf-rlhf-ext: the default lab shipped with the package is now in {root} "
            "(`hf-rlhf-ext lab build --force` trains it from scratch instead).",
            file=sys.stderr,
        )
    return Lab.from_dir(root)


def _copy_prebuilt(work: str) -> None:
    """Copies the shipped lab into ``work`` as the user's own files: writable (an installed package may be read-only,
    and ensembles are built inside the lab later), whatever the package's permissions."""
    shutil.copytree(PREBUILT_DIR, work, dirs_exist_ok=True, copy_function=shutil.copyfile)
    for directory, _, _ in os.walk(work):
        os.chmod(directory, 0o755)


def _train_lab(config: LabConfig, work: str, root: str) -> None:
    """Trains every artifact into ``work`` and writes the metrics, the config and the completion marker."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from .progress import BuildProgress

    bars_were_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    progress = BuildProgress(config, root, enabled=bars_were_on[1])  # one bar, unless the user turned bars off
    datasets.disable_progress_bars()  # dozens of tiny maps, loads and saves: their bars would drown the build's own
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        metrics = _build(config, work, progress)
    finally:
        progress.close()
        torch.set_num_threads(threads)
        if bars_were_on[0]:
            datasets.enable_progress_bars()
        if bars_were_on[1]:
            hf_logging.enable_progress_bar()
    with open(os.path.join(work, METRICS_FILE), "w") as f:
        json.dump(_jsonable(metrics), f, indent=2, sort_keys=True)
    with open(os.path.join(work, CONFIG_FILE), "w") as f:
        saved = {"lab_version": LAB_VERSION, "cache_key": config.cache_key(), "config": config.to_dict()}
        json.dump(saved, f, indent=2)
    for run in ("sft_run", "rm_run"):  # trainer scratch dirs (no checkpoints are saved)
        shutil.rmtree(os.path.join(work, run), ignore_errors=True)
    with open(os.path.join(work, COMPLETE_MARKER), "w") as f:
        json.dump({"cache_key": config.cache_key(), "lab_version": LAB_VERSION}, f)


STALE_BUILD_S = 3600.0  # a build directory untouched this long belongs to a build that was killed


def _remove_stale_builds(root: str) -> None:
    """Removes leftovers of killed builds of this lab (``<root>.building-*`` / ``.old-*`` untouched for an hour)."""
    parent, name = os.path.dirname(root), os.path.basename(root)
    now = time.time()
    for entry in os.listdir(parent):
        if entry.startswith((name + ".building-", name + ".old-")):
            path = os.path.join(parent, entry)
            try:
                newest = max(
                    [os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
                    + [os.path.getmtime(path)]
                )
            except OSError:
                continue
            if now - newest > STALE_BUILD_S:
                shutil.rmtree(path, ignore_errors=True)


def _jsonable(x: Any) -> Any:
    from ..results import _jsonable as to_json

    return to_json(x)


def _publish(work: str, root: str) -> None:
    """Moves the finished build into place with renames only, so readers never see a half-written lab (an existing
    directory is moved aside first; if a concurrent build published a complete lab meanwhile, that one is kept)."""
    if os.path.exists(root):
        trash = tempfile.mkdtemp(prefix=os.path.basename(root) + ".old-", dir=os.path.dirname(root))
        os.rmdir(trash)
        try:
            os.replace(root, trash)
        except FileNotFoundError:  # removed concurrently
            trash = None
        os.replace(work, root)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.replace(work, root)
        except OSError:  # a concurrent build published first: keep it if complete, else take its place
            if is_complete(root):
                return
            raise

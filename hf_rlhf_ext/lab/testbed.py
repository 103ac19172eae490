"""A testbed around any causal LM: Gao et al.'s synthetic reward over-optimisation set-up (arXiv 2210.10760) for the
user's own policy and gold judge.

    hf-rlhf-ext lab build --policy <path or Hub id> --gold_funcs my_pkg.judges.score --lab_dir runs/testbed

1. The policy's own completions are sampled (pure ancestral sampling, as in RL) on the prompts, rendered as the
   recipes render them: one user turn through the chat template when the tokenizer has one (``as_chat_prompts``).
2. The gold judge (any TRL-style reward function, by dotted path) scores them; pairs of two completions of one prompt
   are labelled with Bradley-Terry noise on the gold gap (``bt_labels``: ``label_noise`` is its temperature, in the
   judge's units; 0 = noiseless).
3. A proxy reward model is trained on those pairs with ``trl.RewardTrainer`` and measured on held-out pairs
   (``pairwise_report``). Default: a small GPT-2 sequence classifier from scratch on the policy's tokenizer (minutes
   on 2 CPU cores, a real proxy: right on-distribution, exploitable off it); ``reward_model_base`` trains a pretrained
   model of one's own instead (the policy itself with ``"policy"``), optionally as LoRA (``reward_model_lora_r``).
4. Everything is written as a lab directory (``policy/``, ``tokenizer/``, ``reward_model/``, ``prompts/``,
   ``preferences/``, ``lab_metrics.json``, ``testbed.json`` naming the judge): ``open_lab(dir)`` opens it, and every
   recipe's ``--lab_dir dir`` trains its policy against its proxy with the judge tracked as the gold at weight 0.

The RM sees pairs exactly as :class:`hf_rlhf_ext.rewards.RewardModelFunction` shows it completions during RL: prompt
ids (chat template with the generation prompt, no special tokens added) + the re-tokenised decoded reply + the EOS
token where the policy emitted it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..rewards import import_reward_func
from ..validation import InputError, check_rewards, prompt_problem, require_existing_path
from .build import (
    COMPLETE_MARKER,
    METRICS_FILE,
    POLICY_DIR,
    PREFERENCES_DIR,
    PROMPTS_DIR,
    REWARD_MODEL_DIR,
    TOKENIZER_DIR,
    Lab,
    _jsonable,
    _publish,
    _remove_stale_builds,
    bt_labels,
    is_complete,
    is_testbed,
    save_splits,
)
from .testbed_settings import DEFAULT_RM_LR, TESTBED_FILE, rm_kind, saved_settings

__all__ = [
    "TESTBED_VERSION", "TestbedConfig", "build_testbed", "load_prompt_rows", "new_testbed_proxy", "testbed_config",
    "train_proxy_like_testbed",
]

TESTBED_VERSION = 1


@dataclass(frozen=True)
class TestbedConfig:
    """Every knob of a testbed build (saved in ``testbed.json``).

    Sources:
        policy: the causal LM (local directory or Hub id); copied into the testbed's ``policy/``.
        gold_funcs: dotted import path of the gold judge, a TRL reward function
            ``judge(prompts, completions, completion_ids=..., **columns) -> list[float]``.
        prompts: a JSONL file with a ``prompt`` column (text or chat messages; other columns reach the judge as
            keyword arguments, as TRL passes data set columns), split into train/test; default: the lab's prompts.
    Preference pairs:
        n_pairs_train, n_pairs_test: pairs of two policy samples of one prompt (test pairs from test prompts only).
        max_new_tokens, temperature: sampling (a reply cut by the limit has no EOS, and the RM sees it so).
        label_noise: Bradley-Terry temperature tau in the judge's units, P(a preferred) = sigmoid((g_a - g_b) / tau).
        gold_margin: the gold gap above which a pair counts as clearly separated (``rm_test_gold_accuracy``).
    Proxy reward model (``trl.RewardTrainer``):
        reward_model_base: None = a GPT-2 of ``rm_n_embd`` / ``rm_n_layer`` / ``rm_n_head`` from scratch on the
            policy's tokenizer; a path or Hub id = that model (its own tokenizer) with a new score head; "policy" =
            the policy's body.
        rm_init_embeddings: the from-scratch RM's token embeddings start as the policy's, projected on their
            ``rm_n_embd`` principal directions (what a token means carries over; the RM stays small).
        reward_model_lora_r: > 0 trains a LoRA adapter of this rank on ``reward_model_base`` (merged when saved).
        rm_dropout: dropout of the from-scratch RM (residual, embedding and attention), kept on while it trains: a
            small RM memorises noisy labels (nearly all training pairs right, held-out ones barely above chance).
        rm_epochs, rm_batch_size, rm_lr (None: ``DEFAULT_RM_LR`` by kind), rm_center_coef.
    seed: the prompt split, pair prompts, sampling, label noise and the RM's initialisation.
    """

    __test__ = False  # not a pytest class

    policy: str
    gold_funcs: str
    prompts: str | None = None
    test_fraction: float = 0.2
    n_pairs_train: int = 512
    n_pairs_test: int = 128
    max_new_tokens: int = 32
    temperature: float = 1.0
    label_noise: float = 0.3
    gold_margin: float = 0.5
    reward_model_base: str | None = None
    reward_model_lora_r: int = 0
    rm_n_embd: int = 64
    rm_n_layer: int = 2
    rm_n_head: int = 2
    rm_init_embeddings: bool = True
    rm_dropout: float = 0.0
    rm_epochs: float = 3.0
    rm_batch_size: int = 16
    rm_lr: float | None = None
    rm_center_coef: float = 0.01
    seed: int = 0
    sample_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("n_pairs_train", "n_pairs_test", "max_new_tokens", "rm_batch_size", "sample_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not (self.label_noise >= 0 and math.isfinite(self.label_noise)):
            raise InputError(f"--label_noise must be a finite number >= 0 (0 = noiseless), got {self.label_noise}.")
        if not 0.0 <= self.rm_dropout < 1.0:
            raise InputError(f"--rm_dropout must be in [0, 1), got {self.rm_dropout}.")
        if self.rm_dropout and self.reward_model_base:
            raise InputError("--rm_dropout is the from-scratch RM's: a pretrained --reward_model_base keeps its own "
                             "dropout settings.")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"--test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.reward_model_lora_r < 0 or (self.reward_model_lora_r and not self.reward_model_base):
            raise InputError("--reward_model_lora_r needs --reward_model_base (LoRA trains a pretrained body) and "
                             f"must be >= 0, got {self.reward_model_lora_r}.")

    @property
    def rm_kind(self) -> str:
        return rm_kind(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def load_prompt_rows(path: str | None, test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) prompt rows: the lab's split when ``path`` is None, else the JSONL file's rows (a ``prompt``
    column, each a non-empty text or chat messages) shuffled with ``seed`` and split, at least one row each side."""
    if path is None:
        from . import task
        from .config import LabConfig

        default = LabConfig()
        return task.split_prompts(default.test_fraction, seed=default.seed)
    if not os.path.isfile(path):
        raise InputError(f"--prompts {path!r}: no such file. Give a JSONL file with a 'prompt' column.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InputError(f"--prompts {path!r}: line {n} is not JSON ({exc}).") from exc
            if not isinstance(row, dict) or "prompt" not in row:
                raise InputError(f"--prompts {path!r}: line {n} has no 'prompt' field; each line must be a JSON "
                                 "object with a 'prompt' (text or a list of chat messages).")
            problem = prompt_problem(row["prompt"])
            if problem is not None:
                raise InputError(f"--prompts {path!r}: line {n}'s 'prompt' {problem}.")
            rows.append(row)
    if len(rows) < 2:
        raise InputError(f"--prompts {path!r} has {len(rows)} prompt(s): a testbed needs at least 2 (train and "
                         "held-out test).")
    rows = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))  # the split depends on the rows, not their order
    random.Random(seed).shuffle(rows)
    n_test = min(len(rows) - 1, max(1, round(len(rows) * test_fraction)))
    return rows[n_test:], rows[:n_test]


def _load_policy(source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_existing_path(source, "--policy", "model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InputError(f"--policy {source!r}: cannot load a causal LM and its tokenizer ({exc}).") from exc
    if tokenizer.eos_token_id is None:
        raise InputError(f"--policy {source!r}: its tokenizer has no EOS token, so no reply could ever end.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------------------------
def rm_sequence(tokenizer, prompt: Any, reply: str, reply_ids: Sequence[int]) -> list[int]:
    """The token ids the reward model is trained on for one reply: what ``RewardModelFunction.sequences`` scores
    during RL (prompt through the chat template, the decoded reply re-tokenised, EOS where the policy emitted it)."""
    from ..sampling import encode_prompts

    ids = encode_prompts(tokenizer, [prompt])[0] + tokenizer(reply, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and len(reply_ids) and int(reply_ids[-1]) == int(eos):
        ids.append(int(eos))
    return ids or [eos]


def sample_two_replies(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int, temperature: float, seed: int,
                       batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """Two replies per prompt (pure ancestral sampling, as in RL), each cut after its first EOS (kept): one prefill
    per prompt, left-padded batches of similar lengths, and a random generator per reply — the draws do not depend
    on the batching. Prompts are rendered as TRL renders them (``encode_prompts``)."""
    import torch

    from ..sampling import cut_at_first_eos, encode_prompts, policy_eos_ids, row_generators, sample_policy

    encoded = encode_prompts(tokenizer, prompts)
    eos_ids = policy_eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in encoded]
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        rows = [2 * i + side for i in chunk for side in (0, 1)]
        tokens, _ = sample_policy(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                  temperature=temperature, pad_token_id=pad, eos_token_ids=eos_ids,
                                  num_return_sequences=2, drop_finished=True,
                                  generators=row_generators(seed, rows, device))
        cut = cut_at_first_eos(tokens, eos_ids)
        for row, i in enumerate(chunk):
            out[i] = (cut[2 * row], cut[2 * row + 1])
    return out


def make_testbed_pairs(model, tokenizer, rm_tokenizer, judge: Callable, judge_name: str, rows: Sequence[dict],
                       n_pairs: int, config: TestbedConfig, seed: int) -> list[dict[str, Any]]:
    """``n_pairs`` pairs: a prompt row drawn with replacement, two policy samples, the judge's scores (called as TRL
    calls a reward function: prompts as the recipes feed them, the other columns as keyword arguments) and a
    Bradley-Terry label."""
    from ..sampling import as_chat_prompts

    rng = random.Random(seed)
    picked = [rows[rng.randrange(len(rows))] for _ in range(n_pairs)]
    prompts = as_chat_prompts(tokenizer, [r["prompt"] for r in picked])
    two = sample_two_replies(model, tokenizer, prompts, config.max_new_tokens, config.temperature, seed=seed + 1,
                             batch_size=config.sample_batch_size)
    prompts, samples = prompts * 2, [ab[0] for ab in two] + [ab[1] for ab in two]  # all a sides, then all b sides
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    chat = [isinstance(p, list) for p in prompts]
    completions = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)]
    columns = {k: [r.get(k) for r in picked] * 2 for k in sorted({k for r in picked for k in r} - {"prompt"})}
    try:
        raw = judge(prompts=prompts, completions=completions, completion_ids=samples, **columns)
    except Exception as exc:
        raise InputError(f"The gold judge {judge_name!r} failed on the policy's completions: "
                         f"{type(exc).__name__}: {exc}") from exc
    gold = check_rewards(raw, len(completions), judge_name)
    if any(g is None for g in gold):
        raise InputError(f"The gold judge {judge_name!r} returned None for some completions: a gold judge must score "
                         "every completion.")
    eos = tokenizer.eos_token_id
    a, b = slice(0, n_pairs), slice(n_pairs, 2 * n_pairs)
    labels = bt_labels(gold[a], gold[b], config.label_noise, seed=seed + 2)
    out = []
    for k, row in enumerate(picked):
        i, j = (k, n_pairs + k) if labels[k] else (n_pairs + k, k)
        out.append({
            "prompt": row["prompt"],
            "chosen": texts[i],
            "rejected": texts[j],
            "chosen_gold": float(gold[i]),
            "rejected_gold": float(gold[j]),
            "chosen_eos": bool(samples[i]) and samples[i][-1] == eos,
            "rejected_eos": bool(samples[j]) and samples[j][-1] == eos,
            "label_flipped": gold[i] < gold[j],
            "chosen_ids": rm_sequence(rm_tokenizer, prompts[i], texts[i], samples[i]),
            "rejected_ids": rm_sequence(rm_tokenizer, prompts[j], texts[j], samples[j]),
        })
    return out


# --------------------------------------------------------------------------------------------------------------------
# Proxy reward model
# --------------------------------------------------------------------------------------------------------------------
def _rm_tokenizer(config: TestbedConfig, policy_dir: str, policy_tokenizer):
    """The RM's tokenizer (the policy's, or ``reward_model_base``'s), with a pad token other than EOS."""
    if config.reward_model_base in (None, "policy"):
        return _pad_apart_from_eos(policy_tokenizer)
    from transformers import AutoTokenizer

    require_existing_path(config.reward_model_base, "--reward_model_base", "model directory")
    try:
        tok = AutoTokenizer.from_pretrained(config.reward_model_base)
    except (OSError, ValueError) as exc:
        raise InputError(f"--reward_model_base {config.reward_model_base!r}: cannot load its tokenizer ({exc}).") \
            from exc
    return _pad_apart_from_eos(tok)


def _pad_apart_from_eos(tokenizer):
    """A copy of ``tokenizer`` padding with a special token other than EOS where it padded with EOS (or not at all).
    A sequence classifier reads its score at the last non-pad token: with pad = EOS it would skip the EOS a finished
    reply ends with, and could not tell a finished reply from one cut off by the length limit."""
    import copy

    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer
    candidates = [tokenizer.unk_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    pad = next((i for i in candidates if i is not None and i != eos), None)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad) if pad is not None else tokenizer.eos_token
    return tokenizer


def projected_embeddings(embeddings, width: int):
    """The policy's token embeddings (V, d) projected on their ``width`` principal directions (zero-padded when
    d < width), scaled to GPT-2's initialisation std 0.02: tokens the policy uses alike start alike in the RM."""
    import torch

    e = embeddings.detach().float()
    e = e - e.mean(dim=0, keepdim=True)
    q = min(width, *e.shape)
    _, _, v = torch.pca_lowrank(e, q=q, center=False, niter=4)
    out = torch.zeros(e.shape[0], width)
    out[:, :q] = e @ v[:, :q]
    return out * (0.02 / out[:, :q].std().clamp_min(1e-12))


def new_proxy_model(config: TestbedConfig, tokenizer, policy_dir: str, max_tokens: int, policy_embeddings=None):
    """The proxy RM before training (``num_labels=1``): a small GPT-2 sized to the tokenizer's vocabulary and the
    pairs' length — its token embeddings initialised from ``policy_embeddings`` (``projected_embeddings``) when
    given and ``rm_init_embeddings`` — or ``reward_model_base`` (``"policy"``: the policy) with a fresh score
    head."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(config.seed + 7)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.reward_model_base is None:
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=len(tokenizer), n_positions=max(128, 64 * math.ceil(max_tokens / 64)),
            n_embd=config.rm_n_embd, n_layer=config.rm_n_layer, n_head=config.rm_n_head,
            resid_pdrop=config.rm_dropout, embd_pdrop=config.rm_dropout, attn_pdrop=config.rm_dropout, num_labels=1,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        ))
        if config.rm_init_embeddings and policy_embeddings is not None:
            rows = min(len(tokenizer), policy_embeddings.shape[0])
            with torch.no_grad():
                wte = model.transformer.wte.weight
                wte[:rows] = projected_embeddings(policy_embeddings[:rows], config.rm_n_embd).to(wte.dtype)
    else:
        base = policy_dir if config.reward_model_base == "policy" else config.reward_model_base
        try:
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        except (OSError, ValueError) as exc:
            raise InputError(f"--reward_model_base {config.reward_model_base!r}: cannot load it as a sequence "
                             f"classifier ({exc}).") from exc
    model.config.pad_token_id = pad  # the RM scores the last non-pad token
    return model


def _train_proxy(config: TestbedConfig, tokenizer, pairs, policy_dir: str, work: str, out_dir: str,
                 policy_embeddings=None) -> dict[str, Any]:
    from trl import RewardConfig

    from ..reward_modeling import train_reward_model

    longest = max(len(x) for side in ("chosen_ids", "rejected_ids") for x in pairs[side])
    model = new_proxy_model(config, tokenizer, policy_dir, longest, policy_embeddings)
    peft_config = None
    if config.rm_kind == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", r=config.reward_model_lora_r,
                                 lora_alpha=2 * config.reward_model_lora_r, target_modules="all-linear")
    args = RewardConfig(
        output_dir=os.path.join(work, "rm_run"), num_train_epochs=config.rm_epochs,
        per_device_train_batch_size=config.rm_batch_size, learning_rate=config.rm_lr or DEFAULT_RM_LR[config.rm_kind],
        lr_scheduler_type="cosine", center_rewards_coefficient=config.rm_center_coef, max_length=None,
        logging_steps=10, save_strategy="no", report_to="none", bf16=False, seed=config.seed, data_seed=config.seed,
        disable_tqdm=True, dataloader_num_workers=0, disable_dropout=not config.rm_dropout,
    )
    trainer = train_reward_model(model, tokenizer, pairs.select_columns(["chosen_ids", "rejected_ids"]), None, args,
                                 quiet=True, peft_config=peft_config)
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()  # a plain sequence classifier: what RewardModelFunction loads
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"rm_kind": config.rm_kind, "rm_train_pairs": len(trainer.train_dataset),
            "rm_final_train_loss": history[-1] if history else None,
            "rm_params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------------------------------------------------
# A built testbed: its settings, and proxies trained as its own was
# --------------------------------------------------------------------------------------------------------------------
def testbed_config(root: str) -> TestbedConfig:
    """The settings a testbed was built with (``testbed.json``)."""
    return TestbedConfig(**saved_settings(root))


def _proxy_inputs(root: str, seed: int | None) -> tuple[TestbedConfig, Any, Any]:
    """(settings with ``seed``, the proxy's tokenizer, the policy's token embeddings where the proxy starts from
    them): what a proxy of this testbed is built from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = testbed_config(root)
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, REWARD_MODEL_DIR))
    embeddings = None
    if config.rm_kind == "scratch" and config.rm_init_embeddings:
        policy = AutoModelForCausalLM.from_pretrained(os.path.join(root, POLICY_DIR))
        embeddings = policy.get_input_embeddings().weight.detach().clone()
    return config, tokenizer, embeddings


def new_testbed_proxy(root: str, max_tokens: int, seed: int | None = None):
    """(untrained proxy RM, its tokenizer) as the testbed's build made its own (``new_proxy_model``), sized for pairs
    of ``max_tokens`` tokens: what ``recipes/reward.py --lab_dir <testbed>`` trains."""
    config, tokenizer, embeddings = _proxy_inputs(root, seed)
    return new_proxy_model(config, tokenizer, os.path.join(root, POLICY_DIR), max_tokens, embeddings), tokenizer


def train_proxy_like_testbed(root: str, pairs, work: str, out_dir: str, seed: int) -> dict[str, Any]:
    """Trains a proxy on ``pairs`` (``chosen_ids`` / ``rejected_ids``) exactly as the testbed trained its own but
    with ``seed`` (an ensemble member), into ``out_dir``; its tokenizer is saved beside it."""
    config, tokenizer, embeddings = _proxy_inputs(root, seed)
    return _train_proxy(config, tokenizer, pairs, os.path.join(root, POLICY_DIR), work, out_dir, embeddings)


# --------------------------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------------------------
def _check_lab_dir(root: str, config: TestbedConfig, force: bool) -> bool:
    """True when ``root`` already holds this very testbed (reused). Refuses a directory that is not a testbed."""
    if not os.path.exists(root):
        parent = os.path.dirname(root)
        if not os.path.isdir(parent):
            raise InputError(f"--lab_dir {root!r}: its folder {parent!r} does not exist.")
        return False
    if not os.path.isdir(root):
        raise InputError(f"--lab_dir {root!r} is a file, not a directory.")
    if not os.listdir(root):
        return False
    if not is_testbed(root):
        raise InputError(f"--lab_dir {root!r} exists and is not a testbed (no {TESTBED_FILE}): it is left alone. "
                         "Give a new or empty directory.")
    if force:
        return False
    with open(os.path.join(root, TESTBED_FILE)) as f:
        saved = json.load(f)
    if saved.get("config") == config.to_dict() and is_complete(root):
        return True
    raise InputError(f"--lab_dir {root!r} holds a testbed of other settings: add --force to rebuild it there, or "
                     "give another directory.")


def build_testbed(config: TestbedConfig, lab_dir: str, force: bool = False) -> Lab:
    """Builds the testbed of ``config`` into ``lab_dir`` (reused when it already holds this testbed; ``force``
    rebuilds a testbed there) and returns it opened as a lab. Written to a temporary directory and moved into place
    when complete, like the lab."""
    if not lab_dir:
        raise InputError("A testbed needs --lab_dir (the directory to write it to).")
    root = os.path.abspath(os.path.expanduser(lab_dir))
    judge = import_reward_func(config.gold_funcs, flag="--gold_funcs")  # fail fast: before any model is loaded
    if _check_lab_dir(root, config, force):
        return Lab.from_dir(root)
    train_rows, test_rows = load_prompt_rows(config.prompts, config.test_fraction, config.seed)
    model, tokenizer = _load_policy(config.policy)
    parent = os.path.dirname(root)
    _remove_stale_builds(root)
    work = tempfile.mkdtemp(prefix=os.path.basename(root) + ".building-", dir=parent)
    os.chmod(work, 0o755)
    try:
        with _quiet_progress_bars():
            metrics = _build(config, judge, model, tokenizer, train_rows, test_rows, work)
        with open(os.path.join(work, METRICS_FILE), "w") as f:
            json.dump(_jsonable(metrics), f, indent=2, sort_keys=True)
        with open(os.path.join(work, TESTBED_FILE), "w") as f:
            json.dump({"testbed_version": TESTBED_VERSION, "gold_funcs": config.gold_funcs,
                       "gold_name": metrics["gold_name"], "config": config.to_dict()}, f, indent=2)
        shutil.rmtree(os.path.join(work, "rm_run"), ignore_errors=True)
        with open(os.path.join(work, COMPLETE_MARKER), "w") as f:
            json.dump({"testbed_version": TESTBED_VERSION}, f)
        _publish(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Lab.from_dir(root)


@contextlib.contextmanager
def _quiet_progress_bars():
    """No per-file bars of datasets / transformers during the build (the lab's build does the same)."""
    import datasets
    from transformers.utils import logging as hf_logging

    were_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on[0]:
            datasets.enable_progress_bars()
        if were_on[1]:
            hf_logging.enable_progress_bar()


def _build(config: TestbedConfig, judge: Callable, model, tokenizer, train_rows, test_rows, work: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from ..reward_modeling import pairwise_report

    times: dict[str, float] = {}
    t0 = time.perf_counter()

    @contextlib.contextmanager
    def step(name: str):
        start = time.perf_counter()
        yield
        times[f"{name}_s"] = round(time.perf_counter() - start, 2)

    judge_name = getattr(judge, "__name__", None) or type(judge).__name__
    pol_dir = os.path.join(work, POLICY_DIR)
    metrics: dict[str, Any] = {
        "testbed_version": TESTBED_VERSION, "policy_source": config.policy, "gold_funcs": config.gold_funcs,
        "gold_name": judge_name, "gold_metric": f"rewards/{judge_name}/mean", "prompts_source": config.prompts or "lab",
        "label_noise": config.label_noise, "max_new_tokens": config.max_new_tokens, "torch_threads":
        torch.get_num_threads(), "n_train_prompts": len(train_rows), "n_test_prompts": len(test_rows),
        "policy_params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    with step("setup"):
        model.save_pretrained(pol_dir)
        tokenizer.save_pretrained(pol_dir)
        tokenizer.save_pretrained(os.path.join(work, TOKENIZER_DIR))
        save_splits({"train": train_rows, "test": test_rows}, os.path.join(work, PROMPTS_DIR))
        rm_tokenizer = _rm_tokenizer(config, pol_dir, tokenizer)
    with step("pairs"):
        pairs = {}
        for split, rows, n, offset in (("train", train_rows, config.n_pairs_train, 101),
                                       ("test", test_rows, config.n_pairs_test, 202)):
            pairs[split] = make_testbed_pairs(model, tokenizer, rm_tokenizer, judge, judge_name, rows, n, config,
                                              seed=config.seed + offset)
        save_splits(pairs, os.path.join(work, PREFERENCES_DIR))
        for split, rows in pairs.items():
            gold = [r[side] for r in rows for side in ("chosen_gold", "rejected_gold")]
            mean = sum(gold) / len(gold)
            metrics[f"pairs_{split}_n"] = len(rows)
            metrics[f"pairs_{split}_flip_rate"] = sum(r["label_flipped"] for r in rows) / len(rows)
            metrics[f"pairs_{split}_tie_rate"] = sum(r["chosen_gold"] == r["rejected_gold"] for r in rows) / len(rows)
            metrics[f"policy_{split}_gold_mean"] = mean
            metrics[f"policy_{split}_gold_std"] = math.sqrt(sum((g - mean) ** 2 for g in gold) / len(gold))
            metrics[f"policy_{split}_eos_rate"] = sum(r[s] for r in rows for s in ("chosen_eos", "rejected_eos")) / (
                2 * len(rows))
    embeddings = model.get_input_embeddings().weight.detach().clone()
    del model
    with step("rm"):
        rm_dir = os.path.join(work, REWARD_MODEL_DIR)
        data = {s: Dataset.from_list(rows) for s, rows in pairs.items()}
        metrics.update(_train_proxy(config, rm_tokenizer, data["train"], pol_dir, work, rm_dir, embeddings))
    with step("rm_eval"):
        rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
        for split in ("test", "train"):
            report = pairwise_report(rm, rm_tokenizer, data[split], gold_margin=config.gold_margin)
            metrics.update({f"rm_{split}_{k}": v for k, v in report.items()})
    times["total_s"] = round(time.perf_counter() - t0, 2)
    metrics["build_times"] = times
    return metrics

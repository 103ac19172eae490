"""A miniature RLHF loop in one file: teach a policy to *end politely*, in plain PyTorch + transformers (no trainer).

Every step of the algorithm is visible, in order, in ``train_step``:

    1. pick a batch of prompts
    2. sample one reply per prompt from the policy, keeping log π_old(token)   (hf_rlhf_ext.sampling)
    3. score each reply with a programmatic reward: 1 if it ends with a polite closing, else 0
    4. log-probs of the same tokens under the frozen reference, and the KL of the batch to it
    5. advantages: reward minus a baseline
    6. a few PPO-clip epochs on the batch, with a per-token KL penalty to the reference   (hf_rlhf_ext.objectives)
    7. record the step

    python recipes/mini_loop.py                                        # the offline lab, ~1 min on 2 CPU cores
    python recipes/mini_loop.py --steps 20 --kl_coef 0.2 --output_dir runs/mini-loop-kl02
    python recipes/mini_loop.py --model_name_or_path path/to/causal-lm --dataset_name prompts.jsonl --use_peft
    python recipes/mini_loop.py --lab_dir runs/testbed                 # a testbed's policy and prompts

Writes <output_dir>/metrics.json (per-step curve, held-out before/after), rollouts.jsonl (every sampled reply),
mini_loop.png (reward, polite share and KL against step) and policy/ (the trained policy, or its LoRA adapter).
"""

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_rlhf_ext.objectives import clipped_surrogate, kl_k1, kl_k3, masked_mean, whiten
from hf_rlhf_ext.results import write_metrics
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import outputs_line, recipe_command
from hf_rlhf_ext.sampling import (
    as_chat_prompts,
    completion_mask,
    cut_at_first_eos,
    per_token_logps,
    sample_with_kv_cache,
)

#: A reply "ends politely" when its last words are one of these phrases (case and punctuation ignored).
POLITE_CLOSINGS: tuple[str, ...] = ("thank you", "have a nice day", "thank you for your patience")
BASELINES: tuple[str, ...] = ("batch_mean", "whiten", "none")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MiniLoopArguments:
    """Flags of the mini loop (``--config file.yaml`` works too). The defaults are tuned on the offline lab."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Causal LM (default: the lab policy)."})
    lab_dir: str | None = field(
        default=None, metadata={"help": "Lab directory, or a testbed's (default: the cached default lab)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Local file or folder with a 'prompt' column (default: the lab prompts)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split (else held out of train)."})
    output_dir: str = field(default="runs/mini-loop", metadata={"help": "Where metrics, plot and policy go."})
    steps: int = field(default=40, metadata={"help": "RL steps (one sampled batch each)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts (= replies) per step."})
    max_new_tokens: int = field(default=24, metadata={"help": "Longest reply; a reply cut here did not end."})
    temperature: float = field(default=1.0, metadata={"help": (
        "Sampling temperature T. The policy trained and measured is π at T (logits / T, as TRL scores it), and the "
        "KL is that of the tempered policy to the tempered reference. Below 1 on a small pretrained model whose "
        "temperature-1 replies are noise.")})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    kl_coef: float = field(default=0.05, metadata={"help": "β of the per-token KL penalty (k3) to the reference."})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range ε."})
    ppo_epochs: int = field(default=2, metadata={"help": "Gradient steps on each sampled batch."})
    baseline: str = field(default="batch_mean", metadata={"help": f"Advantage baseline: one of {BASELINES}."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, sampling, and the held-out evaluation."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter; reference = adapter disabled."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    num_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts sampled before and after."})
    num_samples: int = field(default=4, metadata={"help": "Held-out samples shown before/after."})
    # the command line the script was parsed from (set by the parser; shown in the model card)
    cli_args: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_args(self)


def check_args(args: MiniLoopArguments) -> None:
    """Refuses values that would make the loop meaningless (better a clear error now than a NaN later)."""
    if args.steps < 1:
        raise ValueError(f"steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {args.temperature}")
    if not args.lr > 0:
        raise ValueError(f"lr must be > 0, got {args.lr}")
    if args.kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {args.kl_coef}")
    if not args.clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {args.clip_eps}")
    if args.ppo_epochs < 1:
        raise ValueError(f"ppo_epochs must be >= 1, got {args.ppo_epochs}")
    if args.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {args.baseline!r}")
    if args.num_eval_prompts < 0:
        raise ValueError(f"num_eval_prompts must be >= 0, got {args.num_eval_prompts}")


def make_parser():
    from hf_rlhf_ext.run.parsing import RecipeParser

    return RecipeParser((MiniLoopArguments,))  # remembers the command line for the model card


# ---------------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------------
def ends_politely(text: str) -> bool:
    """Whether the last words of ``text`` are one of POLITE_CLOSINGS (case and punctuation ignored)."""
    words = re.findall(r"[a-z']+", text.lower())
    return any(words[-len(p.split()) :] == p.split() for p in POLITE_CLOSINGS)


def polite_reward(completions: Sequence[str], finished: Sequence[bool] | None = None) -> list[float]:
    """1.0 for a reply that ends with a polite closing, else 0.0. With ``finished``, a reply that ran into the length
    limit (no EOS) has not ended, so it scores 0 however its last words read."""
    finished = [True] * len(completions) if finished is None else list(finished)
    if len(finished) != len(completions):
        raise ValueError(f"{len(finished)} finished flags for {len(completions)} completions")
    return [float(done and ends_politely(text)) for text, done in zip(completions, finished)]


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------------
def open_lab(lab_dir: str | None = None):
    """The lab in ``lab_dir`` (a testbed too), else the default lab, built once and then read from the cache."""
    from hf_rlhf_ext.lab import open_lab as open_lab_dir

    return open_lab_dir(lab_dir)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"  # the sampler continues prompts on the right: pad them on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(args: MiniLoopArguments, path: str, device: str = "cpu"):
    """(policy, reference). The reference is a frozen copy, or ``None`` with LoRA: the adapter disabled *is* the
    initial policy, so no second copy of the weights is needed."""
    policy = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).to(device)
    policy.eval()  # no dropout: sampling, old, new and reference log-probs must come from the same function
    if args.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        return get_peft_model(policy, lora), None
    reference = copy.deepcopy(policy).requires_grad_(False)
    return policy, reference


def _load_data(name: str):
    """A local data file (json/jsonl/csv/parquet: its rows become the train split) or folder, as a DatasetDict."""
    from datasets import load_dataset

    from hf_rlhf_ext.data import load_dataset_dict

    ext = os.path.splitext(name)[1].lstrip(".").lower()
    if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet"):
        return load_dataset("json" if ext == "jsonl" else ext, data_files={"train": name})
    return load_dataset_dict(name)


def load_prompts(args: MiniLoopArguments, lab=None) -> tuple[list, list]:
    """(train prompts, held-out prompts). Without a test split, ``num_eval_prompts`` (at most a tenth) of the train
    prompts are held out, so the evaluation never sees a training prompt."""
    from hf_rlhf_ext.validation import require_prompt_column

    data = lab.load_prompts() if args.dataset_name is None else _load_data(args.dataset_name)
    train_split = "train" if args.dataset_name is None else args.dataset_train_split
    test_split = "test" if args.dataset_name is None else args.dataset_test_split
    if train_split not in data:
        raise ValueError(f"{args.dataset_name} has no split {train_split!r} (it has {list(data)})")
    train, test = data[train_split], data.get(test_split)
    require_prompt_column(train)
    if test is None and args.num_eval_prompts > 0 and len(train) > 1:
        split = train.train_test_split(test_size=min(args.num_eval_prompts, max(1, len(train) // 10)), seed=args.seed)
        train, test = split["train"], split["test"]
    if test is not None:
        require_prompt_column(test)
    test_prompts = list(test["prompt"])[: args.num_eval_prompts] if test is not None else []
    return list(train["prompt"]), test_prompts


def prompt_texts(prompts: Sequence[Any], tokenizer) -> list[str]:
    """Plain-text prompts as they are; conversations through the tokenizer's chat template."""
    return [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts]


def eos_ids_of(policy, tokenizer) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation-config EOS id(s)."""
    ids = getattr(policy.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------------------------
# The steps of the loop
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(policy, tokenizer, prompts: Sequence[Any], max_new_tokens: int, eos_ids: list[int],
            temperature: float = 1.0) -> dict[str, Any]:
    """Samples one reply per prompt from π at ``temperature`` (the replies are draws from the policy being trained,
    so their KL is a true estimate); the batch carries T so every later log-prob is taken at it."""
    device = next(policy.parameters()).device
    enc = tokenizer(prompt_texts(prompts, tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    tokens, logps = sample_with_kv_cache(policy, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                         temperature=temperature, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_ids=eos_ids, drop_finished=True)
    # a reply is every token up to and including its first EOS; what follows is padding
    mask = completion_mask(tokens, eos_ids)
    ids = cut_at_first_eos(tokens, eos_ids)
    return {
        "prompts": list(prompts), "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": tokens, "completion_mask": mask, "logps": logps * mask, "ids": ids,
        "texts": tokenizer.batch_decode(ids, skip_special_tokens=True),
        "finished": [bool(r) and r[-1] in eos_ids for r in ids], "temperature": temperature,
    }


def reference_logps(policy, reference, batch: dict[str, Any]) -> torch.Tensor:
    """log π_ref of the sampled tokens: the frozen copy, or the policy with its LoRA adapter switched off."""
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"],
            batch.get("temperature", 1.0))
    with torch.no_grad():
        if reference is None:
            with policy.disable_adapter():
                return per_token_logps(policy, *args)
        return per_token_logps(reference, *args)


def advantages(rewards: torch.Tensor, baseline: str) -> torch.Tensor:
    """A = r − b. A baseline that does not depend on the reply leaves the gradient unbiased and cuts its variance:
    with the batch mean, a reply is pushed up only if it beat the average reply."""
    if baseline == "none":
        return rewards
    if baseline == "whiten" and rewards.numel() > 1:
        return whiten(rewards)  # (r − mean) / std: the same step size whatever the reward scale
    return rewards - rewards.mean()


def ppo_update(policy, optimizer, batch, ref_logps, adv, args: MiniLoopArguments) -> dict[str, float]:
    """``ppo_epochs`` gradient steps on one batch: maximise the clipped surrogate minus β·k3 per token. Returns the
    last epoch's loss and clip fraction (share of tokens whose ratio was outside 1 ± ε before that epoch's step)."""
    mask = batch["completion_mask"]
    inputs = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask, batch.get("temperature", 1.0))
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(args.ppo_epochs):
        new_logps = per_token_logps(policy, *inputs)
        ratio = torch.exp(new_logps - batch["logps"])  # π_new / π_old per token; 1 in the first epoch
        # the clip removes the incentive to move the ratio beyond 1 ± ε on one batch: no over-reaching on noise
        surrogate = clipped_surrogate(ratio, adv[:, None], epsilon=args.clip_eps)
        # k3 ≥ 0 per token, unbiased for KL(π‖π_ref): the leash that keeps the policy near the reference
        kl = kl_k3(new_logps, ref_logps)
        loss = masked_mean(-surrogate + args.kl_coef * kl, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # one bad batch cannot throw the policy far
        optimizer.step()
    clipped = ((ratio - 1).abs() > args.clip_eps).float()
    return {"loss": loss.item(), "clip_frac": masked_mean(clipped, mask).item()}


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean over replies of the KL summed over each reply's tokens (nats per sequence), k1 and k3 estimators."""
    k1 = (kl_k1(logps, ref_logps) * mask).sum(1)
    k3 = (kl_k3(logps, ref_logps) * mask).sum(1)
    return {"kl_k1": k1.mean().item(), "kl_k3": k3.mean().item()}


def gold_mean(batch: dict[str, Any], eos_ids: list[int]) -> float:
    """The lab's gold reward (item, issue keyword, politeness, brevity, EOS): did "polite" come at a price?"""
    from hf_rlhf_ext.lab.task import gold_reward

    values = gold_reward(prompts=batch["prompts"], completions=batch["texts"], completion_ids=batch["ids"],
                         eos_token_id=eos_ids)
    return sum(values) / len(values)


def train_step(step: int, state: dict[str, Any], args: MiniLoopArguments) -> tuple[dict[str, Any], list[dict]]:
    """One step of the loop, every stage in order. ``state``: policy, reference, optimizer, tokenizer, prompts,
    generator, eos_ids, on_lab. Returns (the step's record, the sampled replies)."""
    policy, tokenizer, eos_ids = state["policy"], state["tokenizer"], state["eos_ids"]
    # 1. prompts: a fresh random batch each step (with replacement: any batch size works on any data set)
    idx = torch.randint(len(state["prompts"]), (args.batch_size,), generator=state["generator"]).tolist()
    prompts = [state["prompts"][i] for i in idx]
    # 2. generate: the replies and log π_old, from the very logits they were sampled from
    batch = rollout(policy, tokenizer, prompts, args.max_new_tokens, eos_ids, args.temperature)
    # 3. score: the programmatic reward, one number per reply
    rewards = torch.tensor(polite_reward(batch["texts"], batch["finished"]), device=batch["logps"].device)
    # 4. reference: log π_ref of the same tokens, for the KL penalty and the KL we report
    ref_logps = reference_logps(policy, state["reference"], batch)
    kl = sequence_kl(batch["logps"], ref_logps, batch["completion_mask"])
    # 5. advantages: which replies were better than expected
    adv = advantages(rewards, args.baseline)
    # 6. update: PPO-clip with the per-token KL penalty
    stats = ppo_update(policy, state["optimizer"], batch, ref_logps, adv, args)
    # 7. record
    polite = [ends_politely(t) and f for t, f in zip(batch["texts"], batch["finished"])]
    record = {"step": step, "reward": rewards.mean().item(), "polite_share": sum(polite) / len(polite), **kl,
              **stats, "eos_rate": sum(batch["finished"]) / len(polite),
              "mean_length": batch["completion_mask"].sum(1).float().mean().item()}
    if state["on_lab"]:
        record["gold_reward"] = gold_mean(batch, eos_ids)
    return record, _rows(batch, rewards.tolist(), phase="train", step=step)


def _rows(batch: dict[str, Any], rewards: list[float], phase: str, step: int) -> list[dict]:
    return [{"phase": phase, "step": step, "prompt": p, "completion": t, "finished": f, "reward": r}
            for p, t, f, r in zip(batch["prompts"], batch["texts"], batch["finished"], rewards)]


# ---------------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------------------------
def evaluate(state: dict[str, Any], prompts: list, args: MiniLoopArguments, phase: str) -> tuple[dict, list[dict]]:
    """One reply per held-out prompt, sampled with a fixed seed (the same draws before and after for an unchanged
    policy): polite share, gold reward on the lab, and the sequence KL to the reference."""
    if not prompts:
        return {}, []
    policy, rows, kls, golds = state["policy"], [], [], []
    with torch.random.fork_rng(devices=[]):  # the training stream of random numbers is left untouched
        torch.manual_seed(args.seed)
        for start in range(0, len(prompts), args.batch_size):
            batch = rollout(policy, state["tokenizer"], prompts[start : start + args.batch_size],
                            args.max_new_tokens, state["eos_ids"], args.temperature)
            ref_logps = reference_logps(policy, state["reference"], batch)
            kl = sequence_kl(batch["logps"], ref_logps, batch["completion_mask"])
            kls.append((kl, len(batch["texts"])))
            if state["on_lab"]:
                golds.append((gold_mean(batch, state["eos_ids"]), len(batch["texts"])))
            rows += _rows(batch, polite_reward(batch["texts"], batch["finished"]), phase=phase, step=0)
    n = len(rows)
    result = {"polite_share": sum(r["reward"] for r in rows) / n, "eos_rate": sum(r["finished"] for r in rows) / n,
              "kl_k1": sum(k["kl_k1"] * m for k, m in kls) / n, "kl_k3": sum(k["kl_k3"] * m for k, m in kls) / n,
              "num_prompts": n}
    if golds:
        result["gold_reward"] = sum(g * m for g, m in golds) / n
    return result, rows


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
def plot_curve(curve: list[dict], path: str) -> str:
    """Reward, polite share (and gold on the lab) and sequence KL against step (matplotlib's Agg canvas: no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in curve]
    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(steps, [r["reward"] for r in curve], label="mean reward")
    left.plot(steps, [r["polite_share"] for r in curve], "--", label="polite share")
    if curve and "gold_reward" in curve[0]:
        left.plot(steps, [r["gold_reward"] for r in curve], label="gold reward (lab)")
    left.set(xlabel="step", title="reward on the sampled batch")
    left.legend()
    right.plot(steps, [r["kl_k1"] for r in curve], label="k1")
    right.plot(steps, [r["kl_k3"] for r in curve], label="k3")
    right.set(xlabel="step", ylabel="nats per reply", title="KL to the reference")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def summary_text(metrics: dict[str, Any]) -> str:
    b, a = metrics.get("eval_before", {}), metrics.get("eval_after", {})
    lines = [f"\nmini loop: {metrics['steps']} steps in {metrics['seconds']:.1f} s"]
    if a:
        lines.append(f"  held-out polite share {b['polite_share']:.3f} -> {a['polite_share']:.3f} "
                     f"({a['num_prompts']} prompts)")
        if "gold_reward" in a:
            lines.append(f"  held-out gold reward  {b['gold_reward']:+.3f} -> {a['gold_reward']:+.3f}")
        lines.append(f"  KL to the reference   {a['kl_k1']:.3f} (k1), {a['kl_k3']:.3f} (k3) nats per reply")
    for s_b, s_a in zip(metrics.get("samples_before", []), metrics.get("samples_after", [])):
        lines += [f"  prompt: {s_b['prompt']}", f"    before: {s_b['completion']}", f"    after:  {s_a['completion']}"]
    lines += [f"  {name}: {path}" for name, path in metrics["files"].items()]
    return "\n".join(lines)


def _step_line(r: dict[str, Any]) -> str:
    gold = f" gold {r['gold_reward']:+.3f}" if "gold_reward" in r else ""
    return (f"step {r['step']:>4}  reward {r['reward']:.3f}  polite {r['polite_share']:.3f}  "
            f"kl k1 {r['kl_k1']:.3f} k3 {r['kl_k3']:.3f}{gold}")


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def setup(args: MiniLoopArguments) -> tuple[dict[str, Any], list]:
    """Everything the loop needs, as one explicit state dict, plus the held-out prompts."""
    lab = open_lab(args.lab_dir) if args.model_name_or_path is None or args.dataset_name is None else None
    path = args.model_name_or_path or lab.policy_path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(path)
    policy, reference = load_policy(args, path, device)
    # a chat model gets each plain prompt as one user turn through its template (the lab's prompts already are)
    train_prompts, test_prompts = (as_chat_prompts(tokenizer, p) for p in load_prompts(args, lab))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    state = {"policy": policy, "reference": reference, "optimizer": optimizer, "tokenizer": tokenizer,
             "prompts": train_prompts, "generator": torch.Generator().manual_seed(args.seed),
             "eos_ids": eos_ids_of(policy, tokenizer), "on_lab": on_lab(args, lab)}
    return state, test_prompts


def on_lab(args: MiniLoopArguments, lab=None) -> bool:
    """Whether this is the lab's own run (its policy and its prompts): only then does the lab's gold reward, written
    for the lab policy's replies, mean anything (a testbed's policy and prompts are not the lab's)."""
    return args.model_name_or_path is None and args.dataset_name is None and not getattr(lab, "is_testbed", False)


def train(state: dict[str, Any], args: MiniLoopArguments) -> tuple[list[dict], list[dict]]:
    """The loop: ``args.steps`` calls of ``train_step``. Returns (per-step records, every sampled reply)."""
    curve, rows = [], []
    bar = tqdm(range(1, args.steps + 1), desc="mini loop", dynamic_ncols=True)
    for step in bar:
        record, step_rows = train_step(step, state, args)
        curve.append(record)
        rows += step_rows
        bar.set_postfix(polite=f"{record['polite_share']:.2f}", kl=f"{record['kl_k1']:.2f}")
        tqdm.write(_step_line(record))
    return curve, rows


def main(args: MiniLoopArguments) -> dict[str, Any]:
    check_args(args)
    start = time.time()
    set_seed(args.seed)
    state, test_prompts = setup(args)
    before, rows_before = evaluate(state, test_prompts, args, phase="before")
    train_start = time.time()
    curve, rows = train(state, args)
    train_seconds = time.time() - train_start
    after, rows_after = evaluate(state, test_prompts, args, phase="after")
    return report(args, state, curve, before, after, rows_before + rows + rows_after, start, train_seconds)


def report(args, state, curve, before, after, rows, start, train_seconds) -> dict[str, Any]:
    """Saves the policy, the rollouts and the plot; writes metrics.json; prints a summary. Returns the metrics."""
    os.makedirs(args.output_dir, exist_ok=True)
    files = {"metrics": os.path.join(args.output_dir, "metrics.json"),
             "rollouts": os.path.join(args.output_dir, "rollouts.jsonl"),
             "plot": plot_curve(curve, os.path.join(args.output_dir, "mini_loop.png")),
             "policy": os.path.join(args.output_dir, "policy")}
    with open(files["rollouts"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    state["policy"].save_pretrained(files["policy"])
    state["tokenizer"].save_pretrained(files["policy"])
    metrics = {"config": asdict(args), "steps": args.steps, "on_lab": state["on_lab"], "polite_closings":
               list(POLITE_CLOSINGS), "curve": curve, "eval_before": before, "eval_after": after, "files": files,
               "samples_before": [r for r in rows if r["phase"] == "before"][: args.num_samples],
               "samples_after": [r for r in rows if r["phase"] == "after"][: args.num_samples],
               "train_seconds": train_seconds, "seconds": time.time() - start}
    if after:
        metrics.update(polite_share_before=before["polite_share"], polite_share_after=after["polite_share"],
                       kl_after=after["kl_k1"], kl_k3_after=after["kl_k3"])
        if "gold_reward" in after:
            metrics.update(gold_before=before["gold_reward"], gold_after=after["gold_reward"])
    write_metrics(args.output_dir, metrics, merge=False)
    print(summary_text(metrics))
    write_card(args, metrics)
    print(outputs_line(args.output_dir))
    return metrics


def write_card(args: MiniLoopArguments, metrics: dict[str, Any]) -> None:
    """``<output_dir>/README.md``: the loop's settings, the held-out numbers before and after, the plot, and how to
    load the trained policy from ``<output_dir>/policy``."""
    from hf_rlhf_ext.model_card import RunCard, hub_id_or_none, load_snippet, write_model_card

    before, after = metrics["eval_before"], metrics["eval_after"]
    rows = [(name, before.get(key), after.get(key)) for name, key in (
        ("held-out polite share", "polite_share"), ("held-out gold reward (lab)", "gold_reward"),
        ("completions ending with EOS", "eos_rate"), ("KL to the reference, k3 (nats per reply)", "kl_k3"),
        ("KL to the reference, k1 (nats per reply)", "kl_k1")) if key in after]
    settings = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "cli_args", "num_samples")}
    write_model_card(args.output_dir, RunCard(
        title=os.path.basename(os.path.abspath(args.output_dir)),
        summary="A policy taught to end its replies politely by a miniature RLHF loop in plain PyTorch (sample, "
                "score, KL to the reference, PPO-clip epochs), the trained model in `policy/`.",
        recipe="recipes/mini_loop.py", command=recipe_command("recipes/mini_loop.py", args.cli_args),
        tags=("ppo", "mini-loop"), base_model=hub_id_or_none(args.model_name_or_path),
        datasets=[d for d in [hub_id_or_none(args.dataset_name)] if d],
        library_name="peft" if args.use_peft else "transformers", hyperparameters=settings, metrics=rows,
        metrics_note=f"On {args.num_eval_prompts} held-out prompts, before and after; all numbers are in "
                     "`metrics.json`, every sampled reply in `rollouts.jsonl`.",
        plots={"mini_loop.png": "Reward, polite share and KL against the step"},
        usage=load_snippet(os.path.join(args.output_dir, "policy"), "peft" if args.use_peft else "causal_lm"),
    ))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

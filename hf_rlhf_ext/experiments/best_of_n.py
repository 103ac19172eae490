"""Best-of-N: sample N completions per prompt, keep the one a reward ranks highest — the chapter's simplest alternative
to RL — and its three uses here:

* :class:`BestOfNSampler` — batched best-of-N from any causal LM, scored by any TRL-style reward function or reward
  model (the KV-cache sampler of :mod:`hf_rlhf_ext.sampling` where it applies, ``generate`` otherwise).
* :func:`best_of_n_curve` — best-of-N's own over-optimisation curve: the expected proxy and gold reward of the best of
  n for n = 1, 2, 4, … from ONE pool of M ≥ n samples per prompt (the unbiased estimator of Nakano et al. 2021 /
  Gao et al. 2022: no resampling per n), against sqrt(KL_bon) with KL_bon = ln n − (n − 1)/n, and the Gao best-of-N
  form R(d) = d(α − β·d) fitted to the gold gain.
* :func:`distill_best_of_n` — best-of-N distillation (expert iteration when ``rounds > 1``): sample N per training
  prompt, keep the best, fine-tune on those prompt–completion pairs with ``trl.SFTTrainer`` (loss on the completion
  only), repeat from the new model.

Why best-of-N at all: it reaches a given reward at a far smaller KL budget than people expect, needs no gradient, and
its KL is known in closed form — the yardstick RL results are read against.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..objectives import (
    GaoFit,
    best_of_n_kl,
    best_of_n_kl_beirami,
    best_of_n_kl_win_rate,
    best_of_n_win_rate_bound,
    fit_gao,
)
from ..reference import Reference, reference_model
from ..sampling import (
    cut_at_first_eos,
    encode_prompts,
    is_conversational,
    kv_cache_sampling_supported,
    per_token_logps,
    policy_eos_ids,
    row_generators,
    sample_policy,
    sampling_row_bytes,
    scoring_row_bytes,
)

__all__ = [
    "CompletionPool",
    "BestOfNResult",
    "BestOfNSampler",
    "BestOfNCurve",
    "best_of_n_expectation",
    "best_of_n_pool_kl_win_rate",
    "best_of_n_beirami_kl",
    "CURVE_STATS",
    "best_of_n_curve",
    "default_ns",
    "default_memory_budget_mb",
    "rows_in_flight",
    "DistillationRound",
    "distill_best_of_n",
    "choose_round",
    "copy_model_files",
    "evaluate_samples",
    "sequence_kl",
]


# ----------------------------------------------------------------------------------------------------------------------
# The pool: M samples per prompt, kept as token ids and text
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class CompletionPool:
    """``num_samples`` completions for each of ``prompts``; row-major (prompt i's samples are rows i·M … i·M + M − 1).

    ``completion_ids`` are cut after the first EOS (kept); ``terminated[j]`` says whether completion j emitted one
    (False: it ran into ``max_new_tokens``). ``logps[j]`` is Σ_t log π(y_t) of completion j at the sampling temperature.
    """

    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[Any]
    terminated: list[bool]
    logps: list[float]
    num_samples: int

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def flat_prompts(self) -> list[Any]:
        """One prompt per completion (each prompt repeated ``num_samples`` times)."""
        return [p for p in self.prompts for _ in range(self.num_samples)]

    def score(self, reward_funcs: Mapping[str, Callable[..., Any]]) -> dict[str, torch.Tensor]:
        """Each reward function's scores as a (prompts, num_samples) float64 tensor (None → NaN)."""
        out = {}
        for name, func in reward_funcs.items():
            values = func(prompts=self.flat_prompts, completions=self.completions, completion_ids=self.completion_ids)
            if len(values) != len(self):
                raise ValueError(f"Reward {name!r} returned {len(values)} values for {len(self)} completions.")
            flat = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
            out[name] = flat.view(len(self.prompts), self.num_samples)
        return out


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, : len(r)] = 1
    return ids, mask


def _batches(num_prompts: int, num_samples: int, batch_size: int) -> list[tuple[list[int], int]]:
    """(prompt indices, samples of each) per forward batch: whole prompts' M samples when they fit in ``batch_size``
    rows, else each prompt's M samples split over several batches (in order, so rows stay prompt-major)."""
    if num_samples <= batch_size:
        per = batch_size // num_samples
        return [(list(range(i, min(i + per, num_prompts))), num_samples) for i in range(0, num_prompts, per)]
    jobs = []
    for i in range(num_prompts):
        for start in range(0, num_samples, batch_size):
            jobs.append(([i], min(batch_size, num_samples - start)))
    return jobs


#: The smallest default sampling budget (MB): below it, chunks get too small to keep the forward passes efficient.
MIN_MEMORY_BUDGET_MB = 256.0


def default_memory_budget_mb(model: nn.Module) -> float:
    """The sampling budget when none is given: as much again as the model's weights (at least
    :data:`MIN_MEMORY_BUDGET_MB`), so that sampling at most doubles what the model alone takes."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(MIN_MEMORY_BUDGET_MB, weights / 2**20)


def rows_in_flight(model: nn.Module, prompt_len: int, max_new_tokens: int, batch_size: int,
                   memory_budget_mb: float | None) -> int:
    """How many sequences one forward batch may hold: ``batch_size``, lowered so that their KV caches and per-step
    logits (:func:`~hf_rlhf_ext.sampling.sampling_row_bytes`) fit in ``memory_budget_mb`` (None: the default;
    ``math.inf``: no bound but ``batch_size``); at least 1."""
    budget = default_memory_budget_mb(model) if memory_budget_mb is None else memory_budget_mb
    if math.isinf(budget):
        return batch_size
    per_row = sampling_row_bytes(model, prompt_len, max_new_tokens)
    return max(1, min(batch_size, int(budget * 2**20 // per_row)))


@torch.no_grad()
def sample_pool(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int | None = 0,
    use_kv_cache: bool | None = None,
    progress: bool = False,
    memory_budget_mb: float | None = None,
) -> CompletionPool:
    """Draws ``num_samples`` completions per prompt (pure ancestral sampling, as in RL training), at most
    ``batch_size`` sequences per forward pass, fewer when their KV caches and logits would exceed
    ``memory_budget_mb`` (see :func:`rows_in_flight`): the pool is sampled in chunks, so its memory does not grow
    with the pool. ``seed`` fixes the draws without touching the caller's random state; with the KV-cache sampler
    each pool row has its own generator, so the pool is the same for any ``batch_size`` or budget. ``progress``
    shows a bar over the chunks."""
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples, batch_size and max_new_tokens must be >= 1, got {num_samples}, {batch_size}, "
                         f"{max_new_tokens}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts to sample from.")
    if use_kv_cache is None:
        use_kv_cache = kv_cache_sampling_supported(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = policy_eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    rows = rows_in_flight(model, max(len(e) for e in encoded), max_new_tokens, batch_size, memory_budget_mb)
    per_row_rng = seed is not None and use_kv_cache and kv_cache_sampling_supported(model)
    out = _PoolRows()
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            jobs = _batches(len(prompts), num_samples, rows)
            for idx, repeats in tqdm(jobs, desc=f"sampling {len(prompts)}×{num_samples}", disable=not progress):
                ids, mask = _left_pad([encoded[i] for i in idx], pad_id, device)
                first = len(out.completion_ids)  # the pool's index of this chunk's first row: rows come in order
                generators = row_generators(seed, range(first, first + len(idx) * repeats)) if per_row_rng else None
                tokens, tok_logps = sample_policy(
                    model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, pad_token_id=pad_id,
                    eos_token_ids=eos_ids, drop_finished=True, num_return_sequences=repeats, use_kv_cache=use_kv_cache,
                    **({"generators": generators} if generators is not None else {}),
                )
                out.add(tokens, tok_logps, eos_ids)
                del tokens, tok_logps
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    if is_conversational(prompts[0]):
        texts = [[{"role": "assistant", "content": t}] for t in texts]
    return CompletionPool(prompts=prompts, prompt_ids=encoded, completion_ids=out.completion_ids, completions=texts,
                          terminated=out.terminated, logps=out.logps, num_samples=num_samples)


@dataclass
class _PoolRows:
    """The pool's rows so far, as lists (the chunks' tensors are dropped once read)."""

    completion_ids: list[list[int]] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)

    def add(self, tokens: torch.Tensor, tok_logps: torch.Tensor, eos_ids: Sequence[int]) -> None:
        """Each row cut after its first EOS (kept), with its summed log-prob up to there."""
        for row, row_logps in zip(cut_at_first_eos(tokens, eos_ids), tok_logps.tolist()):
            self.terminated.append(bool(row) and row[-1] in eos_ids)
            self.completion_ids.append(row)
            self.logps.append(float(sum(row_logps[: len(row)])))


# ----------------------------------------------------------------------------------------------------------------------
# Best of n from a pool of M: the unbiased estimator
# ----------------------------------------------------------------------------------------------------------------------
def best_of_n_expectation(select: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """E[value of the completion ranked best by ``select`` among n drawn without replacement from the M], per prompt.

    ``select`` and ``values`` are (P, M). Sorting each row by ``select``, the i-th smallest (1-based) is the best of a
    random n-subset with probability C(i − 1, n − 1) / C(M, n), so the expectation is Σ_i that weight · value_(i) —
    exact over all C(M, n) subsets, from one pool, with no resampling. Ties in ``select`` are broken at random:
    tied completions share their mean value. NaN scores (a reward that returned None) are refused.
    """
    if select.shape != values.shape or select.dim() != 2:
        raise ValueError(f"select {tuple(select.shape)} and values {tuple(values.shape)} must both be (P, M).")
    P, M = select.shape
    if not 1 <= n <= M:
        raise ValueError(f"n must be in [1, M={M}], got {n}.")
    if torch.isnan(select).any() or torch.isnan(values).any():
        raise ValueError("best_of_n_expectation got NaN scores; drop or fill the completions a reward could not score.")
    select, values = select.double(), values.double()
    order = torch.argsort(select, dim=1, stable=True)
    sel_sorted, val_sorted = select.gather(1, order), values.gather(1, order)
    val_sorted = _mean_over_ties(sel_sorted, val_sorted)
    i = torch.arange(1, M + 1, dtype=torch.float64)
    as64 = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    log_w = _log_comb(i - 1, as64(n - 1)) - _log_comb(as64(M), as64(n))
    weights = torch.where(i >= n, torch.exp(log_w), torch.zeros_like(i))
    return (val_sorted * weights).sum(dim=1)


def _log_comb(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log C(a, b) for a ≥ b ≥ 0 (−inf-safe callers mask a < b)."""
    a, b = a.clamp(min=0), b.clamp(min=0)
    return torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma((a - b).clamp(min=0) + 1)


def _mean_over_ties(sorted_keys: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    out = sorted_values.clone()
    for row in range(sorted_keys.shape[0]):
        keys = sorted_keys[row]
        _, counts = torch.unique_consecutive(keys, return_counts=True)
        if int(counts.max()) == 1:
            continue
        start = 0
        for c in counts.tolist():
            if c > 1:
                out[row, start : start + c] = sorted_values[row, start : start + c].mean()
            start += c
    return out


def best_of_n_pool_kl_win_rate(select: torch.Tensor, n: int) -> tuple[float, float]:
    """(KL(π_bon ‖ π), win rate of best-of-n over a base sample) estimated from the pool's selecting scores, mean over
    prompts. Each prompt's M scores are its empirical reward distribution: a score seen k ≥ 2 times is a point mass
    k/M (ties: repeated completions, or a reward with few values), a score seen once a stretch 1/M of continuous reward.
    Then :func:`~hf_rlhf_ext.objectives.best_of_n_kl_win_rate` gives both exactly: with no ties, ln n − (n − 1)/n and
    n/(n + 1); each tie lowers them, which the analytic formula cannot see (Beirami et al. 2024)."""
    if select.dim() != 2 or torch.isnan(select).any():
        raise ValueError(f"select must be a (P, M) tensor without NaN, got {tuple(select.shape)}.")
    kls, wins = [], []
    for row in select.double():
        _, counts = torch.unique(row, sorted=True, return_counts=True)
        kl, win = best_of_n_kl_win_rate(counts.double(), counts >= 2, n)
        kls.append(kl)
        wins.append(win)
    return sum(kls) / len(kls), sum(wins) / len(wins)


def best_of_n_beirami_kl(select: torch.Tensor, logps: torch.Tensor, n: int) -> float:
    """E over best-of-n's outputs of d_n(ε), ε = π(y | x) = exp(``logps``), the KL estimator of Beirami et al. 2024
    (arXiv 2401.01879; :func:`~hf_rlhf_ext.objectives.best_of_n_kl_beirami`), from the pool: each completion's d_n
    weighted by its chance of being the best of n (:func:`best_of_n_expectation`), mean over prompts. Unlike
    ``kl_pool`` it sees how likely each output is under the base policy, not only the ties of the reward."""
    if logps.shape != select.shape:
        raise ValueError(f"logps {tuple(logps.shape)} must match select {tuple(select.shape)}.")
    eps = torch.exp(logps.double()).clamp(min=torch.finfo(torch.float64).tiny, max=1.0)
    return float(best_of_n_expectation(select, best_of_n_kl_beirami(n, eps), n).mean())


def default_ns(pool_size: int) -> list[int]:
    """1, 2, 4, … up to the pool size."""
    ns, n = [], 1
    while n <= pool_size:
        ns.append(n)
        n *= 2
    return ns


#: The columns of a curve point that are not rewards: n, the analytic KL and its square root, the pool's tie-aware KL,
#: Beirami et al.'s estimate from the base probabilities of the outputs, and best-of-n's win rate over the base policy
#: with its bound n/(n + 1).
CURVE_STATS = ("n", "kl", "sqrt_kl", "kl_pool", "kl_beirami", "win_rate", "win_rate_bound")


@dataclass
class BestOfNCurve:
    """Best-of-N's over-optimisation curve: per n, the KL and the expected value of every reward for the best of n
    chosen by ``select``. ``fit`` is the Gao best-of-N form fitted to the gain of ``gold`` over n = 1 (None when
    there is no gold or too few points)."""

    select: str
    gold: str | None
    points: list[dict[str, float]]
    fit: GaoFit | None = None

    def column(self, name: str) -> list[float]:
        return [p[name] for p in self.points]

    def reward_names(self) -> list[str]:
        """The rewards on the curve: every column of a point but the statistics (``CURVE_STATS``)."""
        return [k for k in self.points[0] if k not in CURVE_STATS]

    def to_dict(self) -> dict[str, Any]:
        return {"select": self.select, "gold": self.gold, "points": self.points,
                "fit": self.fit.to_dict() if self.fit is not None else None}


def best_of_n_curve(
    scores: Mapping[str, torch.Tensor], select: str, gold: str | None = None, ns: Sequence[int] | None = None,
    logps: torch.Tensor | None = None,
) -> BestOfNCurve:
    """The expected score of every reward in ``scores`` ((P, M) tensors of one pool) for the best of n by ``select``,
    averaged over prompts, for each n in ``ns`` (default 1, 2, 4, …, M), with KL_bon(n) = ln n − (n − 1)/n (``kl``, an
    upper bound) and d = sqrt(KL_bon), the pool's tie-aware KL (``kl_pool``), and the win rate of the best of n over
    a base sample by ``select`` (``win_rate``, ties half) with its bound n/(n + 1) (``win_rate_bound``).

    ``logps`` (P, M): each completion's log π under the base policy that sampled it; with them ``kl_beirami`` is
    :func:`best_of_n_beirami_kl`, the estimator of Beirami et al. 2024 averaged over best-of-n's outputs."""
    if select not in scores:
        raise ValueError(f"select={select!r} is not among the scores ({sorted(scores)}).")
    if gold is not None and gold not in scores:
        raise ValueError(f"gold={gold!r} is not among the scores ({sorted(scores)}).")
    M = scores[select].shape[1]
    ns = list(ns) if ns is not None else default_ns(M)
    points = []
    for n in ns:
        kl = best_of_n_kl(n)
        kl_pool, win_rate = best_of_n_pool_kl_win_rate(scores[select], n)
        point = {"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "kl_pool": kl_pool, "win_rate": win_rate,
                 "win_rate_bound": best_of_n_win_rate_bound(n)}
        if logps is not None:
            point["kl_beirami"] = best_of_n_beirami_kl(scores[select], logps, n)
        for name, values in scores.items():
            point[name] = float(best_of_n_expectation(scores[select], values, n).mean())
        points.append(point)
    fit = None
    if gold is not None and len(points) >= 3:
        base = points[0][gold] if points[0]["n"] == 1 else float(scores[gold].mean())
        fit = fit_gao([p["sqrt_kl"] for p in points], [p[gold] - base for p in points], form="bon")
    return BestOfNCurve(select=select, gold=gold, points=points, fit=fit)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class BestOfNResult:
    """The best of ``n`` per prompt: its text and ids, every reward's score of it, and the analytic KL."""

    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[list[int]]
    scores: dict[str, list[float]]
    n: int
    kl: float
    pool: CompletionPool = field(repr=False)

    def mean(self, name: str) -> float:
        values = self.scores[name]
        return sum(values) / len(values)


def _as_reward_funcs(reward_funcs: Any) -> dict[str, Callable[..., Any]]:
    """{name: reward function}; reward models (modules or paths) are wrapped in ``RewardModelFunction``."""
    from ..rewards import RewardModelFunction

    if isinstance(reward_funcs, Mapping):
        items = list(reward_funcs.items())
    else:
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        items = [(None, f) for f in funcs]
    out: dict[str, Callable[..., Any]] = {}
    for name, func in items:
        if isinstance(func, (str, os.PathLike, nn.Module)):
            func = RewardModelFunction(func, name=name)
        if not callable(func):
            raise TypeError(f"A reward must be a function, a reward model or its path, got {type(func).__name__}.")
        key = name or getattr(func, "__name__", None) or type(func).__name__
        if key in out:
            raise ValueError(f"Two rewards are named {key!r}: pass a dict to name them.")
        out[key] = func
    if not out:
        raise ValueError("BestOfNSampler needs at least one reward function.")
    return out


class BestOfNSampler:
    """Best-of-N from any causal LM: ``n`` samples per prompt, scored by every reward, the best by ``select`` kept.

    Args:
        model, tokenizer: the policy and its tokenizer (left padding is applied internally).
        reward_funcs: TRL-style reward functions ``f(prompts, completions, completion_ids, **kw) -> list[float]``,
            reward models (``AutoModelForSequenceClassification`` modules or paths), a list of them, or a dict
            ``{name: func}``. All are scored; the first (or ``select``) picks the best.
        n: samples per prompt.
        select: the reward that ranks the samples (default: the first).
        max_new_tokens, temperature: sampling (pure ancestral sampling: no top-k/top-p).
        batch_size: sequences per forward pass (at most).
        use_kv_cache: None = the KV-cache sampler for decoder-only models, ``generate`` otherwise.
        memory_budget_mb: what the sequences in flight may hold (KV caches and logits) on top of the weights; the pool
            is sampled in chunks that fit (None: as much as the weights, at least 256 MB; ``math.inf``: no bound).
        progress: a progress bar while sampling.

    ``sampler(prompts, seed=0)`` returns a :class:`BestOfNResult`; ``sampler.pool(prompts, m)`` the raw pool and
    ``sampler.curve(prompts, m, gold=...)`` best-of-N's curve for n = 1, 2, 4, …, m.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        reward_funcs: Any,
        n: int = 16,
        select: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        batch_size: int = 256,
        use_kv_cache: bool | None = None,
        progress: bool = True,
        memory_budget_mb: float | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if temperature is None or temperature <= 0:
            raise ValueError(f"temperature must be > 0 for best-of-N sampling, got {temperature}.")
        self.model, self.tokenizer = model, tokenizer
        self.reward_funcs = _as_reward_funcs(reward_funcs)
        self.select = select or next(iter(self.reward_funcs))
        if self.select not in self.reward_funcs:
            raise ValueError(f"select={self.select!r} is not one of the rewards {sorted(self.reward_funcs)}.")
        self.n, self.max_new_tokens, self.temperature = n, max_new_tokens, temperature
        self.batch_size, self.use_kv_cache, self.progress = batch_size, use_kv_cache, progress
        self.memory_budget_mb = memory_budget_mb

    def pool(self, prompts: Sequence[Any], num_samples: int, seed: int | None = 0) -> CompletionPool:
        return sample_pool(self.model, self.tokenizer, prompts, num_samples, self.max_new_tokens, self.temperature,
                           self.batch_size, seed, self.use_kv_cache, self.progress, self.memory_budget_mb)

    def __call__(self, prompts: Sequence[Any], seed: int | None = 0) -> BestOfNResult:
        pool = self.pool(prompts, self.n, seed)
        scores = pool.score(self.reward_funcs)
        if torch.isnan(scores[self.select]).any():
            raise ValueError(f"The selecting reward {self.select!r} returned None for some completions.")
        best = scores[self.select].argmax(dim=1)  # the first of tied maxima
        rows = [i * self.n + int(b) for i, b in enumerate(best)]
        return BestOfNResult(
            prompts=list(pool.prompts),
            completions=[pool.completions[r] for r in rows],
            completion_ids=[pool.completion_ids[r] for r in rows],
            scores={name: [float(v.view(-1)[r]) for r in rows] for name, v in scores.items()},
            n=self.n, kl=best_of_n_kl(self.n), pool=pool,
        )

    def curve(
        self, prompts: Sequence[Any], num_samples: int, gold: str | None = None, seed: int | None = 0
    ) -> tuple[BestOfNCurve, CompletionPool, dict[str, torch.Tensor]]:
        """Best-of-N's curve for n = 1, 2, 4, …, ``num_samples`` from one pool; also returns the pool and its scores."""
        pool = self.pool(prompts, num_samples, seed)
        scores = pool.score(self.reward_funcs)
        logps = torch.tensor(pool.logps, dtype=torch.float64).view(len(pool.prompts), num_samples)
        return best_of_n_curve(scores, self.select, gold=gold, logps=logps), pool, scores


# ----------------------------------------------------------------------------------------------------------------------
# Held-out evaluation and KL of a policy
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_kl(policy: nn.Module, reference: Reference, pool: CompletionPool, batch_size: int = 64,
                memory_budget_mb: float | None = None) -> list[float]:
    """k1 = Σ_t log π(y_t) − log π_ref(y_t) of each completion of the pool (sampled from ``policy`` at temperature 1:
    an unbiased estimate of KL(π ‖ π_ref) in nats per sequence). ``reference``: a model, ``"disable_adapter"`` (the
    PEFT policy with its adapter disabled) or a trainer's :class:`~hf_rlhf_ext.reference.ReferencePolicy`.

    The reference scores at most ``batch_size`` completions per forward pass, fewer when their logits over the
    vocabulary would exceed ``memory_budget_mb`` (as in :func:`sample_pool`)."""
    device = next(policy.parameters()).device
    pad = 0  # any id: padded positions are masked
    flat_prompt_ids = [ids for ids in pool.prompt_ids for _ in range(pool.num_samples)]
    rows = _scoring_rows(policy, max(map(len, pool.completion_ids), default=0), batch_size, memory_budget_mb)
    out: list[float] = []
    for start in range(0, len(pool), rows):
        sl = slice(start, start + rows)
        prompt_ids, prompt_mask = _left_pad(flat_prompt_ids[sl], pad, device)
        comp_ids, comp_mask = _right_pad(pool.completion_ids[sl], pad, device)
        with reference_model(policy, reference) as ref_model:
            ref = per_token_logps(ref_model, prompt_ids, prompt_mask, comp_ids, comp_mask, batch_size=rows)
        out.extend(float(lp) - float(r) for lp, r in zip(pool.logps[sl], ref.sum(dim=1).tolist()))
    return out


def _scoring_rows(model: nn.Module, completion_len: int, batch_size: int, memory_budget_mb: float | None) -> int:
    """Completions per scoring forward pass: ``batch_size``, fewer when their logits exceed the budget; at least 1."""
    budget = default_memory_budget_mb(model) if memory_budget_mb is None else memory_budget_mb
    if math.isinf(budget):
        return batch_size
    return max(1, min(batch_size, int(budget * 2**20 // scoring_row_bytes(model, completion_len))))


def evaluate_samples(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    reward_funcs: Mapping[str, Callable[..., Any]],
    max_new_tokens: int,
    reference: Reference | None = None,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    memory_budget_mb: float | None = None,
) -> dict[str, float]:
    """Held-out numbers of a policy: the mean of every reward over ``num_samples`` samples per prompt, the EOS rate,
    and (with a reference) the mean sequence KL to it."""
    pool = sample_pool(model, tokenizer, prompts, num_samples, max_new_tokens, seed=seed, batch_size=batch_size,
                       memory_budget_mb=memory_budget_mb)
    scores = pool.score(reward_funcs)
    result = {name: float(torch.nanmean(v)) for name, v in scores.items()}
    result["eos_rate"] = sum(pool.terminated) / len(pool)
    result["mean_length"] = sum(len(c) for c in pool.completion_ids) / len(pool)
    if reference is not None:
        kl = sequence_kl(model, reference, pool, memory_budget_mb=memory_budget_mb)
        result["kl"] = sum(kl) / len(kl)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Best-of-N distillation (expert iteration)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DistillationRound:
    """One round: the best-of-N data it trained on (its mean scores) and the held-out numbers after it."""

    round: int
    train_best: dict[str, float]
    train_pairs: int
    eval: dict[str, float]
    train_loss: float | None = None
    model_dir: str | None = None  # where this round's model was saved

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "train_best": self.train_best, "train_pairs": self.train_pairs,
                "eval": self.eval, "train_loss": self.train_loss, "model_dir": self.model_dir}


def best_of_n_sft_dataset(result: BestOfNResult, tokenizer: Any):
    """The best completions as a tokenised prompt–completion data set for ``trl.SFTTrainer``: ``input_ids`` = the
    prompt's ids + the completion's ids exactly as sampled (EOS only where the policy emitted one), ``completion_mask``
    = 1 on the completion, so with ``completion_only_loss=True`` the loss covers the completion only."""
    from datasets import Dataset

    prompt_ids = encode_prompts(tokenizer, result.prompts)
    input_ids = [p + c for p, c in zip(prompt_ids, result.completion_ids)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, result.completion_ids)]
    return Dataset.from_dict({"input_ids": input_ids, "completion_mask": masks})


def distill_best_of_n(
    model: nn.Module,
    tokenizer: Any,
    train_prompts: Sequence[Any],
    sampler_kwargs: dict[str, Any],
    sft_args: Any,
    rounds: int = 1,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    peft_config: Any = None,
    seed: int = 0,
) -> tuple[nn.Module, list[DistillationRound]]:
    """Best-of-N distillation: each round samples ``sampler_kwargs["n"]`` completions per training prompt from the
    current model, keeps the best, and fine-tunes the current model on them with ``trl.SFTTrainer(args=sft_args)``
    (``completion_only_loss`` forced on). ``evaluate(model, round)`` gives each round's held-out numbers.

    Returns the final model and one :class:`DistillationRound` per round. Each round's model (an adapter only, with
    ``peft_config``) and tokenizer are saved to ``<sft_args.output_dir>/round_<k>``, so that a later round that is
    worse never replaces a better one: :func:`choose_round` says which to keep."""
    import copy

    from trl import SFTTrainer

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    history = []
    for k in range(1, rounds + 1):
        sampler = BestOfNSampler(model, tokenizer, **sampler_kwargs)
        best = sampler(train_prompts, seed=seed + k)
        args = copy.deepcopy(sft_args)
        args.output_dir = os.path.join(sft_args.output_dir, f"round_{k}")
        args.completion_only_loss = True
        args.push_to_hub = False  # a round's model is saved in its folder; the caller pushes what it keeps
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": False}
        trainer = SFTTrainer(model=model, args=args, train_dataset=best_of_n_sft_dataset(best, tokenizer),
                             processing_class=tokenizer, peft_config=peft_config if k == 1 else None)
        result = trainer.train()
        trainer.save_model(args.output_dir)  # every process calls it; the main process writes
        model = trainer.accelerator.unwrap_model(trainer.model)
        history.append(DistillationRound(
            round=k, train_best={name: best.mean(name) for name in best.scores}, train_pairs=len(best.prompts),
            eval=evaluate(model, k) if evaluate is not None else {}, train_loss=float(result.training_loss),
            model_dir=args.output_dir,
        ))
    return model, history


def choose_round(initial: Mapping[str, float], rounds: Sequence[DistillationRound], gold: str | None) -> dict[str, Any]:
    """Which round's model to keep: the one with the highest held-out ``gold`` (the earliest on a tie), since later
    rounds of expert iteration can over-optimise the selecting reward. Without a gold reward there is nothing
    held-out to choose by, and the last round is kept. ``beats_initial`` says whether the kept round is better than
    the starting policy (False: the starting policy is the better model, and the caller should say so)."""
    if not rounds:
        raise ValueError("choose_round needs at least one distillation round.")
    scored = [r for r in rounds if _finite(r.eval.get(gold))] if gold is not None else []
    if not scored:
        why = "no held-out gold reward" if gold is None else f"no round has a held-out {gold!r}"
        return {"best_round": rounds[-1].round, "by": None, "gold": None, "initial_gold": None,
                "beats_initial": None, "reason": f"{why}: the last round is kept"}
    best = max(scored, key=lambda r: r.eval[gold])  # max keeps the first of equal values
    start = initial.get(gold)
    beats = bool(best.eval[gold] > start) if _finite(start) else None
    return {"best_round": best.round, "by": gold, "gold": best.eval[gold], "initial_gold": start,
            "beats_initial": beats, "reason": f"the highest held-out {gold} of the {len(rounds)} round(s)"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def copy_model_files(src: str, dst: str) -> list[str]:
    """Copies the model files of a round's folder (its top-level files) into ``dst``; returns their names."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)))
    for name in names:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return names

"""The maths of RLHF as small, pure tensor functions — no trainer state, no models.

Every function here is one formula from the RLHF literature, written so that a student can follow it line by line
(the CleanRL style): the docstring gives the formula and its source, the body computes exactly that. Trainers,
callbacks and tests all import these, so each formula lives in one place.

Conventions
-----------
* ``mask`` arguments are 0/1 (or bool) tensors of the same shape as the data; ``None`` means "every entry counts".
  Sequences are right-padded: the valid tokens of a row come first, padding after.
* Log-probabilities are of the *sampled* tokens, i.e. the samples come from the current policy π.
* Nothing here calls ``.item()`` except :func:`explained_variance`, which returns a Python float for logging.

Sources
-------
* Bradley–Terry reward-model loss: Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155), eq. 1.
* PPO-clip: Schulman et al. 2017 (arXiv 1707.06347), eq. 7; asymmetric ε_high: DAPO (arXiv 2503.14476).
* Clipped value loss: the OpenAI baselines PPO2 implementation, as in old TRL PPO (trl ≤ 1.12).
* GAE: Schulman et al. 2015 (arXiv 1506.02438), eq. 16.
* Token-level rewards with the KL penalty in the reward: Ziegler et al. 2019 (arXiv 1909.08593); InstructGPT.
* Group-relative advantages: GRPO (DeepSeekMath, arXiv 2402.03300); "batch"/"none" scalings as in TRL's
  ``GRPOTrainer`` (``scale_rewards``) after Dr. GRPO (arXiv 2503.20783).
* KL estimators k1/k2/k3: J. Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html).
* Best-of-N KL ln N − (N−1)/N as an upper bound, the exact KL with ties and the win rate ≤ N/(N+1): Beirami et al.
  2024 (arXiv 2401.01879).
* Best-of-N KL ln N − (N−1)/N and the over-optimisation forms R(d) = d(α − β ln d) (RL), d(α − β d) (best-of-N) with
  d = sqrt(KL): Gao, Schulman and Hilton 2022 (arXiv 2210.10760), eqs. 1–2; the KL formula from Stiennon et al. 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_var",
    "whiten",
    "explained_variance",
    "bradley_terry_loss",
    "clipped_surrogate",
    "clipped_surrogate_ratio_grad",
    "clipped_value_loss",
    "gae",
    "token_level_rewards",
    "aggregate_token_loss",
    "LOSS_AGGREGATIONS",
    "group_advantages",
    "zero_std_groups",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "KL_ESTIMATORS",
    "best_of_n_kl",
    "best_of_n_exact",
    "best_of_n_kl_win_rate",
    "best_of_n_win_rate_bound",
    "best_of_n_kl_beirami",
    "GaoFit",
    "fit_gao",
]


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------------


def _as_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Returns ``mask`` as a float tensor of ``x``'s dtype (all ones when ``None``), checking that the shapes agree."""
    if mask is None:
        return torch.ones_like(x)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(x.shape)}")
    return mask.to(dtype=x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1:  Σ x·m / Σ m.

    With ``dim`` the mean is taken along that dimension only (e.g. ``dim=1`` gives one mean per sequence).
    A row whose mask is all zeros has mean 0 (not NaN), so one empty completion cannot poison a batch statistic.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    m = _as_mask(x, mask)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries:  Σ m·(x − μ)² / (n − 1)  (or / n when ``unbiased=False``),
    where μ = :func:`masked_mean` and n = Σ m.

    Raises ``ValueError`` when the mask is empty (or has a single entry with ``unbiased=True``): a variance of
    nothing is a bug upstream, better caught here than as a NaN in the loss (old TRL ``masked_var`` did the same).
    """
    m = _as_mask(x, mask)
    n = m.sum()
    if n.item() == 0:
        raise ValueError("masked_var: the mask selects no entries; there is no variance to compute")
    if unbiased and n.item() == 1:
        raise ValueError("masked_var: the mask selects one entry; the unbiased variance needs at least two")
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n
    if unbiased:
        var = var * (n / (n - 1))  # Bessel's correction
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Whitening:  (x − μ) / √(σ² + ε), with μ, σ² the masked mean and (unbiased) variance.

    PPO implementations whiten advantages per batch so that the policy step size does not depend on the reward scale
    (old TRL ``masked_whiten``; OpenAI baselines). With ``shift_mean=False`` the mean is added back — x / σ in effect —
    which old TRL used for *rewards*, where the sign of the mean carries information.
    Entries outside the mask are set to 0 (they carry no signal and would otherwise hold arbitrary values).
    """
    m = _as_mask(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Explained variance of the critic:  1 − Var[R − V] / Var[R]  over the masked entries.

    1 means the value head predicts the returns perfectly, 0 means it does no better than a constant, < 0 worse than
    one (CleanRL logs the same number). Returns NaN when the returns have zero variance (nothing to explain).
    """
    values = values.detach().float()
    returns = returns.detach().float()
    if values.shape != returns.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match returns shape {tuple(returns.shape)}")
    m = _as_mask(returns, None if mask is None else mask.to(returns.device))
    var_returns = masked_var(returns, m, unbiased=False)
    if var_returns.item() == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, m, unbiased=False) / var_returns)


# ---------------------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Bradley–Terry pairwise loss for reward models:  −log σ(r_w − r_l − margin).

    Under the Bradley–Terry model P(w ≻ l) = σ(r_w − r_l), so this is the negative log-likelihood of the human label
    (InstructGPT eq. 1; the optional margin as in Llama 2 / TRL ``RewardTrainer``). ``F.logsigmoid`` is used instead
    of ``log(sigmoid(·))``, which underflows to log 0 = −inf for large negative differences.
    Its gradient is −σ(−d)·(+1) for r_w and +σ(−d) for r_l (d = r_w − r_l − margin): a descent step raises the chosen
    reward and lowers the rejected one, most strongly for pairs the model currently gets wrong.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards shape {tuple(chosen_rewards.shape)} != rejected_rewards shape "
            f"{tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------------


def _check_clip(epsilon: float, epsilon_high: float | None) -> float:
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if eps_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {eps_high}")
    return eps_high


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None
) -> torch.Tensor:
    """PPO-clip objective, elementwise, to be *maximised*:  min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A),  ρ = π/π_old.

    Schulman et al. 2017, eq. 7. Taking the minimum makes the objective a pessimistic bound: once the ratio has moved
    past the clip range in the direction the advantage rewards (ρ > 1 + ε_high for A > 0, ρ < 1 − ε for A < 0)
    there is nothing more to gain and the gradient is 0; moves in the harmful direction are never clipped, so they
    are always corrected. ``epsilon_high`` (default ε) is DAPO's "clip-higher" (0.28 there).
    A loss is ``-masked_mean(clipped_surrogate(...), mask)``. ``advantages`` broadcasts against ``ratio``
    (e.g. (B, 1) sequence advantages against (B, T) token ratios).
    """
    eps_high = _check_clip(epsilon, epsilon_high)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high) * advantages
    return torch.minimum(unclipped, clipped)


def clipped_surrogate_ratio_grad(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None
) -> torch.Tensor:
    """∂/∂ρ of :func:`clipped_surrogate`, elementwise, in closed form:  0 where the clip is active, A elsewhere.

    The clip is active (the clipped term is the strict minimum) exactly when
        A > 0 and ρ > 1 + ε_high   (already pushed up far enough), or
        A < 0 and ρ < 1 − ε        (already pushed down far enough).
    Everywhere else, including the *pessimistic* side (A > 0 with ρ < 1 − ε, A < 0 with ρ > 1 + ε_high), the
    gradient is the unclipped A. This matches autograd through :func:`clipped_surrogate` (tested), including at the
    boundaries ρ = 1 ± ε where ``torch.clamp`` passes the gradient through.
    """
    eps_high = _check_clip(epsilon, epsilon_high)
    ratio, advantages = torch.broadcast_tensors(ratio, advantages)
    clip_active = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - epsilon))
    return torch.where(clip_active, torch.zeros_like(advantages), advantages)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    cliprange_value: float = 0.2,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clipped value loss:  ½ · mean_mask[ max((V − R)², (V_clip − R)²) ],  V_clip = V_old + clip(V − V_old, −c, c).

    The critic analogue of the PPO clip (OpenAI baselines PPO2; old TRL PPO with ``cliprange_value=0.2`` and
    ``vf_coef=0.1``): the max keeps the critic from moving its prediction more than ``c`` away from the value it had
    when the rollout was collected, unless that makes the error smaller.
    """
    if cliprange_value < 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value}")
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError(
            "values, old_values and returns must have the same shape, got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}"
        )
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)


LOSS_AGGREGATIONS = ("bnpo", "grpo", "dr_grpo", "dapo")


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    kind: Literal["bnpo", "grpo", "dr_grpo", "dapo"] = "bnpo",
    max_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduces a (B, T) per-token loss to a scalar, as TRL's ``loss_type`` names it:

    * ``"bnpo"``: Σ ℓ·m / Σ m, the token mean over the batch (old TRL PPO; CleanRL's mean over a mini-batch);
    * ``"grpo"``: the mean over sequences of each sequence's token mean (GRPO; long replies weigh less per token);
    * ``"dr_grpo"``: Σ ℓ·m / (B · max_length), a constant denominator (Dr. GRPO, arXiv 2503.20783);
    * ``"dapo"``: Σ ℓ·m / num_tokens, with ``num_tokens`` the mean token count of a micro-batch over the whole
      rollout (DAPO's token-level sum, arXiv 2503.14476).
    """
    m = _as_mask(per_token, mask)
    total = (per_token * m).sum()
    if kind == "bnpo":
        return total / m.sum().clamp(min=1.0)
    if kind == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if kind == "dr_grpo":
        if max_length is None:
            raise ValueError("aggregate_token_loss(kind='dr_grpo') needs max_length (the maximum completion length)")
        return total / (per_token.size(0) * max_length)
    if kind == "dapo":
        if num_tokens is None:
            raise ValueError("aggregate_token_loss(kind='dapo') needs num_tokens (tokens per micro-batch)")
        return total / num_tokens
    raise ValueError(f"kind must be one of {LOSS_AGGREGATIONS}, got {kind!r}")


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF-PPO: r_t = −β·KL_t on every completion token, plus the sequence score on the last
    valid token (Ziegler et al. 2019, InstructGPT). Returns ``(rewards, non_score_rewards)``, both (B, T), 0 on padding.

    The score lands on the last token of the completion (its EOS when it has one): the only state that has seen the
    whole reply. A completion with no valid token gets no score.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    lengths = mask.sum(dim=1)
    last = (lengths.long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += torch.where(lengths > 0, scores.to(rewards.dtype), torch.zeros_like(lengths))
    return rewards, non_score


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation on right-padded (B, T) sequences; returns ``(advantages, returns)``.

    Schulman et al. 2015, eq. 16, as a backward recursion over the tokens of each completion:
        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γ·λ·A_{t+1}
        returns_t = A_t + V_t       (the critic's regression target, a λ-return)
    The episode ends at the last valid token: V and A beyond it are 0 (no bootstrapping past the end), and every
    masked position of the outputs is 0. RLHF defaults: γ = 1, λ = 0.95 (InstructGPT; old TRL PPO).
    With γ = λ = 1 the advantage telescopes to (reward-to-go) − V_t.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape:
        raise ValueError(
            f"gae expects rewards and values of the same (B, T) shape, got {tuple(rewards.shape)} and "
            f"{tuple(values.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    m = _as_mask(values, mask)
    if m.shape[1] > 1 and bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("gae expects a right-padded mask (valid tokens first, then padding); got a 0 before a 1")

    rewards = rewards * m
    values = values * m
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V_{T} = 0: nothing after the last token
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)  # A_{T} = 0
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]  # padding keeps A = 0, so the chain restarts at the end
        advantages_reversed.append(adv_t)
        next_value, next_adv = values[:, t], adv_t
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * m
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO / Dr. GRPO)
# ---------------------------------------------------------------------------------------------------------------------


def _check_groups(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (N,), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size}); rewards must "
            "be laid out as consecutive groups of completions of the same prompt"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; drop or fill unscorable completions before computing advantages")


def _unbiased_std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """√(Σ(x − x̄)² / (n − 1)), written with the same operations, in the same order, as ``trl.trainer.utils.nanstd``
    (mean of squares, then × n/(n − 1)), so that advantages agree with TRL bit for bit on finite inputs."""
    mean = x.mean(dim=dim, keepdim=True) if dim is not None else x.mean()
    variance = ((x - mean) ** 2).mean(dim=dim, keepdim=True) if dim is not None else ((x - mean) ** 2).mean()
    n = torch.tensor(x.shape[dim] if dim is not None else x.numel(), device=x.device)
    variance = variance * (n / (n - 1))
    std = torch.sqrt(variance)
    return std if keepdim or dim is None else std.squeeze(dim)


def zero_std_groups(rewards: torch.Tensor, group_size: int, rtol: float = 1e-6) -> torch.Tensor:
    """Bool tensor (N // group_size,): which groups have (numerically) identical rewards.

    A group is degenerate when  max_i |r_i − r_j| ≤ rtol · max(1, max_i |r_i|)  — equivalently, its rewards differ
    only by floating-point residue (e.g. 0.1 + 0.2 versus 0.3). Such a group carries no learning signal: every
    completion was equally good. Using the spread rather than the standard deviation, and a tolerance relative to the
    reward scale, catches float32 and float64 residue alike. Groups of size 1 are always degenerate.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    scale = grouped.abs().max(dim=1).values.clamp(min=1.0)
    return spread <= rtol * scale


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
    *,
    zero_std_rtol: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages for N = n_prompts × group_size rewards laid out group by group.

        "group":  A_i = (r_i − mean(r_group)) / (std(r_group) + eps)     GRPO (DeepSeekMath, arXiv 2402.03300)
        "batch":  A_i = (r_i − mean(r_group)) / (std(r_batch) + eps)     TRL ``scale_rewards="batch"``
        "none":   A_i =  r_i − mean(r_group)                             Dr. GRPO (arXiv 2503.20783): no std bias

    std is the *unbiased* standard deviation, and eps = 1e-4, as in TRL 1.16 ``GRPOTrainer``
    (``_generate_and_score_completions``, "sum_then_normalize" branch): for every group with distinct rewards the
    result equals TRL's advantages exactly, so a callback can recompute them.

    One deliberate difference: a group whose rewards are equal up to floating-point residue (see
    :func:`zero_std_groups`) gets advantages of exactly 0 under every scale. TRL divides the residue by
    (std + 1e-4), which gives tiny but non-zero values (and with a smaller eps, as in NeMo-RL issue #4161, a single
    advantage of 7428); such a group has no signal, so 0 is the correct value. DAPO drops these groups altogether.
    A group of size 1 therefore gives 0, as in TRL. Non-finite rewards raise ``ValueError``.
    """
    _check_groups(rewards, group_size)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    work = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    grouped = work.view(-1, group_size)
    # baseline: the mean reward of the prompt's own group (a per-prompt, action-independent baseline)
    mean = grouped.mean(dim=1, keepdim=True)
    advantages = grouped - mean
    if scale == "group" and group_size > 1:
        advantages = advantages / (_unbiased_std(grouped, dim=1, keepdim=True) + eps)
    elif scale == "batch" and work.numel() > 1:
        advantages = advantages / (_unbiased_std(work) + eps)
    # degenerate groups: exactly zero, never residue / (tiny std + eps)
    degenerate = zero_std_groups(work, group_size, rtol=zero_std_rtol).unsqueeze(1)
    advantages = torch.where(degenerate, torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1).to(rewards.dtype) if rewards.is_floating_point() else advantages.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = −x = log π − log π_ref  (x = log π_ref − log π), per sampled token.

    Unbiased for KL(π ‖ π_ref) when the tokens are sampled from π, but high-variance and negative on about half of
    the tokens (Schulman 2020). It is the per-token KL of the KL-shaped reward r_t = −β·k1 (Ziegler et al. 2019;
    InstructGPT) and the KL TRL's ``RLOOTrainer`` logs.
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = x² / 2, per sampled token: biased but low-variance, always ≥ 0 (Schulman 2020).

    Its gradient is the gradient of the reverse KL to second order; it is the estimator whose *gradient* is
    unbiased for KL(π ‖ π_ref) when used as a loss.
    """
    x = ref_logp - logp
    return 0.5 * x**2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = eˣ − 1 − x, per sampled token: unbiased, ≥ 0 (since eˣ ≥ 1 + x), low variance (Schulman 2020).

    E_π[eˣ] = Σ π·π_ref/π = 1, so E[k3] = E[k1]: the "− 1 + eˣ" is a zero-mean control variate. This is the KL
    GRPO adds to its loss and the ``kl`` TRL's ``GRPOTrainer`` logs.
    """
    x = ref_logp - logp
    return torch.exp(x) - 1.0 - x


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k1") -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate of the given kind ("k1", "k2" or "k3"); see :func:`kl_k1` and friends."""
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}") from None
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp shape {tuple(logp.shape)} does not match ref_logp shape {tuple(ref_logp.shape)}")
    return estimator(logp, ref_logp)


# ---------------------------------------------------------------------------------------------------------------------
# Over-optimisation scaling laws (Gao, Schulman and Hilton 2022)
# ---------------------------------------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π) = ln N − (N − 1)/N nats: the analytic KL of best-of-N sampling to the base policy (Stiennon et
    al. 2020, appendix; exact for a continuous reward without ties, an upper bound otherwise)."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


def best_of_n_win_rate_bound(n: int) -> float:
    """N/(N + 1): the win rate of best-of-N over an independent base sample under a continuous reward (the best of
    N + 1 i.i.d. draws is equally likely to be any one of them); an upper bound with ties counted half (Beirami et al.
    2024, arXiv 2401.01879)."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    return n / (n + 1)


def best_of_n_kl_beirami(n: int, eps: torch.Tensor | float) -> torch.Tensor:
    """The best-of-N KL estimator of Beirami et al. 2024 (arXiv 2401.01879, their proposed estimator), elementwise in
    ε = π(y | x), the base policy's probability of the output best-of-N returned:

        d_N(ε) = (1 − ε)^N [ln N + (N − 1) ln(1 − ε) − (N − 1)/N] + (1 − (1 − ε)^N) ln((1 − (1 − ε)^N) / ε)

    Why beside ln N − (N − 1)/N: that analytic value assumes every output is infinitely rare; d_N is it as ε → 0 and
    falls to 0 at ε = 1 (a base policy that always says the same thing cannot move), staying at or below it. Its
    expectation over best-of-N's outputs estimates KL(π_bon ‖ π). ε in (0, 1]."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    eps = torch.as_tensor(eps, dtype=torch.float64)
    if bool(((eps <= 0) | (eps > 1) | torch.isnan(eps)).any()):
        raise ValueError("eps must be a probability in (0, 1].")
    log_stay = n * torch.log1p(-eps)  # ln (1 − ε)^N, −inf at ε = 1
    stay = torch.exp(log_stay)
    moved = -torch.expm1(log_stay)  # 1 − (1 − ε)^N, accurate for tiny ε
    inner = math.log(n) - (n - 1) / n + (n - 1) * torch.log1p(-eps).clamp(min=-1e300)
    first = torch.where(stay > 0, stay * inner, torch.zeros_like(stay))
    second = torch.where(moved > 0, moved * torch.log(moved.clamp(min=1e-300) / eps), torch.zeros_like(moved))
    return first + second


def _xlogx_pow(u: torch.Tensor, n: int) -> torch.Tensor:
    """u^n · log u with 0 · log 0 = 0."""
    return torch.where(u > 0, u.pow(n) * torch.log(u.clamp(min=1e-300)), torch.zeros_like(u))


def best_of_n_kl_win_rate(masses: torch.Tensor, atoms: torch.Tensor, n: int) -> tuple[float, float]:
    """(KL(π_bon ‖ π), P(R_bon > R) + ½·P(R_bon = R)) for a base reward distribution given as levels sorted by reward:
    ``masses[i]`` the base probability of level i, ``atoms[i]`` whether it is a point mass (tied rewards) or a stretch
    of continuous reward. With F the CDF at the top of a level and F₋ below it, best-of-n puts F^n − F₋^n on it:

    * atom: KL term q·log(q/p), win term q·(F₋ + p/2), with q = F^n − F₋^n (ties broken at random);
    * continuous stretch [F₋, F] of the CDF u: density n·u^(n−1) relative to the base, so its KL term is
      ∫ n u^(n−1) log(n u^(n−1)) du = ln n·(F^n − F₋^n) + (n − 1)·[u^n ln u − u^n/n] from F₋ to F, and its win term
      ∫ u · n u^(n−1) du = n/(n+1)·(F^(n+1) − F₋^(n+1)).

    All continuous gives ln n − (n − 1)/n and n/(n + 1) (Stiennon et al. 2020; Beirami et al. 2024); every atom lowers
    both (ties make best-of-n move less mass). Masses are normalised to sum to 1.
    """
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}.")
    p = torch.as_tensor(masses, dtype=torch.float64)
    atoms = torch.as_tensor(atoms, dtype=torch.bool)
    if p.dim() != 1 or p.shape != atoms.shape or p.numel() == 0 or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError("masses must be a non-empty 1-D tensor of non-negative numbers with a positive sum, atoms its "
                         "1-D bool mask.")
    p = p / p.sum()
    upper = p.cumsum(0).clamp(max=1.0)
    upper[-1] = 1.0
    lower = torch.cat([upper.new_zeros(1), upper[:-1]])
    q = upper.pow(n) - lower.pow(n)
    atom_kl = torch.where(q > 0, q * torch.log(q.clamp(min=1e-300) / p.clamp(min=1e-300)), torch.zeros_like(q))
    cont_kl = math.log(n) * q + (n - 1) * (_xlogx_pow(upper, n) - _xlogx_pow(lower, n) - q / n)
    atom_win = q * (lower + p / 2)
    cont_win = n / (n + 1) * (upper.pow(n + 1) - lower.pow(n + 1))
    kl = torch.where(atoms, atom_kl, cont_kl).sum()
    win = torch.where(atoms, atom_win, cont_win).sum()
    return max(float(kl), 0.0), float(win)


def best_of_n_exact(probs: Sequence[float] | torch.Tensor, rewards: Sequence[float] | torch.Tensor,
                    n: int) -> tuple[float, float]:
    """(exact KL(π_bon ‖ π), exact win rate) of best-of-n from a discrete base distribution: outcome i has probability
    ``probs[i]`` and reward ``rewards[i]``; outcomes of equal reward are one tied level (random tie-breaking). This is
    P_bon(level) = F^n − F₋^n and KL = Σ P_bon log(P_bon / p) over the levels — the reference the analytic
    ln n − (n − 1)/n only bounds."""
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if p.shape != r.shape or bool(torch.isnan(r).any()):
        raise ValueError(f"probs {tuple(p.shape)} and rewards {tuple(r.shape)} must match, with no NaN reward.")
    levels, inverse = torch.unique(r, sorted=True, return_inverse=True)
    masses = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, inverse, p)
    return best_of_n_kl_win_rate(masses, torch.ones(len(levels), dtype=torch.bool), n)


#: A Gao fit explaining less of the gold gain's variance than this is reported as "no fit" (its α, β and peak are
#: not a description of the data).
MIN_FIT_R2 = 0.8
#: A predicted peak beyond this multiple of the largest measured KL is an extrapolation, reported as "no fit".
MAX_PEAK_KL_FACTOR = 2.0


@dataclass(frozen=True)
class GaoFit:
    """A least-squares fit of a Gao et al. (2022) over-optimisation form to gold-reward gains against d = sqrt(KL).

    ``form`` "rl": R(d) = d(α − β ln d), peak at d* = exp(α/β − 1); "bon": R(d) = d(α − β d), peak at d* = α / (2β).
    ``r2`` is the coefficient of determination of R(d) itself (not of R/d); ``peak_d`` is None when the fitted curve
    has no interior maximum (β ≤ 0: the gain never turns down over the data's range)."""

    form: str
    alpha: float
    beta: float
    r2: float
    n_points: int
    max_kl: float | None = None  # the largest measured KL (d²) among the fitted points

    @property
    def reason(self) -> str | None:
        """Why the fit must not be read as a result (None: it may): R² below ``MIN_FIT_R2`` or undefined, or a
        predicted peak far outside the measured KL range."""
        if not math.isfinite(self.r2):
            return "R² is undefined (the gold gain does not vary over the fitted points)"
        if self.r2 < MIN_FIT_R2:
            return f"R² = {self.r2:.3f} is below {MIN_FIT_R2:g}"
        if self.peak_kl is not None and self.max_kl is not None and self.peak_kl > MAX_PEAK_KL_FACTOR * self.max_kl:
            return (f"the predicted peak (KL {self.peak_kl:.3g} nats) is beyond {MAX_PEAK_KL_FACTOR:g}× the largest "
                    f"measured KL ({self.max_kl:.3g} nats)")
        return None

    @property
    def valid(self) -> bool:
        return self.reason is None

    def predict(self, d: Sequence[float] | float) -> list[float] | float:
        """R(d) of the fitted form (R(0) = 0)."""
        if isinstance(d, (int, float)):
            return self._one(float(d))
        return [self._one(float(x)) for x in d]

    def _one(self, d: float) -> float:
        if d <= 0:
            return 0.0
        return d * (self.alpha - self.beta * (math.log(d) if self.form == "rl" else d))

    @property
    def peak_d(self) -> float | None:
        if self.beta <= 0:
            return None
        return math.exp(self.alpha / self.beta - 1.0) if self.form == "rl" else self.alpha / (2.0 * self.beta)

    @property
    def peak_kl(self) -> float | None:
        """KL at the predicted peak (d*²)."""
        return None if self.peak_d is None else self.peak_d**2

    def to_dict(self) -> dict:
        return {"form": self.form, "alpha": self.alpha, "beta": self.beta, "r2": self.r2, "n_points": self.n_points,
                "peak_d": self.peak_d, "peak_kl": self.peak_kl, "max_kl": self.max_kl, "valid": self.valid,
                "reason": self.reason}


def fit_gao(d: Sequence[float], gain: Sequence[float], form: Literal["rl", "bon"] = "rl") -> GaoFit:
    """Fits R(d) = d(α − β·f(d)) to gold gains ``gain`` (gold minus the reference policy's gold) at d = sqrt(KL).

    Both forms are linear in (α, β) after dividing by d: R/d = α − β·f(d) with f = ln d ("rl") or f = d ("bon"), so
    this is ordinary least squares on (f(d), R/d) — no optimiser. Points with d ≤ 1e-6 carry no information about
    the slope (R(0) = 0 by construction) and are left out; at least two distinct f(d) are needed.
    """
    if form not in ("rl", "bon"):
        raise ValueError(f"form must be 'rl' or 'bon', got {form!r}.")
    if len(d) != len(gain):
        raise ValueError(f"{len(d)} distances for {len(gain)} gains.")
    pts = [(float(x), float(r)) for x, r in zip(d, gain) if x > 1e-6 and math.isfinite(x) and math.isfinite(r)]
    if len(pts) < 2:
        raise ValueError(f"fit_gao needs at least 2 points with d > 0, got {len(pts)}.")
    xs = torch.tensor([math.log(x) if form == "rl" else x for x, _ in pts], dtype=torch.float64)
    ys = torch.tensor([r / x for x, r in pts], dtype=torch.float64)
    if float(xs.max() - xs.min()) < 1e-12:
        raise ValueError("fit_gao needs at least 2 distinct values of d.")
    design = torch.stack([torch.ones_like(xs), -xs], dim=1)  # R/d = α·1 + β·(−f(d))
    alpha, beta = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0].tolist()
    fit = GaoFit(form=form, alpha=alpha, beta=beta, r2=float("nan"), n_points=len(pts))
    observed = [r for _, r in pts]
    predicted = fit.predict([x for x, _ in pts])
    mean = sum(observed) / len(observed)
    ss_tot = sum((r - mean) ** 2 for r in observed)
    ss_res = sum((r - p) ** 2 for r, p in zip(observed, predicted))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return GaoFit(form=form, alpha=alpha, beta=beta, r2=r2, n_points=len(pts), max_kl=max(x for x, _ in pts) ** 2)

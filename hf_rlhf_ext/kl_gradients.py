"""Which KL gradient are you taking? An exact audit of where the KL estimators k1, k2, k3 are put.

RLHF codes put a KL term in one of two places, and the *value* it logs says nothing about the *gradient* it takes:

* in the reward (Ziegler et al. 2019; InstructGPT; TRL's RLOO): r = R − β·k1 with a stop-gradient on r, so the
  gradient is the score-function one, E_π[∇log π(y) · k1(y)];
* in the loss (GRPO, arXiv 2402.03300): L = β·k(y) per sample, differentiated *through* k, on samples drawn from π —
  the expectation's own dependence on π is not differentiated, only the per-sample estimator, E_π[∇k(y)]; optionally
  multiplied by the importance ratio π/π_old (π_old = π detached, as on PPO's first pass), which adds ∇log π · k.

Here the expectations are computed *exactly*, by enumerating the whole support of a small policy (a softmax over a
few logits, and a two-step sequence policy), and each expected gradient (w.r.t. the logits) is compared with the exact
gradients of KL(π ‖ π_ref) and KL(π_ref ‖ π). With x = log π_ref − log π (Schulman 2020):

* ∇KL(π ‖ π_ref) = E_π[∇log π · (log π − log π_ref)]   (score function; the E_π[∇log π] term is 0)
* ∇KL(π_ref ‖ π) = −E_π_ref[∇log π] = −E_π[e^x ∇log π]
* ∇k1 = ∇log π                       → E_π[∇k1] = 0
* ∇k2 = −x ∇log π                    → E_π[∇k2] = ∇KL(π ‖ π_ref)
* ∇k3 = (1 − e^x) ∇log π             → E_π[∇k3] = ∇KL(π_ref ‖ π)
* ∇(ρ·k) = ∇log π · k + ∇k at ρ = 1  → with the ratio, k1 and k3 give ∇KL(π ‖ π_ref), k2 neither.
* in the reward, E_π[∇log π · k3] = ∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π): neither; E_π[∇log π · k2]: neither.

On a sequence these hold for the estimator of the *sequence* log-ratio Σ_t x_t. Summing per-token estimators (what
GRPO does) differentiates each token's KL conditional on its prefix, but not the prefix's effect on later tokens' KL
(and, for k3, weights prefixes by π instead of π_ref): the audit shows those placements match neither KL.
:func:`kl_gradient_audit` returns the rows, :func:`audit_markdown` the table in ``docs/kl_gradients.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .objectives import kl_estimate

__all__ = [
    "FORWARD",
    "NEITHER",
    "REVERSE",
    "AuditRow",
    "ToyPolicy",
    "audit_markdown",
    "categorical_policy",
    "default_policies",
    "exact_kl_gradients",
    "expected_gradient",
    "kl_gradient_audit",
    "two_step_policy",
]

FORWARD = "KL(π‖π_ref)"
REVERSE = "KL(π_ref‖π)"
NEITHER = "neither"
#: Expected gradients closer than this (max abs, float64) to a target count as equal to it.
MATCH_TOL = 1e-9


@dataclass(frozen=True)
class ToyPolicy:
    """A policy small enough to enumerate: ``token_logps(theta)`` gives, for every sequence of the support, the
    log-probabilities of its tokens under π (differentiable in ``theta``, the logits) and under π_ref, both (S, T)."""

    name: str
    theta: torch.Tensor
    token_logps: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def categorical_policy(logits: list[float], ref_logits: list[float]) -> ToyPolicy:
    """π = softmax(logits) over K outcomes, one token each."""
    ref = F.log_softmax(torch.tensor(ref_logits, dtype=torch.float64), dim=0)

    def token_logps(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.log_softmax(theta, dim=0)[:, None], ref[:, None]

    return ToyPolicy(f"categorical, K={len(logits)}", torch.tensor(logits, dtype=torch.float64), token_logps)


def two_step_policy(first: list[float], second: list[list[float]], ref_first: list[float],
                    ref_second: list[list[float]]) -> ToyPolicy:
    """π(a, b) = softmax(first)[a] · softmax(second[a])[b]: two tokens, the second's logits depend on the first.
    ``theta`` is [first, second.flatten()]; the support is all K² pairs (a, b), a-major."""
    k = len(first)
    ref_a = F.log_softmax(torch.tensor(ref_first, dtype=torch.float64), dim=0)
    ref_b = F.log_softmax(torch.tensor(ref_second, dtype=torch.float64), dim=1)
    ref = torch.stack([ref_a.repeat_interleave(k), ref_b.flatten()], dim=1)

    def token_logps(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp_a = F.log_softmax(theta[:k], dim=0)
        logp_b = F.log_softmax(theta[k:].view(k, k), dim=1)
        return torch.stack([logp_a.repeat_interleave(k), logp_b.flatten()], dim=1), ref

    theta = torch.tensor(first + [v for row in second for v in row], dtype=torch.float64)
    return ToyPolicy(f"two-step, K={k}", theta, token_logps)


def _grad(value: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, theta, retain_graph=True)
    return g


def exact_kl_gradients(policy: ToyPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇KL(π ‖ π_ref), ∇KL(π_ref ‖ π)) w.r.t. the logits, the sums over the support differentiated in full."""
    theta = policy.theta.clone().requires_grad_(True)
    logp, ref = (t.sum(-1) for t in policy.token_logps(theta))
    forward = (logp.exp() * (logp - ref)).sum()  # KL(π‖π_ref) = Σ_y π(y) log(π(y)/π_ref(y))
    reverse = (ref.exp() * (ref - logp)).sum()  # KL(π_ref‖π) = Σ_y π_ref(y) log(π_ref(y)/π(y))
    return _grad(forward, theta), _grad(reverse, theta)


# Per-sample surrogates f(y); the audit differentiates Σ_y sg(π(y)) · f(y) = E_π[f], i.e. E_π[∇f] (samples from π).
Surrogate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _in_reward(kind: str, per_token: bool) -> Surrogate:
    """REINFORCE with r = −k, stop-gradient on r: loss = sg(k) · log π. ``per_token``: rewards r_t = −k_t, each
    token's log-prob weighted by its return-to-go Σ_{s ≥ t} k_s (PPO's γ = 1 returns); else k of the sequence
    log-ratio weights log π(y) = Σ_t log π_t. For k1 the two agree: by causality E[∇log π_t · k1_s] = 0 for s < t."""

    def surrogate(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if per_token:
            k = kl_estimate(logp, ref, kind).detach()
            return (k.flip(-1).cumsum(-1).flip(-1) * logp).sum(-1)
        k = kl_estimate(logp.sum(-1), ref.sum(-1), kind).detach()
        return k * logp.sum(-1)

    return surrogate


def _in_loss(kind: str, ratio: bool, per_token: bool) -> Surrogate:
    """k in the loss: per token and summed (GRPO) or of the sequence log-ratio; ratio ρ = π/π_old with π_old = sg(π),
    which is 1 in value and ∇log π in gradient."""

    def surrogate(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if not per_token:
            logp, ref = logp.sum(-1, keepdim=True), ref.sum(-1, keepdim=True)
        k = kl_estimate(logp, ref, kind)
        if ratio:
            k = torch.exp(logp - logp.detach()) * k
        return k.sum(-1)

    return surrogate


def expected_gradient(policy: ToyPolicy, surrogate: Surrogate) -> torch.Tensor:
    """E_π[∇f(y)] exactly: Σ over the support of sg(π(y)) · ∇f(y) — the sampling distribution is not differentiated,
    as when the loss is averaged over samples drawn from π."""
    theta = policy.theta.clone().requires_grad_(True)
    logp, ref = policy.token_logps(theta)
    weights = logp.sum(-1).exp().detach()
    return _grad((weights * surrogate(logp, ref)).sum(), theta)


@dataclass(frozen=True)
class AuditRow:
    """One placement of one estimator on one policy: which divergence's gradient it takes (``gradient_of``), and the
    max abs distance of its expected gradient to each exact gradient and to zero."""

    policy: str
    estimator: str
    placement: str
    ratio: bool | None
    gradient_of: str
    err_forward: float
    err_reverse: float
    max_abs_grad: float


def _placements(multi_token: bool) -> list[tuple[str, str, bool | None, Surrogate]]:
    """(estimator, placement, ratio, surrogate) for every placement; per-token variants only on multi-token policies
    (on one token they are the sequence ones)."""
    kinds = ("k1", "k2", "k3")
    rewards = [("reward, REINFORCE", False)]
    losses = [("loss", False)]
    if multi_token:
        rewards = [("reward (sequence), REINFORCE", False), ("reward (per token), return-to-go", True)]
        losses = [("loss (per token, summed)", True), ("loss (sequence log-ratio)", False)]
    rows: list[tuple[str, str, bool | None, Surrogate]] = []
    for placement, per_token in rewards:
        rows += [(kind, placement, None, _in_reward(kind, per_token)) for kind in kinds]
    for placement, per_token in losses:
        rows += [(kind, placement, ratio, _in_loss(kind, ratio, per_token))
                 for kind in kinds for ratio in (False, True)]
    return rows


def _verdict(err_forward: float, err_reverse: float, max_abs: float, tol: float) -> str:
    if err_forward < tol:
        return FORWARD
    if err_reverse < tol:
        return REVERSE
    return f"{NEITHER} (zero)" if max_abs < tol else NEITHER


def audit_policy(policy: ToyPolicy, tol: float = MATCH_TOL) -> list[AuditRow]:
    """Every placement of k1/k2/k3 on ``policy`` against the exact ∇KL(π‖π_ref) and ∇KL(π_ref‖π)."""
    forward, reverse = exact_kl_gradients(policy)
    multi_token = policy.token_logps(policy.theta)[0].shape[-1] > 1
    rows = []
    for kind, placement, ratio, surrogate in _placements(multi_token):
        g = expected_gradient(policy, surrogate)
        ef, er, mx = (float((g - t).abs().max()) for t in (forward, reverse, torch.zeros_like(g)))
        rows.append(AuditRow(policy.name, kind, placement, ratio, _verdict(ef, er, mx, tol), ef, er, mx))
    return rows


def default_policies() -> list[ToyPolicy]:
    """The audited instances: arbitrary non-symmetric logits, so no gradient vanishes by accident."""
    return [
        categorical_policy([0.5, -0.3, 1.2, -1.0], [0.0, 0.4, -0.6, 0.3]),
        two_step_policy([0.2, -0.4, 0.7], [[0.3, -1.1, 0.5], [1.0, 0.2, -0.6], [-0.8, 0.9, 0.1]],
                        [-0.3, 0.6, 0.0], [[-0.5, 0.4, 0.8], [0.1, -0.7, 0.3], [0.6, 0.0, -0.9]]),
    ]


def kl_gradient_audit(policies: list[ToyPolicy] | None = None, tol: float = MATCH_TOL) -> list[AuditRow]:
    """The audit's rows over ``policies`` (default :func:`default_policies`)."""
    return [row for p in (policies or default_policies()) for row in audit_policy(p, tol)]


def _fmt(err: float) -> str:
    return "< 1e-12" if err < 1e-12 else f"{err:.2e}"


def audit_markdown(rows: list[AuditRow]) -> str:
    """The rows as a markdown table (errors below 1e-12 printed as such, so the table is machine-independent)."""
    header = ("| policy | estimator | placement | × π/π_old | gradient of | max err vs ∇KL(π‖π_ref) "
              "| max err vs ∇KL(π_ref‖π) | max abs grad |")
    lines = [header,
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r.ratio is None else ("yes" if r.ratio else "no")
        lines.append(f"| {r.policy} | {r.estimator} | {r.placement} | {ratio} | **{r.gradient_of}** "
                     f"| {_fmt(r.err_forward)} | {_fmt(r.err_reverse)} | {_fmt(r.max_abs_grad)} |")
    return "\n".join(lines) + "\n"

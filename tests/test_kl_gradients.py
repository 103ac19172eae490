"""The KL-gradient audit: its exact gradients against closed forms and finite differences, every placement's verdict
against the hand derivation, and docs/kl_gradients.md against the table the audit generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_rlhf_ext.kl_gradients import (
    FORWARD,
    NEITHER,
    REVERSE,
    _in_reward,
    audit_markdown,
    categorical_policy,
    default_policies,
    exact_kl_gradients,
    expected_gradient,
    kl_gradient_audit,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "kl_gradients.md"
START, END = "<!-- kl-gradients-table:start -->", "<!-- kl-gradients-table:end -->"
ZERO = f"{NEITHER} (zero)"
CAT, SEQ = "categorical, K=4", "two-step, K=3"
TOKEN, SEQUENCE = "loss (per token, summed)", "loss (sequence log-ratio)"

# (policy, estimator, placement, ratio) -> the divergence whose gradient E_π[∇f] is, derived by hand:
# in the reward, E_π[∇log π · k] with k1 = log π/π_ref is the score-function ∇KL(π‖π_ref); k2, k3 change the weight;
# in the loss, ∇k1 = ∇log π (mean 0); ∇k2 = (log π − log π_ref)∇log π;
# ∇k3 = (1 − π_ref/π)∇log π (mean −E_π_ref[∇log π]);
# the ratio adds ∇log π · k. Per token, each term is conditional on its prefix and misses the prefix's effect on later
# tokens' KL, so on two steps only the return-to-go reward and the sequence-level estimators keep their single-step
# answer.
EXPECTED = {
    (CAT, "k1", "reward, REINFORCE", None): FORWARD,
    (CAT, "k2", "reward, REINFORCE", None): NEITHER,
    (CAT, "k3", "reward, REINFORCE", None): NEITHER,
    (CAT, "k1", "loss", False): ZERO,
    (CAT, "k1", "loss", True): FORWARD,
    (CAT, "k2", "loss", False): FORWARD,
    (CAT, "k2", "loss", True): NEITHER,
    (CAT, "k3", "loss", False): REVERSE,
    (CAT, "k3", "loss", True): FORWARD,
    (SEQ, "k1", "reward (sequence), REINFORCE", None): FORWARD,
    (SEQ, "k2", "reward (sequence), REINFORCE", None): NEITHER,
    (SEQ, "k3", "reward (sequence), REINFORCE", None): NEITHER,
    (SEQ, "k1", "reward (per token), return-to-go", None): FORWARD,
    (SEQ, "k2", "reward (per token), return-to-go", None): NEITHER,
    (SEQ, "k3", "reward (per token), return-to-go", None): NEITHER,
    (SEQ, "k1", TOKEN, False): ZERO,
    (SEQ, "k1", TOKEN, True): NEITHER,
    (SEQ, "k2", TOKEN, False): NEITHER,
    (SEQ, "k2", TOKEN, True): NEITHER,
    (SEQ, "k3", TOKEN, False): NEITHER,
    (SEQ, "k3", TOKEN, True): NEITHER,
    (SEQ, "k1", SEQUENCE, False): ZERO,
    (SEQ, "k1", SEQUENCE, True): FORWARD,
    (SEQ, "k2", SEQUENCE, False): FORWARD,
    (SEQ, "k2", SEQUENCE, True): NEITHER,
    (SEQ, "k3", SEQUENCE, False): REVERSE,
    (SEQ, "k3", SEQUENCE, True): FORWARD,
}


def _softmax(z):
    e = np.exp(np.asarray(z, dtype=np.float64) - np.max(z))
    return e / e.sum()


def test_categorical_kl_gradients_equal_their_closed_forms():
    logits, ref_logits = [0.5, -0.3, 1.2, -1.0], [0.0, 0.4, -0.6, 0.3]
    pi, rho = _softmax(logits), _softmax(ref_logits)
    kl = float(np.sum(pi * np.log(pi / rho)))
    forward, reverse = exact_kl_gradients(categorical_policy(logits, ref_logits))
    # ∂KL(π‖ρ)/∂θ_j = π_j (log(π_j/ρ_j) − KL);  ∂KL(ρ‖π)/∂θ_j = π_j − ρ_j  (softmax Jacobian)
    np.testing.assert_allclose(forward.numpy(), pi * (np.log(pi / rho) - kl), atol=1e-12)
    np.testing.assert_allclose(reverse.numpy(), pi - rho, atol=1e-12)


def _two_step_kls(theta, ref_first, ref_second):
    k = len(ref_first)
    pa, pb = _softmax(theta[:k]), np.stack([_softmax(row) for row in np.reshape(theta[k:], (k, k))])
    ra, rb = _softmax(ref_first), np.stack([_softmax(row) for row in ref_second])
    pi, rho = (pa[:, None] * pb).ravel(), (ra[:, None] * rb).ravel()
    return np.sum(pi * np.log(pi / rho)), np.sum(rho * np.log(rho / pi))


def test_two_step_kl_gradients_equal_finite_differences():
    policy = default_policies()[1]
    ref_first, ref_second = [-0.3, 0.6, 0.0], [[-0.5, 0.4, 0.8], [0.1, -0.7, 0.3], [0.6, 0.0, -0.9]]
    theta, h = policy.theta.numpy(), 1e-6
    numeric = np.zeros((2, theta.size))
    for i in range(theta.size):
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        numeric[:, i] = (np.array(_two_step_kls(up, ref_first, ref_second))
                         - np.array(_two_step_kls(down, ref_first, ref_second))) / (2 * h)
    forward, reverse = exact_kl_gradients(policy)
    np.testing.assert_allclose(forward.numpy(), numeric[0], atol=1e-8)
    np.testing.assert_allclose(reverse.numpy(), numeric[1], atol=1e-8)


def test_every_placement_takes_the_gradient_derived_by_hand():
    rows = kl_gradient_audit()
    got = {(r.policy, r.estimator, r.placement, r.ratio): r.gradient_of for r in rows}
    assert got == EXPECTED
    for r in rows:  # "neither" is far from both, not a near miss of the tolerance
        if r.gradient_of.startswith(NEITHER):
            assert min(r.err_forward, r.err_reverse) > 1e-2, r


def test_k3_in_the_reward_takes_the_difference_of_the_two_gradients():
    """E_π[∇log π · (r − 1 − log r)], r = π_ref/π: Σ ∇π_ref-weighted term −E_π_ref[∇log π] = −∇KL(π_ref‖π) plus the
    score-function ∇KL(π‖π_ref) (the −1 has mean 0) — for the estimator of the sequence log-ratio."""
    for policy in default_policies():
        forward, reverse = exact_kl_gradients(policy)
        g = expected_gradient(policy, _in_reward("k3", per_token=False))
        assert float((g - (forward - reverse)).abs().max()) < 1e-12


def test_the_myopic_per_token_placements_share_one_gradient():
    """k1·ρ, k2 and k3·ρ per token all reduce to Σ_t ∇log π_t · k1_t: the conditional KL(π‖π_ref) of each step."""
    rows = {(r.estimator, r.ratio): r for r in kl_gradient_audit(default_policies()[1:]) if r.placement == TOKEN}
    errs = {key: rows[key].err_forward for key in [("k1", True), ("k2", False), ("k3", True)]}
    assert max(errs.values()) - min(errs.values()) < 1e-12 and min(errs.values()) > 1e-2


def test_the_doc_table_is_the_generated_one():
    """Regenerates the table between the markers of docs/kl_gradients.md; fails (after writing it) if it changed."""
    text = DOC.read_text()
    assert START in text and END in text
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    fresh = f"{head}{START}\n{audit_markdown(kl_gradient_audit())}{END}{tail}"
    if fresh != text:
        DOC.write_text(fresh)
        pytest.fail("docs/kl_gradients.md was out of date with the audit; it has been regenerated — review and commit")

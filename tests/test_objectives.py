"""Tests of the pure RLHF maths: hand-computed values, autograd checks and the textbook properties of each formula."""

from __future__ import annotations

import math

import pytest
import torch

from hf_rlhf_ext.objectives import (
    bradley_terry_loss,
    clipped_surrogate,
    clipped_surrogate_ratio_grad,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    whiten,
    zero_std_groups,
)

# ------------------------------------------------------------------------------------------------ masked statistics


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # ((−1)² + 0 + 1²) / 2
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    # without a mask these are the ordinary statistics
    assert masked_mean(x).item() == pytest.approx(x.mean().item())
    assert masked_var(x).item() == pytest.approx(x.var().item())


def test_masked_mean_empty_row_is_zero_and_var_rejects_empty_mask():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    with pytest.raises(ValueError, match="no entries"):
        masked_var(x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="one entry"):
        masked_var(x, torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, torch.ones(3))


def test_whiten_gives_mean_zero_var_one_on_masked_entries():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 10, generator=g)
    mask = torch.ones(4, 10)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[mask == 0] == 0)
    # shift_mean=False keeps the original mean and still scales to unit variance
    w_keep = whiten(x, mask, shift_mean=False)
    assert masked_mean(w_keep, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert masked_var(w_keep, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_explained_variance():
    g = torch.Generator().manual_seed(1)
    returns = torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    mask[2, 3:] = 0
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # a constant prediction explains nothing: Var[R − c] = Var[R]
    const = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(const, returns, mask) == pytest.approx(0.0, abs=1e-6)
    # a prediction anti-correlated with the returns is worse than a constant
    assert explained_variance(-returns, returns, mask) < 0
    # padded entries are ignored: garbage there changes nothing
    noisy = returns.clone()
    noisy[2, 3:] = 1e6
    assert explained_variance(noisy, returns, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(returns, torch.ones(3, 6)))


# ------------------------------------------------------------------------------------------------ Bradley–Terry


def test_bradley_terry_loss_values_by_hand():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(1.0))]
    none = bradley_terry_loss(chosen, rejected, reduction="none")
    assert none.tolist() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert bradley_terry_loss(chosen, rejected, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-6)
    # a margin asks for a larger gap: −log σ(1 − 0.5)
    with_margin = bradley_terry_loss(chosen[:1], rejected[:1], margin=0.5, reduction="none")
    assert with_margin.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(chosen, rejected, reduction="max")
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(chosen, rejected[:2])


def test_bradley_terry_is_stable_for_large_gaps():
    loss = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([200.0]), reduction="none")
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(200.0)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.5, -2.0, 2.5], requires_grad=True)
    gap_before = (chosen - rejected).detach().clone()
    bradley_terry_loss(chosen, rejected).backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    # gradient is −σ(−d)/n: the largest push goes to the pair ranked most wrongly
    expected = -torch.sigmoid(-gap_before) / 3
    assert torch.allclose(chosen.grad, expected) and torch.allclose(rejected.grad, -expected)
    with torch.no_grad():  # one SGD step
        chosen -= 0.5 * chosen.grad
        rejected -= 0.5 * rejected.grad
    assert torch.all(chosen - rejected > gap_before)


# ------------------------------------------------------------------------------------------------ PPO clip


def _autograd_ratio_grad(ratio, adv, **kw):
    r = ratio.clone().requires_grad_(True)
    clipped_surrogate(r, adv, **kw).sum().backward()
    return r.grad


def test_clipped_surrogate_values_by_hand():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    out = clipped_surrogate(ratio, adv, epsilon=0.2)
    # min(3, 1.2·2=2.4); min(−3, −2.4); min(1, 0.8·2=1.6); min(−1, −1.6); inside: 1.1
    assert out.tolist() == pytest.approx([2.4, -3.0, 1.0, -1.6, 1.1])
    asym = clipped_surrogate(ratio[:1], adv[:1], epsilon=0.2, epsilon_high=0.28)
    assert asym.item() == pytest.approx(1.28 * 2.0)
    with pytest.raises(ValueError, match="epsilon"):
        clipped_surrogate(ratio, adv, epsilon=-0.1)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_clipped_gradient_is_zero_only_where_the_clip_helps(eps_high):
    eps = 0.2
    hi = 1 + (eps if eps_high is None else eps_high)
    ratio = torch.tensor([hi + 0.1, hi + 0.1, 0.7, 0.7, 1.0, 0.9, hi + 0.1])
    adv = torch.tensor([1.5, -1.5, -1.5, 1.5, 0.7, -0.3, 0.0])
    grad = _autograd_ratio_grad(ratio, adv, epsilon=eps, epsilon_high=eps_high)
    assert grad[0] == 0  # A > 0, ratio > 1+ε: already pushed up enough
    assert grad[2] == 0  # A < 0, ratio < 1−ε: already pushed down enough
    assert grad[1] == pytest.approx(-1.5)  # pessimistic side, A < 0 and ratio > 1+ε: not clipped
    assert grad[3] == pytest.approx(1.5)  # pessimistic side, A > 0 and ratio < 1−ε: not clipped
    assert grad[4] == pytest.approx(0.7) and grad[5] == pytest.approx(-0.3)  # inside the trust region
    closed = clipped_surrogate_ratio_grad(ratio, adv, epsilon=eps, epsilon_high=eps_high)
    assert torch.equal(closed, grad)


def test_clipped_ratio_grad_matches_autograd_on_random_and_boundary_points():
    g = torch.Generator().manual_seed(2)
    ratio = torch.exp(0.4 * torch.randn(2000, generator=g, dtype=torch.float64))
    adv = torch.randn(2000, generator=g, dtype=torch.float64)
    # exact boundaries and A = 0, where a closed form is easy to get wrong
    ratio = torch.cat([ratio, torch.tensor([0.8, 1.2, 0.8, 1.2, 1.0, 0.8], dtype=torch.float64)])
    adv = torch.cat([adv, torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0], dtype=torch.float64)])
    for eps_high in (None, 0.28):
        auto = _autograd_ratio_grad(ratio, adv, epsilon=0.2, epsilon_high=eps_high)
        closed = clipped_surrogate_ratio_grad(ratio, adv, epsilon=0.2, epsilon_high=eps_high)
        assert torch.allclose(closed, auto, atol=1e-12)
    # broadcasting (B, 1) advantages against (B, T) ratios
    r2 = ratio[:20].view(4, 5)
    a2 = adv[:4].view(4, 1)
    assert torch.allclose(clipped_surrogate_ratio_grad(r2, a2), _autograd_ratio_grad(r2, a2))


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.5, 1.1, 0.0])
    old = torch.tensor([1.0, 1.0, 0.0])
    returns = torch.tensor([2.0, 2.0, 0.0])
    # item 0: unclipped (1.5−2)² = 0.25, clipped (1.2−2)² = 0.64 → 0.64; item 1: both 0.81; item 2: 0
    none_masked = clipped_value_loss(values, old, returns, cliprange_value=0.2)
    assert none_masked.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.0) / 3)
    masked = clipped_value_loss(values, old, returns, cliprange_value=0.2, mask=torch.tensor([1, 0, 0]))
    assert masked.item() == pytest.approx(0.5 * 0.64)
    # with an unbounded clip range it is plain ½·MSE
    big = clipped_value_loss(values, old, returns, cliprange_value=1e9)
    assert big.item() == pytest.approx(0.5 * ((values - returns) ** 2).mean().item())
    with pytest.raises(ValueError, match="shape"):
        clipped_value_loss(values, old[:2], returns)


# ------------------------------------------------------------------------------------------------ GAE


def test_gae_hand_computed_2x4_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # row 0: δ3 = 1 − .5 = .5; δ2 = δ1 = δ0 = .5·.5 − .5 = −.25; A_t = δ_t + .25·A_{t+1}
    # row 1 ends at t = 1 (padding values/rewards are garbage and must be ignored): δ1 = 2 − 1 = 1; δ0 = .5 − 1
    expected_adv = torch.tensor([[-0.3203125, -0.28125, -0.125, 0.5], [-0.25, 1.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.1796875, 0.21875, 0.375, 1.0], [0.75, 2.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected_adv) and torch.allclose(ret, expected_ret)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rm = rewards * mask
    reward_to_go = rm.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (reward_to_go - values) * mask, atol=1e-6)
    assert torch.allclose(ret, reward_to_go * mask, atol=1e-6)
    # λ = 0 is the one-step TD error
    adv0, _ = gae(rewards, values, None, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(3, 1)], dim=1)
    assert torch.allclose(adv0, rewards + 0.9 * next_v - values, atol=1e-6)


def test_gae_rejects_bad_input():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="right-padded"):
        gae(r, r, torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        gae(r, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, gamma=1.5)


# ------------------------------------------------------------------------------------------------ group advantages


def test_group_advantages_mean_zero_and_sign():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(6 * 4, generator=g)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale=scale).view(6, 4)
        centred = rewards.view(6, 4) - rewards.view(6, 4).mean(1, keepdim=True)
        assert torch.allclose(adv.mean(1), torch.zeros(6), atol=1e-6)
        assert torch.equal(torch.sign(adv), torch.sign(centred))


def test_group_advantages_three_scales_by_hand():
    rewards = torch.tensor([1.0, 3.0, 0.0, 10.0], dtype=torch.float64)
    none = group_advantages(rewards, 2, scale="none")
    assert none.tolist() == [-1.0, 1.0, -5.0, 5.0]
    group = group_advantages(rewards, 2, scale="group")
    # unbiased std of [1, 3] is √2, of [0, 10] is √50
    expected = [-1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4), -5 / (50**0.5 + 1e-4), 5 / (50**0.5 + 1e-4)]
    assert group.tolist() == pytest.approx(expected, rel=1e-12)
    batch = group_advantages(rewards, 2, scale="batch")
    batch_std = rewards.std().item()  # unbiased, over the whole batch
    # rel 1e-6: like TRL's nanstd, the Bessel factor n/(n − 1) is computed in the default float32 dtype
    assert batch.tolist() == pytest.approx([v / (batch_std + 1e-4) for v in none.tolist()], rel=1e-6)


def test_group_advantages_match_trl_formula_exactly():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(5)
    for G in (2, 8):
        r = torch.randn(16 * G, generator=g)
        mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G)
        std_group = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
        assert torch.equal(group_advantages(r, G, "group"), (r - mean) / (std_group + 1e-4))
        assert torch.equal(group_advantages(r, G, "batch"), (r - mean) / (nanstd(r) + 1e-4))


def test_zero_std_groups_give_exactly_zero_including_float_residue():
    # float64: 0.1 + 0.2 = 0.30000000000000004 ≠ 0.3, a residue that TRL's formula turns into a non-zero advantage
    residue64 = torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.1 + 0.2, 1.0, 2.0, 2.0, 1.0], dtype=torch.float64)
    assert residue64[0] != residue64[1]
    # float32: ten times 0.1 accumulated is not exactly 1.0
    acc = torch.zeros((), dtype=torch.float32)
    for _ in range(10):
        acc = acc + torch.tensor(0.1, dtype=torch.float32)
    residue32 = torch.stack([acc, torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0)])
    assert residue32[0] != residue32[1]
    for rewards in (residue64, residue32):
        group_size = len(rewards) // 2  # first group: residue only; second group: real differences
        for scale in ("group", "batch", "none"):
            for eps in (1e-4, 0.0, 1e-12):
                adv = group_advantages(rewards, group_size, scale=scale, eps=eps)
                assert torch.isfinite(adv).all()
                assert torch.all(adv[:group_size] == 0), (scale, eps, adv)
                assert torch.all(adv[group_size:] != 0)
    # the un-guarded formula with a small eps blows the residue up (the NeMo-RL #4161 failure this guards against)
    naive = (residue64[:4] - residue64[:4].mean()) / (residue64[:4].std() + 1e-20)
    assert naive.abs().max() > 0.5
    assert zero_std_groups(residue64, 4).tolist() == [True, False]
    # all-equal groups and groups of size one
    assert torch.all(group_advantages(torch.full((6,), 0.7), 3) == 0)
    assert torch.all(group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1) == 0)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


# ------------------------------------------------------------------------------------------------ KL estimators


def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    x = [math.log(0.5), math.log(2.0)]  # x = log π_ref − log π
    assert kl_k1(logp, ref).tolist() == pytest.approx([-x[0], -x[1]], rel=1e-6)
    assert kl_k2(logp, ref).tolist() == pytest.approx([v * v / 2 for v in x], rel=1e-6)
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(v) - 1 - v for v in x], rel=1e-6)
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(logp, ref, kind=kind), fn(logp, ref))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, kind="k4")


def test_k3_is_positive_away_from_equality_and_zero_at_equality():
    g = torch.Generator().manual_seed(6)
    logp, ref = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    logp[:10] = ref[:10]  # some tokens where π = π_ref
    differs = logp != ref
    assert torch.equal(kl_k3(logp, ref) > 0, differs)  # a sign error or a dropped term breaks this
    assert torch.equal(kl_k2(logp, ref) > 0, differs)
    assert (kl_k1(logp, ref) < 0).any()  # k1 is unbiased but not non-negative per token
    assert torch.all(kl_k3(logp, logp) == 0)


def test_k1_and_k3_are_unbiased_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(7)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        est = kl_estimate(logp, ref, kind=kind)
        se = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - true_kl) < 4 * se, kind
    # k3 has lower variance than k1 here (Schulman's point)
    assert kl_k3(logp, ref).var() < kl_k1(logp, ref).var()


# ---------------------------------------------------------------------------------------------------------------------
# Gao et al. (2022) forms and the best-of-N KL
# ---------------------------------------------------------------------------------------------------------------------


def test_best_of_n_kl_matches_formula_values():
    from hf_rlhf_ext.objectives import best_of_n_kl

    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert best_of_n_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_fit_gao_recovers_known_coefficients_under_noise(form):
    import math

    from hf_rlhf_ext.objectives import fit_gao

    alpha, beta = 1.2, 0.5
    gen = torch.Generator().manual_seed(0)
    d = torch.linspace(0.2, 5.0, 40).tolist()
    f = [math.log(x) if form == "rl" else x for x in d]
    noise = (0.01 * torch.randn(40, generator=gen)).tolist()
    gain = [x * (alpha - beta * fx) + e for x, fx, e in zip(d, f, noise)]
    fit = fit_gao(d, gain, form=form)
    assert fit.alpha == pytest.approx(alpha, abs=0.02)
    assert fit.beta == pytest.approx(beta, abs=0.02)
    assert fit.r2 > 0.99
    expected_peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
    assert fit.peak_d == pytest.approx(expected_peak, rel=0.05)
    assert fit.predict(fit.peak_d) >= max(fit.predict(d))  # the peak is the curve's maximum


def test_fit_gao_drops_zero_distance_and_refuses_degenerate_input():
    from hf_rlhf_ext.objectives import fit_gao

    fit = fit_gao([0.0, 1.0, 2.0], [5.0, 1.0, 1.0], form="bon")  # the d = 0 point would divide by zero
    assert fit.n_points == 2
    assert fit.alpha == pytest.approx(1.5) and fit.beta == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        fit_gao([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="distinct"):
        fit_gao([1.0, 1.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="form"):
        fit_gao([1.0, 2.0], [0.5, 0.6], form="linear")


def test_fit_gao_without_a_turn_has_no_peak():
    from hf_rlhf_ext.objectives import fit_gao

    fit = fit_gao([1.0, 2.0, 3.0], [1.0, 2.2, 3.6], form="bon")  # gain/d rises with d: β < 0
    assert fit.beta < 0 and fit.peak_d is None

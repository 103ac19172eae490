"""Plots of the experiments' numbers (matplotlib, Agg backend: no display needed). Each function takes the numbers an
experiment returned and writes one PNG; nothing here computes a result."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["plot_best_of_n_curve", "plot_distillation", "plot_compare", "plot_baselines", "plot_clip_gradients",
           "plot_rm_ensemble", "plot_training_curves", "plot_reward_model_curves", "TRAINING_CURVE_KL_KEYS"]

# KL keys a trainer or callback may log, with what each one is (plotted when present in the log history)
TRAINING_CURVE_KL_KEYS = {
    "objective/kl": "PPO: sequence KL in the reward (its estimator), rollouts",
    "kl": "per-token k3 on the training batch",
    "kl_ref/k3_seq": "sequence k3 on held-out prompts",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_best_of_n_curve(curve: Any, path: str) -> str:
    """Every reward of the best of n against sqrt(KL_bon), n annotated, and the fitted Gao best-of-N form on the gold
    gain (shifted back by the n = 1 gold so it sits on the gold points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    d = curve.column("sqrt_kl")
    names = curve.reward_names()
    for name in names:
        ax.plot(d, curve.column(name), marker="o", label=name)
    for x, n, y in zip(d, curve.column("n"), curve.column(names[0])):
        ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if curve.fit is not None and curve.fit.valid:  # a curve that does not describe the data is not drawn
        base = curve.points[0][curve.gold]
        xs = [max(d) * i / 100 for i in range(101)]
        ax.plot(xs, [base + y for y in curve.fit.predict(xs)], "--", color="gray",
                label=f"Gao fit: d({curve.fit.alpha:.2f} - {curve.fit.beta:.2f} d), R²={curve.fit.r2:.2f}")
    ax.set_xlabel("sqrt(KL_bon) = sqrt(ln N - (N-1)/N)")
    ax.set_ylabel("mean reward of the best of N (held-out)")
    ax.set_title(f"Best-of-N, selected by {curve.select}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_distillation(metrics: dict[str, Any], names: Sequence[str], path: str) -> str:
    """Each reward against KL for the initial policy, best-of-N at inference and every distillation round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [("initial", metrics["initial"], 0.0), (f"best-of-{metrics['n']}", metrics["best_of_n"],
                                                      metrics["best_of_n"]["kl"])]
    points += [(f"round {r['round']}", r["eval"], r["eval"].get("kl", math.nan)) for r in metrics["distilled"]]
    for name, marker in zip(names, "os^dv"):
        xs = [kl for _, _, kl in points]
        ys = [values.get(name, math.nan) for _, values, _ in points]
        ax.plot(xs, ys, marker=marker, linestyle="none", label=name)
        for (label, _, _), x, y in zip(points, xs, ys):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL to the initial policy (nats per completion)")
    ax.set_ylabel("mean held-out reward")
    ax.set_title("Best-of-N at inference vs distilled into the policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _band(ax, xs: Sequence[float], mean: Sequence, low: Sequence, high: Sequence, label: str, colour: str) -> None:
    """A mean line with a shaded min–max band (None values drawn as gaps)."""
    nan = lambda v: math.nan if v is None else v  # noqa: E731
    ax.plot(xs, [nan(v) for v in mean], color=colour, lw=2, label=label)
    ax.fill_between(xs, [nan(v) for v in low], [nan(v) for v in high], color=colour, alpha=0.2, lw=0)


def plot_compare(metrics: dict[str, Any], path: str) -> str:
    """Held-out gold (top) and KL to the reference (bottom) against step for each trainer: the mean over seeds and
    the min–max band."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    for (name, t), colour in zip(metrics["trainers"].items(), ("tab:blue", "tab:orange", "tab:green")):
        c = t["curve"]
        size = f"{t['prompts_per_step']}×{t['completions_per_prompt']}"
        label = f"{name.upper()} ({size}, β={t['beta']:g}, n={t['num_runs']})"
        _band(top, c["step"], c["gold_mean"], c["gold_min"], c["gold_max"], label, colour)
        _band(bottom, c["step"], c["kl_mean"], c["kl_min"], c["kl_max"], label, colour)
    top.set_ylabel("held-out gold reward")
    top.set_title("PPO vs GRPO: mean over seeds, band = min–max")
    bottom.set_ylabel("KL(π‖π_ref), k3, nats / completion")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_baselines(metrics: dict[str, Any], path: str) -> str:
    """REINFORCE baselines: the training reward (top) and the measured gradient variance (bottom, log scale) against
    step for each baseline: the mean over seeds and the min–max band."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    offset = metrics.get("settings", {}).get("reward_offset", 0.0)
    for (name, b), colour in zip(metrics["baselines"].items(), ("tab:red", "tab:blue", "tab:green")):
        label = f"{name} (n={b['num_runs']})"
        r, v = b["reward_curve"], b["grad_variance_curve"]
        _band(top, r["step"], r["mean"], r["min"], r["max"], label, colour)
        _band(bottom, v["step"], v["mean"], v["min"], v["max"], label, colour)
    top.set_ylabel(f"training reward (offset {offset:g} removed)")
    top.set_title("REINFORCE baselines: mean over seeds, band = min–max")
    bottom.set_yscale("log")
    bottom.set_ylabel("gradient variance (tr Cov)")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_clip_gradients(ratio: Sequence[float], grad_pos: Sequence[float], grad_neg: Sequence[float], epsilon: float,
                        path: str) -> str:
    """∂L_clip/∂ρ against the ratio ρ for A = +1 and A = −1, with the clip range shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.axvspan(1 - epsilon, 1 + epsilon, color="gray", alpha=0.15, label=f"1 ± ε (ε = {epsilon})")
    ax.plot(ratio, grad_pos, label="A = +1")
    ax.plot(ratio, grad_neg, label="A = −1")
    ax.set_xlabel("ratio ρ = π / π_old")
    ax.set_ylabel("∂ objective / ∂ρ")
    ax.set_title("PPO-clip: zero gradient once far enough in the favourable direction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_rm_ensemble(metrics: dict[str, Any], runs: dict[str, Sequence[dict[str, Any]]], path: str) -> str:
    """Reward-model ensembles: held-out gold against step per optimised reward (mean over seeds, band = min–max), and
    each run's gold against sqrt(KL) — a hump that an ensemble flattens shows in both."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"single": "tab:red", "mean": "tab:blue", "min": "tab:green", "uwo": "tab:purple"}
    for name, o in metrics["objectives"].items():
        c, colour = o["curve"], colours.get(name, "tab:gray")
        left.plot(c["step"], c["gold_mean"], color=colour, lw=2, label=f"{name} (n={len(o['seeds'])})")
        left.fill_between(c["step"], c["gold_min"], c["gold_max"], color=colour, alpha=0.2, lw=0)
        for i, r in enumerate(runs[name]):
            d = [math.sqrt(max(p["kl"], 0.0)) for p in r["curve"]]
            right.plot(d, [p["gold"] for p in r["curve"]], color=colour, alpha=0.6, lw=1, marker=".",
                       label=name if i == 0 else None)
    s = metrics["settings"]
    left.set_title(f"held-out gold, β = {s['beta']:g}: mean over seeds, band = min–max")
    left.set_xlabel("optimizer step")
    right.set_title("each run: gold against KL to the reference")
    right.set_xlabel("sqrt(KL), KL = sequence k3, nats")
    for ax in (left, right):
        ax.set_ylabel("held-out gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _curves(log_history: Sequence[dict[str, Any]], panels: Sequence[tuple[str, Sequence[str], dict[str, str]]],
            path: str, title: str) -> str | None:
    """One panel per (y label, keys, key descriptions) holding logged keys, against the step; None when none do."""
    panels = [(label, [k for k in keys if any(r.get(k) is not None for r in log_history)], notes)
              for label, keys, notes in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 1.2 + 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, keys, notes) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in log_history if r.get(key) is not None and "step" in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                    label=f"{key} ({notes[key]})" if key in notes else key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title(title)
    return _save(plt, fig, path)


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str,
                         title: str = "Training curves") -> str | None:
    """The reward curves (every ``rewards/<name>/mean``, or ``reward``) and the KL curves (``TRAINING_CURVE_KL_KEYS``)
    against the optimizer step, from a trainer's ``log_history``. Returns None (no file) when nothing was logged."""
    reward_keys = sorted({k for r in log_history for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    return _curves(log_history, [("mean reward (training batch)", reward_keys or ["reward"], {}),
                                 ("KL to the reference (nats)", list(TRAINING_CURVE_KL_KEYS), TRAINING_CURVE_KL_KEYS)],
                   path, title)


def plot_reward_model_curves(log_history: Sequence[dict[str, Any]], path: str,
                             title: str = "Reward model training") -> str | None:
    """``trl.RewardTrainer``'s loss and pairwise accuracy / margin on the training batches against the step."""
    return _curves(log_history, [("Bradley-Terry loss", ["loss"], {}),
                                 ("training batch", ["accuracy", "margin"], {"accuracy": "pairwise accuracy",
                                                                              "margin": "mean r_chosen - r_rejected"})],
                   path, title)

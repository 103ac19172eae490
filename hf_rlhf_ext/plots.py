"""Plots of the experiments' numbers (matplotlib, Agg backend: no display needed). Each function takes the numbers an
experiment returned and writes one PNG; nothing here computes a result."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["plot_best_of_n_curve", "plot_distillation"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_best_of_n_curve(curve: Any, path: str) -> str:
    """Every reward of the best of n against sqrt(KL_bon), n annotated, and the fitted Gao best-of-N form on the gold
    gain (shifted back by the n = 1 gold so it sits on the gold points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    d = curve.column("sqrt_kl")
    names = [k for k in curve.points[0] if k not in ("n", "kl", "sqrt_kl")]
    for name in names:
        ax.plot(d, curve.column(name), marker="o", label=name)
    for x, n, y in zip(d, curve.column("n"), curve.column(names[0])):
        ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if curve.fit is not None:
        base = curve.points[0][curve.gold]
        xs = [max(d) * i / 100 for i in range(101)]
        ax.plot(xs, [base + y for y in curve.fit.predict(xs)], "--", color="gray",
                label=f"Gao fit: d({curve.fit.alpha:.2f} - {curve.fit.beta:.2f} d), R²={curve.fit.r2:.2f}")
    ax.set_xlabel("sqrt(KL_bon) = sqrt(ln N - (N-1)/N)")
    ax.set_ylabel("mean reward of the best of N (held-out)")
    ax.set_title(f"Best-of-N, selected by {curve.select}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""REINFORCE baselines over a whole training run: ``none`` / ``running_mean`` / ``group``, several seeds each, on a
reward with a constant offset.

Why: a baseline b leaves the expected policy gradient unchanged and is worth having only if it lowers the variance
of the estimate. With R = proxy + offset (offset 5 by default), b = 0 multiplies every ∇log π by ≈ 5, so the useful
signal is a small difference between large pushes. This module measures that over training rather than on one batch:
``GradientVarianceCallback`` every ``grad_variance_every`` steps (tr Cov of the gradient over disjoint slices of the
generation batch), and the training reward (the optimised reward minus the offset) at every logging step.

What the baselines are (``trainers.reinforce``): ``running_mean`` is a bias-corrected exponential moving average of
the mean reward of *past* batches (on the first batch, which has no past, the batch's own mean); ``group`` is the
leave-one-out mean of the other completions of the same prompt (RLOO).

Runs go one after the other in this process (no memory is measured here). Each run's console output and
``log_history.jsonl`` land in ``<output_dir>/runs/<baseline>_seed<k>/``; ``baselines.md``, ``baselines.png`` and
``metrics.json`` in ``<output_dir>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

from ..plots import plot_baselines
from ..results import experiment_file_lines, write_experiment_files
from ..run.spec import RLScriptArguments

__all__ = [
    "BaselinesArguments",
    "LAB_CONFIG",
    "offset_reward",
    "parse_baselines_argv",
    "BaselinesSpec",
    "parse_baselines_spec",
    "run_baseline",
    "run_baselines",
    "summarise",
    "report_markdown",
    "write_report",
]

BASELINE_CHOICES = ("none", "running_mean", "group")
RESERVED_FLAGS = {"baseline": "--baselines", "seed": "--seeds"}

# The lab run (2 CPU cores: ≈ 0.2 s per step) is written once, in this shipped YAML file (recipes/configs/): the
# parser's defaults. A --config file or flags override any of these.
LAB_CONFIG = "reinforce_baselines_lab.yaml"


@dataclass
class BaselinesArguments(RLScriptArguments):
    """What the study varies and measures; every other flag is a ``ReinforceConfig`` flag, the same for every run.

    Args:
        baselines: the baselines compared (each once per seed).
        seeds: training seeds.
        reward_offset: a constant added to every reward (one more reward function, weight 1). It changes no expected
            gradient, only the variance without a baseline.
        grad_variance_every: measure the gradient variance every this many optimizer steps (from step 0).
        grad_variance_estimates: disjoint slices of the generation batch per measurement (K >= 2).
        final_window: the final reward is the mean training reward of the last this many logged steps.
    """

    baselines: list[str] = field(default_factory=lambda: list(BASELINE_CHOICES), metadata={"help": "Baselines."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    reward_offset: float = field(default=5.0, metadata={"help": "Constant added to every reward."})
    grad_variance_every: int = field(default=2, metadata={"help": "Steps between gradient-variance measurements."})
    grad_variance_estimates: int = field(default=4, metadata={"help": "Slices per measurement (K >= 2)."})
    final_window: int = field(default=10, metadata={"help": "Logged steps averaged into the final reward."})

    def __post_init__(self):
        super().__post_init__()
        unknown = [b for b in self.baselines if b not in BASELINE_CHOICES]
        if not self.baselines or unknown or len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines must be distinct values among {list(BASELINE_CHOICES)}, got {self.baselines}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}.")
        if self.grad_variance_every < 1:
            raise ValueError(f"grad_variance_every must be >= 1, got {self.grad_variance_every}.")
        if self.final_window < 1:
            raise ValueError(f"final_window must be >= 1, got {self.final_window}.")


def offset_reward(value: float) -> Callable[..., list[float]]:
    """A reward function that returns ``value`` for every completion (logged as ``rewards/reward_offset/mean``)."""

    def reward_offset(prompts=None, completions=None, **kwargs) -> list[float]:
        return [float(value)] * len(completions)

    return reward_offset


def add_reward_offset(setup: Any, training_args: Any, value: float) -> None:
    """Adds ``offset_reward(value)`` to a run's optimised rewards (weight 1); nothing when ``value`` is 0."""
    if value:
        setup.reward_funcs.append(offset_reward(value))
        setup.reward_weights.append(1.0)
        training_args.reward_weights = setup.reward_weights


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
def make_baselines_parser():
    from ..run.parsing import make_recipe_parser, read_shipped_config
    from ..trainers.reinforce import ReinforceConfig

    return make_recipe_parser(BaselinesArguments, ReinforceConfig, read_shipped_config(LAB_CONFIG))


def parse_baselines_argv(argv: Sequence[str], baseline: str | None = None, seed: int | None = None):
    """(study args, ``ReinforceConfig``, ``ModelConfig``) from ``parse_baselines_spec``; with ``baseline`` and
    ``seed``: that run's config."""
    spec = parse_baselines_spec(argv)
    run = spec if baseline is None else dataclasses.replace(spec, baseline=baseline, seed=seed)
    return spec.study, run.training_args(), spec.model


def run_dir(output_dir: str, baseline: str, seed: int) -> str:
    return os.path.join(output_dir, "runs", f"{baseline}_seed{seed}")


@dataclass(frozen=True)
class BaselinesSpec:
    """The study as a value: its command line parsed once. With ``baseline`` and ``seed`` it is one run,
    ``dataclasses.replace(spec, baseline=..., seed=...)``, which trains from this object alone (``run_baseline``).

    Args:
        study: the parsed ``BaselinesArguments``. model: the parsed ``ModelConfig``.
        training: the keyword arguments the ``ReinforceConfig`` is built from; ``training_args()`` builds a run's
            config with its baseline, seed and directory, as ``parse_baselines_argv`` would.
    """

    study: BaselinesArguments
    training: dict[str, Any]
    model: Any
    baseline: str | None = None
    seed: int | None = None

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    def runs(self) -> list[BaselinesSpec]:
        """Every (baseline, seed), seed-major."""
        return [dataclasses.replace(self, baseline=b, seed=int(s))
                for s in self.study.seeds for b in self.study.baselines]

    def training_args(self) -> Any:
        """The study's ``ReinforceConfig``, or a run's (a run never pushes: the study's folder is pushed once)."""
        from ..trainers.reinforce import ReinforceConfig

        kwargs = dict(self.training)
        if self.baseline is not None or self.seed is not None:
            if self.baseline is None or self.seed is None:
                raise ValueError(f"A run needs a baseline and a seed, got {self.baseline!r}, {self.seed!r}.")
            kwargs.update({"baseline": self.baseline, "seed": int(self.seed), "push_to_hub": False,
                           "output_dir": run_dir(self.output_dir, self.baseline, self.seed)})
        return ReinforceConfig(**kwargs)


def parse_baselines_spec(argv: Sequence[str]) -> BaselinesSpec:
    """The study of a command line as a ``BaselinesSpec``; every argument error is raised here, before any run."""
    from .compare import given_keys
    from .grid import parse_keeping_kwargs

    reserved = sorted(given_keys(argv) & set(RESERVED_FLAGS))
    if reserved:
        raise ValueError(f"--{reserved[0]} is set per run by the study; use {RESERVED_FLAGS[reserved[0]]} instead.")
    (study, _, model), training = parse_keeping_kwargs(make_baselines_parser(), argv, 1)
    spec = BaselinesSpec(study=study, training=training, model=model)
    for baseline in study.baselines:  # each baseline's own checks
        dataclasses.replace(spec, baseline=baseline, seed=study.seeds[0]).training_args()
    return spec


# ----------------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------------
def run_baseline(run: BaselinesSpec | Sequence[str], baseline: str | None = None,
                 seed: int | None = None) -> dict[str, Any]:
    """Trains REINFORCE with one baseline and seed; returns its reward curve and gradient-variance measurements.
    ``run``: a run of a ``BaselinesSpec`` (``baseline`` / ``seed``, when given, replace its own), or the study's
    command line, parsed here."""
    import copy

    from ..callbacks.grad_variance import GradientVarianceCallback
    from ..run.build import end_trainer, make_trainer, prepare_rl_run
    from ..trainers.reinforce import ReinforceTrainer

    if not isinstance(run, BaselinesSpec):
        run = parse_baselines_spec(run)
    run = dataclasses.replace(run, **{k: v for k, v in (("baseline", baseline), ("seed", seed)) if v is not None})
    study, training_args, model_args = copy.deepcopy(run.study), run.training_args(), copy.deepcopy(run.model)
    setup = prepare_rl_run(study, training_args, model_args)
    add_reward_offset(setup, training_args, study.reward_offset)
    trainer = make_trainer(ReinforceTrainer, setup, training_args)
    variance = GradientVarianceCallback(
        trainer, every_n_steps=study.grad_variance_every, num_estimates=study.grad_variance_estimates
    )
    trainer.add_callback(variance)
    trainer.train()
    end_trainer(trainer)
    return run_result(run.baseline, run.seed, study, trainer.state.log_history, variance.measurements)


def run_result(baseline: str, seed: int, study: BaselinesArguments, log_history: list[dict],
               measurements: Sequence[Any]) -> dict[str, Any]:
    """One run's row: the training reward without the offset per logged step, the gold reward where it was tracked,
    every gradient-variance measurement, their median and the final reward."""
    curve = [{"step": h["step"], "reward": h["reward"] - study.reward_offset, "gold": h.get("rewards/gold_reward/mean")}
             for h in log_history if "reward" in h]
    variance = [{"step": m.step, "total": m.total, "snr": m.snr} for m in measurements]
    tail = curve[-study.final_window:]
    golds = [p["gold"] for p in tail if p["gold"] is not None]
    return {
        "baseline": baseline, "seed": seed, "reward_offset": study.reward_offset, "curve": curve,
        "grad_variance": variance, "median_grad_variance": statistics.median(v["total"] for v in variance),
        "final_reward": statistics.fmean(p["reward"] for p in tail),
        "final_gold": statistics.fmean(golds) if golds else None,
    }


def run_logged(run: BaselinesSpec) -> dict[str, Any]:
    """``run_baseline`` with its console output (the trainer's log lines) in ``<run dir>/train.log``."""
    out = run_dir(run.output_dir, run.baseline, run.seed)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return run_baseline(run)


# ----------------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------------
def run_baselines(argv: Sequence[str], progress: bool = True, runner: Callable | None = None) -> dict[str, Any]:
    """Runs every (baseline, seed) in this process, one after the other (``runner(run)`` if given), then writes the
    report. Returns the metrics written. The command line is parsed once, here; each run is a ``BaselinesSpec``."""
    from tqdm.auto import tqdm

    from .grid import run_grid

    argv = list(argv)
    spec = parse_baselines_spec(argv)  # every argument error before the first run
    study, runs = spec.study, spec.runs()
    with tqdm(total=len(runs), desc="baseline runs", disable=not progress) as bar:
        results = run_grid(runs, runner or run_logged, on_result=lambda *_: bar.update(1),
                           name=lambda r: f"{r.baseline} seed {r.seed}")
    metrics = summarise(results)
    metrics["settings"] = {"argv": argv, "seeds": study.seeds, "reward_offset": study.reward_offset,
                           "grad_variance_every": study.grad_variance_every,
                           "grad_variance_estimates": study.grad_variance_estimates, "final_window": study.final_window}
    write_report(spec.output_dir, results, metrics)
    return metrics


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per baseline: the median gradient variance of each run and its median / min / max over seeds, the ratio of
    the medians to ``none``'s, the final reward and gold over seeds, and the curves (mean, min, max over seeds)."""
    from .compare import spread

    out: dict[str, Any] = {"baselines": {}, "runs": list(results)}
    for name in dict.fromkeys(r["baseline"] for r in results):
        runs = [r for r in results if r["baseline"] == name]
        medians = [r["median_grad_variance"] for r in runs]
        out["baselines"][name] = {
            "num_runs": len(runs),
            "median_grad_variance": {**spread(medians), "median": statistics.median(medians)},
            "final_reward": spread([r["final_reward"] for r in runs]),
            "final_gold": spread([r["final_gold"] for r in runs]),
            "reward_curve": band([r["curve"] for r in runs], "reward"),
            "grad_variance_curve": band([r["grad_variance"] for r in runs], "total"),
        }
    if "none" in out["baselines"]:
        none = out["baselines"]["none"]["median_grad_variance"]["median"]
        for b in out["baselines"].values():
            b["variance_vs_none"] = b["median_grad_variance"]["median"] / none if none else None
    return out


def band(curves: Sequence[Sequence[dict[str, Any]]], key: str) -> dict[str, list]:
    """Mean, min and max over runs of ``key`` at each step present in every run."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
    at = [[next(p[key] for p in c if p["step"] == s) for c in curves] for s in steps]
    return {"step": steps, "mean": [statistics.fmean(v) for v in at], "min": [min(v) for v in at],
            "max": [max(v) for v in at]}


def _sci(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def report_markdown(metrics: dict[str, Any]) -> str:
    """One table: a row per baseline."""
    s = metrics["settings"]
    lines = [
        "| baseline | seeds | median gradient variance (min–max over seeds) | ÷ none | final reward | final gold |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in metrics["baselines"].items():
        v, r, g = b["median_grad_variance"], b["final_reward"], b["final_gold"]
        ratio = b.get("variance_vs_none")
        lines.append(
            f"| {name} | {b['num_runs']} | {_sci(v['median'])} ({_sci(v['min'])}–{_sci(v['max'])}) "
            f"| {'–' if ratio is None else f'{ratio:.3f}'} | {_pm(r)} | {_pm(g)} |"
        )
    lines += ["", f"Reward = proxy + {s['reward_offset']:g}. Gradient variance: tr Cov of the policy gradient over "
              f"{s['grad_variance_estimates']} disjoint slices of the generation batch, measured every "
              f"{s['grad_variance_every']} steps; each run's median, then the median over seeds. Final reward: the "
              f"training reward without the offset, mean of the last {s['final_window']} logged steps, mean ± "
              "standard deviation over seeds; final gold: the lab's gold reward of the same batches (tracked, not "
              "optimised)."]
    return "\n".join(lines) + "\n"


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:+.3f}" + (f" ± {s['std']:.3f}" if s["n"] > 1 else "")


def write_report(output_dir: str, results: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, str]:
    """``baselines.md`` (the table), ``baselines.png`` (reward and variance curves) and ``metrics.json``."""
    return write_experiment_files(output_dir, "baselines", report_markdown(metrics), partial(plot_baselines, metrics),
                                  metrics)


def _summary_row(name: str, b: dict[str, Any]) -> str:
    ratio = b.get("variance_vs_none")
    return (f"{name:<13} median gradient variance {_sci(b['median_grad_variance']['median'])}"
            f"{'' if ratio is None else f' ({ratio:.3f} × none)'}, final reward {_pm(b['final_reward'])}")


def summary_lines(output_dir: str, metrics: dict[str, Any]) -> str:
    """A few console lines: each baseline's gradient variance and final reward, and where the files are."""
    rows = [_summary_row(name, b) for name, b in metrics["baselines"].items()]
    return "\n".join(["", *rows, *experiment_file_lines(output_dir, "baselines", "runs/<baseline>_seed<k>/")])

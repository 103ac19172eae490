"""The β sweep: the same RL run (PPO or GRPO) once per KL coefficient β and seed, measured on held-out prompts, and
the Gao, Schulman & Hilton (2022, arXiv 2210.10760) over-optimisation form fitted to the result.

Why a sweep: one run shows one trajectory; the KL leash is a trade-off only visible across β. Each point records, at
step 0 (the SFT policy) and every ``eval_every`` steps, the sequence-level KL to the reference (k3, as
``KLToReferenceCallback`` measures it), and the proxy and gold rewards of the *same* fresh held-out samples.

The command line is parsed once, into a ``SweepSpec``; a point is ``dataclasses.replace(spec, beta=..., seed=...)`` and
trains from that object alone with the recipe plumbing (``run.build.prepare_rl_run`` / ``make_trainer``), in this
process, in worker processes or as Ray tasks (``grid.run_grid``): a point's result depends only on its (β, seed) and
the config, never on run order. Each finished point is one JSON line of
``<output_dir>/results.jsonl``; a rerun skips the points already there (a truncated last line is dropped) and refuses a
file written with another config (the first line holds its fingerprint).

At the end ``sweep.md``, ``frontier.png`` and ``metrics.json`` are written from ``results.jsonl`` alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..callbacks.kl_reference import KLToReferenceCallback, measure_sequence_kl
from ..run.parsing import RecipeParser, check_lab_keys, cpu_parser_defaults
from ..run.spec import RLScriptArguments
from .grid import BACKENDS, append_result, config_fingerprint, parse_keeping_kwargs, read_results  # noqa: F401

__all__ = [
    "SweepArguments",
    "LAB_CONFIGS",
    "lab_defaults",
    "HeldOutProbeCallback",
    "make_sweep_parser",
    "parse_sweep_argv",
    "SweepSpec",
    "parse_sweep_spec",
    "run_point",
    "run_sweep",
    "run_spec",
    "spearman",
    "summarise",
    "write_report",
    "RESULTS_FILE",
]

RESULTS_FILE = "results.jsonl"
TRAINERS = ("grpo", "ppo")
BETA_FIELD = {"grpo": "beta", "ppo": "kl_coef"}
DEFAULT_BETAS = [0.0, 0.005, 0.02, 0.05, 0.2, 1.0]

# The lab settings per trainer live in these shipped YAML files (recipes/configs/), their one copy: the parser's
# defaults, overridden by flags and --config. A GRPO point: ≈ 20 s on one core. 256 held-out completions per
# measurement: the gold of one completion has a standard deviation of ≈ 0.55, so a mean over 64 moves by ±0.07 between
# measurements — as much as the hump itself; 256 halve that.
LAB_CONFIGS = {"grpo": "beta_sweep_lab.yaml", "ppo": "beta_sweep_ppo_lab.yaml"}


def lab_defaults(trainer: str) -> dict[str, Any]:
    """The sweep's lab settings for ``trainer``, read from its shipped YAML file."""
    from ..run.parsing import read_shipped_config

    if trainer not in TRAINERS:
        raise ValueError(f"--trainer must be one of {TRAINERS}, got {trainer!r}.")
    return read_shipped_config(LAB_CONFIGS[trainer])


@dataclass
class SweepArguments:
    """What the sweep varies and how it runs; everything else is the trainer's own config, shared by all points.

    Args:
        trainer: "grpo" (TRL's ``GRPOTrainer``, β = ``beta``) or "ppo" (our ``PPOTrainer``, β = ``kl_coef``).
        betas: the grid of β. seeds: training seeds (each β runs once per seed).
        max_parallel: points running at once (local backend). backend: "local" (processes) or "ray" (one task per
            point). cpus_per_point: torch threads of a point (and its Ray CPUs). gpus_per_point: its Ray GPUs.
        eval_every: steps between held-out measurements (step 0 and the last step are always measured); the held-out
            completions per measurement are ``num_eval_prompts`` (test prompts, cycled).
        fit_min_kl: points with a smaller KL are left out of the Gao fit (their gain is noise divided by a tiny d).
    """

    trainer: str = field(default="grpo", metadata={"help": "grpo or ppo."})
    betas: list[float] = field(default_factory=lambda: list(DEFAULT_BETAS), metadata={"help": "The β grid."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds (one run per β and seed)."})
    max_parallel: int = field(default=1, metadata={"help": "Points running at once (local backend)."})
    backend: str = field(default="local", metadata={"help": "local or ray."})
    cpus_per_point: int = field(default=1, metadata={"help": "torch threads per point (and Ray CPUs)."})
    gpus_per_point: float = field(default=0.0, metadata={"help": "Ray GPUs per point."})
    eval_every: int = field(default=5, metadata={"help": "Steps between held-out measurements."})
    fit_min_kl: float = field(default=0.01, metadata={"help": "Smallest KL (nats) of a point used in the Gao fit."})

    def __post_init__(self):
        validate_sweep(self)


def validate_sweep(sweep: SweepArguments) -> None:
    """Clear errors before any training."""
    if sweep.trainer not in TRAINERS:
        raise ValueError(f"--trainer must be one of {TRAINERS}, got {sweep.trainer!r}.")
    if sweep.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {sweep.backend!r}.")
    if not sweep.betas:
        raise ValueError("--betas is empty: give at least one β.")
    bad = [b for b in sweep.betas if not (math.isfinite(float(b)) and float(b) >= 0)]
    if bad:
        raise ValueError(f"β must be finite and >= 0, got {bad}.")
    if len(set(map(float, sweep.betas))) != len(sweep.betas) or len(set(sweep.seeds)) != len(sweep.seeds):
        raise ValueError(f"Repeated β or seed in the grid: betas {sweep.betas}, seeds {sweep.seeds}.")
    if not sweep.seeds:
        raise ValueError("--seeds is empty: give at least one seed.")
    for name in ("max_parallel", "cpus_per_point", "eval_every"):
        if getattr(sweep, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(sweep, name)}.")
    if sweep.gpus_per_point < 0 or sweep.fit_min_kl < 0:
        raise ValueError("--gpus_per_point and --fit_min_kl must be >= 0.")


# ----------------------------------------------------------------------------------------------------------------------
# Parsing: once, into a SweepSpec; a point builds its config from the same keyword arguments the parser used
# ----------------------------------------------------------------------------------------------------------------------
def config_class(trainer: str) -> type:
    if trainer == "ppo":
        from ..trainers.ppo_config import PPOConfig

        return PPOConfig
    if trainer == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    raise ValueError(f"--trainer must be one of {TRAINERS}, got {trainer!r}.")


def trainer_from_argv(argv: Sequence[str]) -> str:
    """The ``--trainer`` of a command line (or of its ``--config`` file); it decides the config class to parse."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
        if arg == "--trainer" and i + 1 < len(argv):
            return argv[i + 1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            return str((yaml.safe_load(f) or {}).get("trainer", "grpo"))
    return "grpo"


def make_sweep_parser(trainer: str):
    """A ``TrlParser`` over (sweep, script, trainer config, ``ModelConfig``) with the lab defaults of ``trainer`` (on
    the lab only: ``RecipeParser``)."""
    from trl import ModelConfig

    defaults = lab_defaults(trainer)
    classes = (SweepArguments, RLScriptArguments, config_class(trainer), ModelConfig)
    check_lab_keys(defaults, classes)
    parser = RecipeParser(classes, lab_defaults=defaults)
    parser.set_defaults(**cpu_parser_defaults())
    return parser


def parse_sweep_argv(argv: Sequence[str]) -> tuple[Any, Any, Any, Any]:
    """(sweep, script, training, model) arguments of a sweep command line."""
    return make_sweep_parser(trainer_from_argv(argv)).parse_args_and_config(args=list(argv))


@dataclass(frozen=True)
class SweepSpec:
    """A sweep as a value: its command line parsed once. With ``beta`` and ``seed`` it is one point of the sweep,
    ``dataclasses.replace(spec, beta=..., seed=...)``, and a point trains from this object alone (``run_point``).

    Args:
        trainer: "grpo" or "ppo". sweep, script, model: the parsed ``SweepArguments``, ``RLScriptArguments`` and
            ``ModelConfig``.
        training: the keyword arguments the trainer's config (``GRPOConfig`` / ``PPOConfig``) is built from, as the
            parser built it; ``training_args()`` builds a point's own config from them with its β, seed and directory
            (exactly what a parse of the command line with those flags added gives).
        rewards: reward functions handed over as values, by the dotted path in ``script.reward_funcs`` they stand in
            for: the run trains on the value (e.g. an ensemble objective with its members), not on the path's function.
        probe_ensemble: reward-model directories whose disagreement on the held-out samples is measured beside
            proxy and gold (``HeldOutProbeCallback``'s ``ensemble``); never optimised.
    """

    trainer: str
    sweep: SweepArguments
    script: Any
    training: dict[str, Any]
    model: Any
    beta: float | None = None
    seed: int | None = None
    rewards: dict[str, Callable] = field(default_factory=dict)
    probe_ensemble: tuple[str, ...] = ()

    @property
    def output_dir(self) -> str:
        """The sweep's directory; a point's is ``point_dir`` inside it."""
        return self.training["output_dir"]

    def points(self) -> list[SweepSpec]:
        """The grid: one point per β and seed, β-major."""
        return [dataclasses.replace(self, beta=float(b), seed=int(s))
                for b in self.sweep.betas for s in self.sweep.seeds]

    def training_args(self) -> Any:
        """The trainer's config: the sweep's, or, for a point, the point's (its seed, β, directory; it never pushes:
        the sweep's folder is pushed once, at the end)."""
        kwargs = dict(self.training)
        if self.beta is not None or self.seed is not None:
            if self.beta is None or self.seed is None:
                raise ValueError(f"A point needs both β and seed, got beta={self.beta}, seed={self.seed}.")
            kwargs.update({"seed": int(self.seed), BETA_FIELD[self.trainer]: float(self.beta), "push_to_hub": False,
                           "output_dir": point_dir(self.output_dir, self.trainer, self.beta, self.seed)})
        return config_class(self.trainer)(**kwargs)


def parse_sweep_spec(argv: Sequence[str]) -> SweepSpec:
    """The sweep of a command line as a ``SweepSpec`` (``--config`` and ``--output_dir`` made absolute, so that a
    worker in another directory reads and writes the same files)."""
    argv = _absolute_paths(argv)
    (sweep, script, _, model), training = parse_keeping_kwargs(make_sweep_parser(trainer_from_argv(argv)), argv, 2)
    return SweepSpec(trainer=sweep.trainer, sweep=sweep, script=script, training=training, model=model)


def _absolute_paths(argv: Sequence[str]) -> list[str]:
    """``--config`` and ``--output_dir`` made absolute, so that workers in another directory read the same files."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--config", "--output_dir"):
            out[i + 1] = os.path.abspath(out[i + 1])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------------------------------
class HeldOutProbeCallback(KLToReferenceCallback):
    """``KLToReferenceCallback`` that also scores its held-out samples with the proxy and the gold reward, so that
    KL, proxy and gold of a measurement come from the same completions (one sampling instead of two). With
    ``ensemble`` (member reward functions) the same samples are also scored by each member, and their disagreement
    (``ensemble_std`` of the over-optimisation monitor) is kept as ``sweep/ensemble_std``, with the seconds that
    scoring took (``sweep/ensemble_seconds``: its cost)."""

    def __init__(self, trainer: Any, eval_prompts: Any, proxy: Sequence[tuple[Callable, float]], gold: Callable,
                 every_n_steps: int, seed: int = 1234, ensemble: Sequence[Callable] | None = None) -> None:
        super().__init__(trainer, eval_prompts, every_n_steps=every_n_steps, num_samples=len(eval_prompts),
                         allow_reference_copy=True, seed=seed)
        self.proxy, self.gold, self.ensemble = list(proxy), gold, list(ensemble or [])

    def measure(self, step: int) -> dict[str, float]:
        sampler = self.sampler
        with sampler.policy_for_generation() as policy:
            batch = sampler.sample(policy, step, full_log_probs=True)  # log π for the exact KL, read off the sampler
            scores = sampler.score([f for f, _ in self.proxy] + [self.gold], batch)
            stats = measure_sequence_kl(sampler, self.reference, step, batch=batch, policy=policy)
            if self.ensemble:
                stats.update(self._disagreement(batch))
        scores = [sampler.gather(s) for s in scores]
        proxy = [sum(w * s[i] for (_, w), s in zip(self.proxy, scores)) for i in range(len(scores[-1]))]
        stats["sweep/proxy"], stats["sweep/gold"] = _finite_mean(proxy), _finite_mean(scores[-1])
        self.history.append({"step": int(step), **stats})
        self._last_step = int(step)
        return stats

    def _disagreement(self, batch: Any) -> dict[str, float | None]:
        from ..callbacks.overoptimization import ensemble_std

        start = time.perf_counter()
        members = [self.sampler.gather(m) for m in self.sampler.score(self.ensemble, batch)]
        return {"sweep/ensemble_std": ensemble_std(members), "sweep/ensemble_seconds": time.perf_counter() - start}

    def on_train_end(self, args, state, control, **kwargs):
        if self._last_step != state.global_step:  # the last step is part of the curve whatever eval_every is
            self.measure(state.global_step)


def _finite_mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _split_rewards(setup: Any) -> tuple[list[tuple[Callable, float]], Callable]:
    """(weighted proxy functions, gold function): the gold is the one reward function with weight 0."""
    pairs = list(zip(setup.reward_funcs, setup.reward_weights))
    gold = [f for f, w in pairs if w == 0]
    if len(gold) != 1:
        raise ValueError(
            "The sweep needs exactly one gold reward (or held-out judge): a reward function with weight 0 "
            f"(on the lab the gold reward is added for you); got {len(gold)} with weight 0."
        )
    return [(f, float(w)) for f, w in pairs if w != 0], gold[0]


def point_dir(output_dir: str, trainer: str, beta: float, seed: int) -> str:
    return os.path.join(output_dir, "points", f"{trainer}_beta{float(beta):g}_seed{seed}")


def run_point(point: SweepSpec | Sequence[str], beta: float | None = None, seed: int | None = None) -> dict[str, Any]:
    """Trains one point of a sweep and returns its result line (no files but its own dir). ``point``: a point of a
    ``SweepSpec`` (``beta`` / ``seed``, when given, replace its own), or the sweep's command line, parsed here."""
    import copy

    import torch

    from ..run.build import end_trainer, make_trainer, prepare_rl_run

    start = time.perf_counter()
    if not isinstance(point, SweepSpec):
        point = parse_sweep_spec(point)
    point = dataclasses.replace(point, **{k: v for k, v in (("beta", beta), ("seed", seed)) if v is not None})
    training_args = point.training_args()
    script_args, model_args = copy.deepcopy(point.script), copy.deepcopy(point.model)  # a run may change them
    threads = torch.get_num_threads()
    torch.set_num_threads(point.sweep.cpus_per_point)
    try:
        setup = prepare_rl_run(script_args, training_args, model_args)
        if not setup.eval_prompts:
            raise ValueError("The sweep measures on held-out prompts: give a test split and --num_eval_prompts > 0.")
        _hand_over_rewards(setup, point.rewards)
        proxy, gold = _split_rewards(setup)
        trainer = make_trainer(_trainer_class(point.trainer), setup, training_args)
        probe = HeldOutProbeCallback(trainer, setup.eval_prompts, proxy, gold, every_n_steps=point.sweep.eval_every,
                                     ensemble=_probe_members(point.probe_ensemble))
        trainer.add_callback(probe)
        trainer.train()
        end_trainer(trainer)
    finally:
        torch.set_num_threads(threads)
    curve = [_curve_point(h) for h in probe.history]
    return {"trainer": point.trainer, "beta": float(point.beta), "seed": int(point.seed), **curve_summary(curve),
            "curve": curve, "seconds": time.perf_counter() - start}


def _curve_point(h: dict[str, Any]) -> dict[str, Any]:
    """One measurement of a point's curve: the KL as k3 (``kl``), k1 and the exact sum over the vocabulary, proxy and
    gold; the ensemble's disagreement and its scoring seconds when the probe had an ensemble."""
    point = {"step": h["step"], "kl": h["kl_ref/k3_seq"], "kl_k1": h["kl_ref/k1_seq"],
             "kl_exact": h.get("kl_ref/exact_seq"), "proxy": h["sweep/proxy"], "gold": h["sweep/gold"]}
    if "sweep/ensemble_std" in h:
        point |= {"ensemble_std": h["sweep/ensemble_std"], "ensemble_seconds": h["sweep/ensemble_seconds"]}
    return point


def _probe_members(paths: Sequence[str]) -> list[Callable]:
    """The reward models the probe scores its samples with besides proxy and gold (none: an empty list)."""
    from ..rewards import RewardModelFunction

    return [RewardModelFunction(p, name=f"member_{i}") for i, p in enumerate(paths)]


def _hand_over_rewards(setup: Any, rewards: dict[str, Callable]) -> None:
    """The reward functions handed over as values replace the functions of the dotted paths they stand in for."""
    if not rewards:
        return
    from ..rewards import import_reward_func

    values = {id(import_reward_func(path)): value for path, value in rewards.items()}
    setup.reward_funcs = [values.get(id(f), f) for f in setup.reward_funcs]


def _trainer_class(trainer: str) -> type:
    if trainer == "ppo":
        from ..trainers.ppo import PPOTrainer

        return PPOTrainer
    from trl import GRPOTrainer

    return GRPOTrainer


def curve_summary(curve: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Final values, the reference (step 0) values and the gold peak (highest measured gold) of one point's curve."""
    first, last = curve[0], curve[-1]
    peak = max(curve, key=lambda p: p["gold"] if p["gold"] is not None else -math.inf)
    return {
        "final_kl": last["kl"], "final_gold": last["gold"], "final_proxy": last["proxy"],
        "ref_gold": first["gold"], "ref_proxy": first["proxy"],
        "peak_gold": peak["gold"], "peak_step": peak["step"], "proxy_at_peak": peak["proxy"], "kl_at_peak": peak["kl"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# results.jsonl (``grid.ResultsFile``): a header line with the config fingerprint, then one line per finished point
# ----------------------------------------------------------------------------------------------------------------------
# Settings that cannot change a point's result: where it writes, how it logs, and what the sweep varies per point.
_NOT_IN_FINGERPRINT = {
    "output_dir", "logging_dir", "run_name", "seed", "beta", "kl_coef", "disable_tqdm", "report_to", "logging_steps",
    "logging_first_step", "logging_strategy", "push_to_hub", "hub_model_id", "hub_token", "hub_strategy",
    "hub_private_repo", "betas", "seeds", "max_parallel", "backend", "gpus_per_point", "fit_min_kl",
}


def sweep_config(sweep: Any, script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """Everything a point's result depends on besides (β, seed), as plain JSON values."""
    from ..results import _jsonable

    parts = {"sweep": asdict(sweep), "script": asdict(script_args), "training": training_args.to_dict(),
             "model": asdict(model_args)}
    return _jsonable({name: {k: v for k, v in sorted(part.items()) if k not in _NOT_IN_FINGERPRINT}
                      for name, part in parts.items()})


def _key(trainer: str, beta: float, seed: int) -> tuple[str, float, int]:
    return trainer, float(beta), int(seed)


def _result_key(result: dict[str, Any]) -> tuple[str, float, int]:
    return _key(result["trainer"], result["beta"], result["seed"])


def _point_key(point: SweepSpec) -> tuple[str, float, int]:
    return _key(point.trainer, point.beta, point.seed)


# ----------------------------------------------------------------------------------------------------------------------
# Running the points (``grid.run_grid``)
# ----------------------------------------------------------------------------------------------------------------------
#: imported once by the fork server, so that each worker starts as a fork of a process that already has them (≈ 4 s
#: of imports per spawned worker otherwise, against ≈ 9 s per lab point)
_WORKER_PRELOAD = ["torch", "transformers", "trl", "hf_rlhf_ext.experiments.sweeps", "hf_rlhf_ext.run.build"]


def _point_job(point: SweepSpec) -> dict[str, Any]:
    return run_point(point, point.beta, point.seed)


def run_sweep(argv: Sequence[str], progress: bool = True) -> dict[str, Any]:
    """Runs the points of the sweep of ``argv`` not yet in ``results.jsonl``, then writes the report. Returns
    ``metrics.json``. The command line is parsed once, here (``run_spec`` runs a ``SweepSpec``)."""
    return run_spec(parse_sweep_spec(argv), progress=progress)


def run_spec(spec: SweepSpec, progress: bool = True) -> dict[str, Any]:
    """Runs the points of ``spec`` (``spec.points()``) not yet in ``results.jsonl``, then writes the report."""
    from tqdm.auto import tqdm

    from .grid import ResultsFile, run_grid

    start = time.perf_counter()
    sweep, out = spec.sweep, spec.output_dir
    store = ResultsFile(os.path.join(out, RESULTS_FILE),
                        sweep_config(sweep, spec.script, spec.training_args(), spec.model), key=_result_key)
    points = spec.points()
    todo = [p for p in points if _point_key(p) not in store.done]
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"β sweep ({sweep.trainer})", unit="point",
               disable=not progress)
    try:
        results = run_grid(points, _point_job, backend=sweep.backend, max_parallel=sweep.max_parallel, results=store,
                           job_key=_point_key, on_result=lambda *_: bar.update(1), preload=_WORKER_PRELOAD,
                           cpus_per_job=sweep.cpus_per_point, gpus_per_job=sweep.gpus_per_point,
                           name=lambda p: f"{p.trainer} β={p.beta:g} seed={p.seed}")
    finally:
        bar.close()
    metrics = summarise(results, fit_min_kl=sweep.fit_min_kl)
    metrics["seconds"] = {"this_run": time.perf_counter() - start, "points_total": sum(r["seconds"] for r in results),
                          "points_run_now": len(todo)}
    write_report(out, results, metrics)
    print(summary_lines(out, metrics))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Analysis: per-β summaries, Spearman ρ(β, KL), the hump at the lowest β, the Gao fit
# ----------------------------------------------------------------------------------------------------------------------
def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks; None when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values for {len(y)} y values.")
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


_SUMMARY_FIELDS = ("final_kl", "final_proxy", "final_gold", "peak_gold", "peak_step", "proxy_at_peak", "ref_gold")


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def per_beta(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and min–max over seeds of each point summary, one entry per β (ascending)."""
    betas = sorted({float(r["beta"]) for r in results})
    rows = []
    for beta in betas:
        runs = [r for r in results if float(r["beta"]) == beta]
        row = {"beta": beta, "seeds": sorted(r["seed"] for r in runs)}
        row.update({name: _stats([float(r[name]) for r in runs]) for name in _SUMMARY_FIELDS})
        rows.append(row)
    return rows


def fit_points(results: Sequence[dict[str, Any]], min_kl: float) -> list[tuple[float, float]]:
    """(d = sqrt(KL), gold gain over the run's step-0 gold) of every measurement after step 0 with KL >= ``min_kl``."""
    pts = []
    for r in results:
        for p in r["curve"][1:]:
            if p["kl"] is not None and p["gold"] is not None and p["kl"] >= min_kl:
                pts.append((math.sqrt(p["kl"]), p["gold"] - r["ref_gold"]))
    return pts


def _hump(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The over-optimisation signature of one β: proxy ends above its value at the gold peak, gold below its peak."""
    mean = lambda k: sum(float(r[k]) for r in runs) / len(runs)  # noqa: E731
    out = {k: mean(k) for k in ("peak_gold", "peak_step", "final_gold", "proxy_at_peak", "final_proxy", "ref_gold")}
    out["gold_drop"] = out["peak_gold"] - out["final_gold"]
    out["proxy_rise_after_peak"] = out["final_proxy"] - out["proxy_at_peak"]
    out["hump"] = out["gold_drop"] > 0 and out["proxy_rise_after_peak"] > 0
    out["per_seed"] = [{"seed": r["seed"],
                        "hump": r["final_proxy"] > r["proxy_at_peak"] and r["final_gold"] < r["peak_gold"],
                        "peak_step": r["peak_step"]} for r in runs]
    return out


def summarise(results: Sequence[dict[str, Any]], fit_min_kl: float = 0.01) -> dict[str, Any]:
    """The sweep's numbers (``metrics.json``), computed from the result lines alone (order does not matter)."""
    from ..objectives import fit_gao
    from .early_stopping import penalty_vs_early_stopping

    results = sorted(results, key=lambda r: (float(r["beta"]), r["seed"]))
    rows = per_beta(results)
    lowest = [r for r in results if float(r["beta"]) == rows[0]["beta"]]
    highest = [r for r in results if float(r["beta"]) == rows[-1]["beta"]]
    pts = fit_points(results, fit_min_kl)
    try:
        fit = fit_gao([d for d, _ in pts], [g for _, g in pts], form="rl").to_dict()
    except ValueError as err:
        fit = {"error": str(err), "valid": False, "reason": str(err)}
    fit["min_kl"] = fit_min_kl
    return {
        "trainer": results[0]["trainer"], "betas": [row["beta"] for row in rows],
        "seeds": sorted({r["seed"] for r in results}), "per_beta": rows,
        "spearman_beta_final_kl": spearman([row["beta"] for row in rows], [row["final_kl"]["mean"] for row in rows]),
        "spearman_beta_final_kl_all_points": spearman([r["beta"] for r in results], [r["final_kl"] for r in results]),
        "lowest_beta": {"beta": rows[0]["beta"], **_hump(lowest)},
        "highest_beta": {"beta": rows[-1]["beta"], "final_kl": rows[-1]["final_kl"]["mean"],
                         "gold_change": _hump(highest)["final_gold"] - _hump(highest)["ref_gold"]},
        "gao_fit": fit,
        "penalty_vs_early_stopping": penalty_vs_early_stopping(results),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report: sweep.md, frontier.png, metrics.json
# ----------------------------------------------------------------------------------------------------------------------
def _cell(s: dict[str, float], fmt: str = "{:.3f}") -> str:
    if s["min"] == s["max"]:
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"


def report_markdown(metrics: dict[str, Any]) -> str:
    """``sweep.md``: one row per β (mean [min, max] over seeds), ρ, the hump at the lowest β and the fit."""
    lines = [f"# β sweep ({metrics['trainer']})", "",
             f"β grid {metrics['betas']}, seeds {metrics['seeds']}. Held-out measurements: KL = sequence k3 to the "
             "reference (nats), proxy and gold = mean rewards of the same samples. Cells: mean [min, max] over seeds.",
             "", "| β | final KL | final proxy | final gold | gold peak | peak step | proxy at peak |",
             "|---|---|---|---|---|---|---|"]
    for row in metrics["per_beta"]:
        lines.append(f"| {row['beta']:g} | {_cell(row['final_kl'])} | {_cell(row['final_proxy'])} | "
                     f"{_cell(row['final_gold'])} | {_cell(row['peak_gold'])} | {_cell(row['peak_step'], '{:.0f}')} | "
                     f"{_cell(row['proxy_at_peak'])} |")
    rho, low, high, fit = (metrics["spearman_beta_final_kl"], metrics["lowest_beta"], metrics["highest_beta"],
                           metrics["gao_fit"])
    lines += ["", f"Reference (step 0) gold: {metrics['per_beta'][0]['ref_gold']['mean']:.3f}.",
              f"Spearman ρ(β, mean final KL) = {_fmt(rho)} "
              f"(all points: {_fmt(metrics['spearman_beta_final_kl_all_points'])}).",
              f"Lowest β = {low['beta']:g}: gold peaks at {low['peak_gold']:.3f} (step {low['peak_step']:.0f}) "
              f"and ends at {low['final_gold']:.3f}; the proxy goes from {low['proxy_at_peak']:.3f} at the peak to "
              f"{low['final_proxy']:.3f} — {'a hump' if low['hump'] else 'no hump'}.",
              f"Highest β = {high['beta']:g}: final KL {high['final_kl']:.3f}, "
              f"gold change {high['gold_change']:+.3f}.", ""]
    lines.append(_fit_sentence(fit))
    if "penalty_vs_early_stopping" in metrics:  # absent from metrics written before it existed
        lines += ["", *early_stopping_markdown(metrics["penalty_vs_early_stopping"])]
    return "\n".join(lines) + "\n"


def early_stopping_markdown(pves: dict[str, Any]) -> list[str]:
    """``sweep.md``'s section: the verdict with its interval, then the mean difference per β pair."""
    method = ("Each higher-β run's final gold minus the gold of each lower-β run of the same seed, stopped where it "
              "first reached the higher-β run's final KL (linear in KL between measurements; pairs whose KL lies "
              "outside the lower-β run's measured range are not matched). Mean over seeds of the per-seed means, 95% "
              "Student t interval over seeds.")
    head = ["## Does the KL penalty beat early stopping?", "", method]
    ci = pves["ci95"]
    interval = f", 95% interval [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    result = (f"{pves['n_pairs']} matched pairs ({pves['n_unmatched']} unmatched) in {pves['n_seeds']} seed(s): mean "
              f"difference {_fmt_signed(pves['mean_difference'])}{interval} — **{pves['verdict']}**.")
    head += ["", result]
    if not pves["per_beta_pair"]:
        return head
    rows = ["", "| β low | β high | seeds | high-β gold − low-β gold at that KL |", "|---|---|---|---|"]
    rows += [f"| {r['beta_low']:g} | {r['beta_high']:g} | {r['n']} | {r['mean_difference']:+.3f} |"
             for r in pves["per_beta_pair"]]
    return head + rows


def _fmt_signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _fit_valid(fit: dict[str, Any]) -> bool:
    """Whether the fit may be read as a result (metrics written before ``valid`` existed: when it has no error)."""
    return "error" not in fit and fit.get("valid", True)


def _fit_sentence(fit: dict[str, Any]) -> str:
    """The fit for ``sweep.md``: its numbers and predicted peak only when it describes the data, else "no fit" and
    why (a low R² or a peak far outside the measured KL range predicts nothing)."""
    if "error" in fit:
        return f"Gao fit: not possible ({fit['error']})."
    head = (f"Gao et al. RL form R(d) = d(α − β_fit ln d) on the gold gain, d = sqrt(KL), {fit['n_points']} "
            f"measurements with KL ≥ {fit['min_kl']:g}")
    if not _fit_valid(fit):
        return (f"{head}: no fit — {fit['reason']} (least squares gave α = {fit['alpha']:.4f}, β_fit = "
                f"{fit['beta']:.4f}; no peak is predicted from it).")
    return (f"{head}: α = {fit['alpha']:.4f}, β_fit = {fit['beta']:.4f}, R² = {_fmt(fit['r2'])}, peak d* = "
            f"{_fmt(fit['peak_d'])} (KL* = {_fmt(fit['peak_kl'])} nats).")


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def plot_frontier(path: str, results: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """Proxy and gold against sqrt(KL): each run's trajectory (faint), its end point (one per β and seed), and the
    fitted Gao curve (reference gold + R(d)) on the gold panel (matplotlib Agg)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    betas = metrics["betas"]
    cmap = colormaps["viridis"]
    for r in sorted(results, key=lambda r: (r["beta"], r["seed"])):
        colour = cmap(betas.index(float(r["beta"])) / max(1, len(betas) - 1))
        d = [math.sqrt(max(p["kl"], 0.0)) for p in r["curve"]]
        for ax, key in zip(axes, ("proxy", "gold")):
            ax.plot(d, [p[key] for p in r["curve"]], color=colour, alpha=0.25, lw=1)
            ax.scatter([d[-1]], [r["curve"][-1][key]], color=colour, s=25, zorder=3,
                       label=f"β={r['beta']:g}" if r["seed"] == metrics["seeds"][0] and key == "gold" else None)
    fit = metrics["gao_fit"]
    if _fit_valid(fit):  # a curve that does not describe the data is not drawn
        from ..objectives import GaoFit

        gao = GaoFit(fit["form"], fit["alpha"], fit["beta"], fit["r2"] or float("nan"), fit["n_points"])
        top = max(math.sqrt(max(p["kl"], 0.0)) for r in results for p in r["curve"])
        xs = [top * i / 100 for i in range(101)]
        ref = metrics["per_beta"][0]["ref_gold"]["mean"]
        axes[1].plot(xs, [ref + y for y in gao.predict(xs)], color="black", lw=1.5, ls="--", label="Gao fit")
    for ax, name in zip(axes, ("proxy reward", "gold reward")):
        ax.set_xlabel("sqrt(KL to reference)")
        ax.set_ylabel(f"held-out {name}")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"β sweep ({metrics['trainer']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_report(output_dir: str, results: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, str]:
    """Writes ``sweep.md``, ``frontier.png`` and ``metrics.json``; returns their paths."""
    from ..results import write_metrics

    os.makedirs(output_dir, exist_ok=True)
    paths = {"sweep.md": os.path.join(output_dir, "sweep.md"), "frontier.png": os.path.join(output_dir, "frontier.png")}
    with open(paths["sweep.md"], "w") as f:
        f.write(report_markdown(metrics))
    plot_frontier(paths["frontier.png"], results, metrics)
    paths["metrics.json"] = write_metrics(output_dir, metrics, merge=False)
    return paths


def summary_lines(output_dir: str, metrics: dict[str, Any]) -> str:
    """A few console lines: ρ, the hump, the fit, and where the files are."""
    low, fit = metrics["lowest_beta"], metrics["gao_fit"]
    lines = ["", f"β sweep ({metrics['trainer']}): {len(metrics['betas'])} β × {len(metrics['seeds'])} seed(s)"]
    for row in metrics["per_beta"]:
        lines.append(f"  β={row['beta']:<7g} KL {row['final_kl']['mean']:7.3f}  proxy {row['final_proxy']['mean']:+.3f}"
                     f"  gold {row['final_gold']['mean']:+.3f}  peak {row['peak_gold']['mean']:+.3f}")
    lines.append(f"  ρ(β, final KL) = {_fmt(metrics['spearman_beta_final_kl'])}; "
                 f"hump at β={low['beta']:g}: {low['hump']}")
    if _fit_valid(fit):
        lines.append(f"  Gao fit: α={fit['alpha']:.3f} β_fit={fit['beta']:.3f} R²={_fmt(fit['r2'])} "
                     f"d*={_fmt(fit['peak_d'])}")
    else:
        lines.append(f"  Gao fit: no fit ({fit['reason']})")
    if "penalty_vs_early_stopping" in metrics:
        pves = metrics["penalty_vs_early_stopping"]
        lines.append(f"  penalty vs early stopping: {_fmt_signed(pves['mean_difference'])} gold at matched KL "
                     f"({pves['n_pairs']} pairs, {pves['n_seeds']} seed(s)): {pves['verdict']}")
    lines.append(f"  files: {os.path.join(output_dir, 'sweep.md')}, frontier.png, metrics.json, {RESULTS_FILE}")
    return "\n".join(lines)

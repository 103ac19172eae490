"""Reward-model ensembles against over-optimisation (Coste et al. 2023, arXiv 2310.02743), measured with the β sweep.

The same GRPO (or PPO) run, at one low β where a single proxy RM over-optimises, once per optimised reward:

* ``single``: one proxy RM (the lab's proxy RM; off the lab, the first ``--ensemble_reward_models`` member);
* ``mean``: the ensemble's mean;  ``min``: its worst case;  ``uwo``: mean − λ·std (uncertainty weighted).

Each objective is one sweep (``hf_rlhf_ext.experiments.sweeps.run_spec``) with a single β in
``<output_dir>/<objective>/``: the sweep trains, measures held-out KL / proxy / gold on the same fresh samples, and
resumes. The command line is parsed once; this module builds each objective's ``SweepSpec`` from it (its reward, its
directory), runs them (objectives in parallel up to ``max_parallel``, ``grid.run_grid``) and compares their results.
An ensemble objective reaches its sweep as a value, ``EnsembleObjective`` (members and λ), which each run scores with.

For TRL's own CLI and any recipe the same objectives are the dotted-path rewards
``hf_rlhf_ext.experiments.ensembles.ensemble_{mean,min,uwo}``: a dotted path carries no value, so their members and λ
come from the environment variable ``HF_RLHF_EXT_ENSEMBLE`` (JSON ``{"members": [dirs], "penalty": λ}``): set the
variable and pass the dotted path to ``--reward_funcs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..rewards import ensemble_reward

__all__ = [
    "OBJECTIVES",
    "ENSEMBLE_ENV",
    "EnsembleArguments",
    "EnsembleObjective",
    "ensemble_mean",
    "ensemble_min",
    "ensemble_uwo",
    "LAB_CONFIG",
    "lab_defaults",
    "make_parser",
    "parse_spec",
    "objective_spec",
    "run_experiment",
    "summarise",
    "report_markdown",
    "write_report",
]

OBJECTIVES = ("single", "mean", "min", "uwo")
ENSEMBLE_ENV = "HF_RLHF_EXT_ENSEMBLE"
_ENSEMBLE_OBJECTIVE = {"mean": "mean", "min": "min", "uwo": "mean_minus_std"}
# The experiment's own lab settings, on top of the β sweep's of the same trainer (``sweeps.lab_defaults``), are written
# once, in this shipped YAML file (recipes/configs/): a β at which the single proxy RM over-optimises within the run
# (gold rises then falls), three seeds, 80 steps. Its ``beta`` is the trainer's β (PPO's ``kl_coef``).
LAB_CONFIG = "rm_ensemble_lab.yaml"


@dataclass
class EnsembleArguments:
    """What the experiment compares; the rest (trainer, β, seeds, steps, parallelism) is the sweep's and trainer's.

    Args:
        objectives: optimised rewards to compare: single, mean, min, uwo (mean − penalty·std).
        penalty: λ of uwo (>= 0). k: lab ensemble size (>= 2; built once and cached beside the lab).
        ensemble_reward_models: reward-model directories to use as the ensemble instead of the lab's.
        gold_reward: dotted path of the held-out gold reward (weight 0); needed off the lab.
    """

    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES), metadata={"help": "single mean min uwo"})
    penalty: float = field(default=1.0, metadata={"help": "λ of uwo = mean − λ·std."})
    k: int = field(default=3, metadata={"help": "Members of the lab ensemble."})
    ensemble_reward_models: list[str] | None = field(default=None, metadata={"help": "Own reward-model dirs."})
    gold_reward: str | None = field(default=None, metadata={"help": "Gold reward (dotted path), weight 0."})

    def __post_init__(self):
        validate(self)


def validate(args: EnsembleArguments) -> None:
    """Clear errors before any training."""
    unknown = [o for o in args.objectives if o not in OBJECTIVES]
    if unknown or not args.objectives:
        raise ValueError(f"--objectives must be a non-empty subset of {OBJECTIVES}, got {args.objectives}.")
    if len(set(args.objectives)) != len(args.objectives):
        raise ValueError(f"Repeated objective in {args.objectives}.")
    if not (math.isfinite(args.penalty) and args.penalty >= 0):
        raise ValueError(f"--penalty must be a finite number >= 0, got {args.penalty}.")
    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (an ensemble needs two members), got {args.k}.")
    if args.ensemble_reward_models is not None and len(args.ensemble_reward_models) < 2:
        raise ValueError(f"--ensemble_reward_models needs at least 2 directories, got {args.ensemble_reward_models}.")


# ----------------------------------------------------------------------------------------------------------------------
# Ensemble objectives: as values (the experiment), and as dotted-path rewards (members and λ from the environment)
# ----------------------------------------------------------------------------------------------------------------------
_loaded: dict[tuple[str, ...], list] = {}


def _members(paths: tuple[str, ...]) -> list:
    """Reward models loaded once per process and member list."""
    if paths not in _loaded:
        from ..rewards import RewardModelFunction

        _loaded[paths] = [RewardModelFunction(p, name=f"member_{i}") for i, p in enumerate(paths)]
    return _loaded[paths]


@dataclass(frozen=True)
class EnsembleObjective:
    """An ensemble objective as a value: a reward function over the reward models in ``members`` (directories), the
    members loaded once per process on first use; ``penalty`` is λ of ``uwo`` (see ``rewards.ensemble_reward``).
    Picklable: a worker process gets the value, not a name to look up."""

    objective: str
    members: tuple[str, ...]
    penalty: float = 1.0

    def __post_init__(self):
        if self.objective not in _ENSEMBLE_OBJECTIVE:
            raise ValueError(f"objective must be one of {tuple(_ENSEMBLE_OBJECTIVE)}, got {self.objective!r}.")
        if len(self.members) < 2:
            raise ValueError(f"An ensemble needs at least 2 members, got {len(self.members)}.")

    @property
    def __name__(self) -> str:  # the name TRL logs the reward under: rewards/ensemble_<objective>/mean
        return f"ensemble_{self.objective}"

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        func = ensemble_reward(_members(tuple(self.members)), _ENSEMBLE_OBJECTIVE[self.objective], self.penalty,
                               self.__name__)
        return func(prompts=prompts, completions=completions, **kwargs)


def ensemble_spec(members: Sequence[str], penalty: float) -> str:
    """The JSON value of ``HF_RLHF_EXT_ENSEMBLE`` for these members and λ."""
    return json.dumps({"members": [os.path.abspath(m) for m in members], "penalty": float(penalty)})


def _spec_from_env() -> tuple[tuple[str, ...], float]:
    raw = os.environ.get(ENSEMBLE_ENV)
    if not raw:
        raise ValueError(f"{ENSEMBLE_ENV} is not set: give it as JSON "
                         f"{{\"members\": [reward-model dirs], \"penalty\": λ}}.")
    spec = json.loads(raw)
    members, penalty = tuple(spec.get("members") or ()), float(spec.get("penalty", 1.0))
    if len(members) < 2:
        raise ValueError(f"{ENSEMBLE_ENV} names {len(members)} members; an ensemble needs at least 2.")
    return members, penalty


def _env_objective(objective: str, name: str):
    def reward(prompts=None, completions=None, **kwargs):
        paths, penalty = _spec_from_env()
        return EnsembleObjective(objective, paths, penalty)(prompts=prompts, completions=completions, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = (f"Ensemble objective {objective!r} over the members of ${ENSEMBLE_ENV} (see ensemble_reward), "
                      "for --reward_funcs; the experiment hands EnsembleObjective values instead.")
    return reward


ensemble_mean = _env_objective("mean", "ensemble_mean")
ensemble_min = _env_objective("min", "ensemble_min")
ensemble_uwo = _env_objective("uwo", "ensemble_uwo")


# ----------------------------------------------------------------------------------------------------------------------
# Parsing (once): the experiment's flags on top of the sweep's; each objective's sweep is built from the result
# ----------------------------------------------------------------------------------------------------------------------
def make_parser(trainer: str = "grpo"):
    """A ``TrlParser`` over (experiment, sweep, script, trainer config, ``ModelConfig``) with the lab defaults (on the
    lab only); β is the trainer's own field (``--beta`` for GRPO, ``--kl_coef`` for PPO)."""
    from trl import ModelConfig

    from ..run.parsing import RecipeParser, check_lab_keys, cpu_parser_defaults
    from ..run.spec import RLScriptArguments
    from .sweeps import SweepArguments, config_class

    defaults = lab_defaults(trainer)
    classes = (EnsembleArguments, SweepArguments, RLScriptArguments, config_class(trainer), ModelConfig)
    check_lab_keys(defaults, classes)
    parser = RecipeParser(classes, lab_defaults=defaults)  # the lab defaults on the lab only
    parser.set_defaults(**cpu_parser_defaults())
    return parser


def lab_defaults(trainer: str) -> dict[str, Any]:
    """The sweep's lab settings for ``trainer`` updated with the experiment's (``LAB_CONFIG``), whose ``beta`` goes
    to the trainer's β field."""
    from ..run.parsing import LabDefaults, read_shipped_config
    from .sweeps import BETA_FIELD
    from .sweeps import lab_defaults as sweep_lab_defaults

    own = read_shipped_config(LAB_CONFIG)
    if "beta" in own:
        own[BETA_FIELD[trainer]] = own.pop("beta")
    return LabDefaults({**sweep_lab_defaults(trainer), **own}, source=own.source)  # named in the settings line


def _refuse_own_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` as a list; flags the experiment sets itself are refused."""
    argv = list(argv)
    config = _read_config(argv)
    for flag in ("betas", "reward_funcs", "reward_model_name_or_path", "reward_weights"):
        if f"--{flag}" in argv or any(a.startswith(f"--{flag}=") for a in argv) or flag in config:
            raise ValueError(f"--{flag} is set by the experiment: use --beta / --kl_coef for β, --objectives and "
                             "--ensemble_reward_models for the rewards, --gold_reward for the gold reward.")
    return argv


def parse_argv(argv: Sequence[str]) -> tuple[Any, ...]:
    """(experiment, sweep, script, training, model) arguments; flags the experiment sets itself are refused."""
    from .sweeps import trainer_from_argv

    argv = _refuse_own_flags(argv)
    return make_parser(trainer_from_argv(argv)).parse_args_and_config(args=argv)


def parse_spec(argv: Sequence[str]) -> tuple[EnsembleArguments, Any]:
    """(experiment arguments, the ``SweepSpec`` the objectives' sweeps are built from): the command line parsed once,
    its output directory made absolute."""
    from .grid import parse_keeping_kwargs
    from .sweeps import SweepSpec, trainer_from_argv

    argv = _refuse_own_flags(argv)
    (ens, sweep, script, _, model), training = parse_keeping_kwargs(make_parser(trainer_from_argv(argv)), argv, 3)
    training["output_dir"] = os.path.abspath(training["output_dir"])
    return ens, SweepSpec(trainer=sweep.trainer, sweep=sweep, script=script, training=training, model=model)


def _read_config(argv: Sequence[str]) -> dict[str, Any]:
    if "--config" not in argv:
        return {}
    import yaml

    with open(argv[list(argv).index("--config") + 1]) as f:
        return dict(yaml.safe_load(f) or {})


def objective_spec(spec: Any, objective: str, ens: EnsembleArguments, single_rm: str, members: Sequence[str],
                   max_parallel: int) -> Any:
    """The sweep of one objective: the experiment's β as its one β, the experiment's seeds and steps, its own reward
    (an ``EnsembleObjective`` value, standing in for the dotted path TRL logs it under) and directory."""
    from .sweeps import BETA_FIELD

    beta = float(spec.training[BETA_FIELD[spec.trainer]])
    sweep = dataclasses.replace(spec.sweep, betas=[beta], max_parallel=max_parallel)
    funcs = [] if objective == "single" else [f"{__name__}.ensemble_{objective}"]
    rewards = {} if objective == "single" else {
        funcs[0]: EnsembleObjective(objective, tuple(members), float(ens.penalty))}
    training = {**spec.training, "output_dir": os.path.join(spec.output_dir, objective)}
    script_changes: dict[str, Any] = {"reward_model_name_or_path": single_rm if objective == "single" else None}
    if ens.gold_reward:
        funcs.append(ens.gold_reward)
        training["reward_weights"] = [1.0, 0.0]
        script_changes["track_gold"] = False
    script = dataclasses.replace(spec.script, reward_funcs=funcs or None, **script_changes)
    watched = tuple(members) if objective == "single" else ()  # its disagreement, measured while a single RM is hacked
    return dataclasses.replace(spec, sweep=sweep, script=script, training=training, rewards=rewards,
                               probe_ensemble=watched)


# ----------------------------------------------------------------------------------------------------------------------
# Running: one sweep per objective (resumable: each sweep skips its finished points)
# ----------------------------------------------------------------------------------------------------------------------
def resolve_members(ens: EnsembleArguments, script: Any) -> tuple[list[str], str]:
    """(ensemble member dirs, the single RM): the given dirs (single = the first), or the lab's k bootstrap RMs and
    its proxy RM. Built also for the single RM alone: its run measures the members' disagreement."""
    if ens.ensemble_reward_models:
        return [os.path.abspath(p) for p in ens.ensemble_reward_models], os.path.abspath(ens.ensemble_reward_models[0])
    from ..lab.ensemble import build_reward_ensemble
    from ..run.build import load_lab

    lab = load_lab(script)
    return build_reward_ensemble(lab, ens.k), lab.reward_model_path


def _check_spec(objective_dir: str, spec: dict[str, Any]) -> None:
    """What an objective's reward depends on beyond its sweep config (members, λ), kept beside its results; a resume
    with other members or another λ is refused like a sweep with another config."""
    path = os.path.join(objective_dir, "ensemble.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != spec:
            raise ValueError(f"{path}: these results were optimised with {old}, not {spec}. Give another "
                             "--output_dir (or remove the objective's directory) to start again.")
        return
    os.makedirs(objective_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)


def _objective_spec(objective: str, members: Sequence[str], single_rm: str, penalty: float) -> dict[str, Any]:
    if objective == "single":
        return {"reward_model": single_rm}
    return {"members": list(members), **({"penalty": penalty} if objective == "uwo" else {})}


def _sweep_job(spec: Any) -> dict[str, Any]:
    from .sweeps import run_spec

    return run_spec(spec, progress=False)


def read_runs(objective_dir: str, beta: float, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The result lines of one objective's sweep for β and ``seeds`` (one per seed, in seed order)."""
    from .sweeps import RESULTS_FILE

    found: dict[int, dict[str, Any]] = {}
    with open(os.path.join(objective_dir, RESULTS_FILE)) as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            if not rec.get("header") and rec and float(rec["beta"]) == beta and rec["seed"] in seeds:
                found[rec["seed"]] = rec
    missing = [s for s in seeds if s not in found]
    if missing:
        raise RuntimeError(f"{objective_dir}: no results for seeds {missing} at β = {beta:g}.")
    return [found[s] for s in seeds]


def run_experiment(argv: Sequence[str]) -> dict[str, Any]:
    """Runs the objectives' sweeps not yet finished, then writes ``ensemble.md``, ``ensemble.png`` and
    ``metrics.json`` to the output dir and prints where they are. Returns the metrics."""
    from .grid import run_grid
    from .sweeps import BETA_FIELD

    ens, spec = parse_spec(argv)
    sweep, script, out = spec.sweep, spec.script, spec.output_dir
    if script.dataset_name and not ens.gold_reward:
        raise ValueError("Off the lab the experiment needs a held-out gold reward: give --gold_reward <dotted path>.")
    members, single_rm = resolve_members(ens, script)
    workers = min(sweep.max_parallel, len(ens.objectives))
    jobs = []
    for objective in ens.objectives:
        _check_spec(os.path.join(out, objective), _objective_spec(objective, members, single_rm, ens.penalty))
        jobs.append(objective_spec(spec, objective, ens, single_rm, members, max(1, sweep.max_parallel // workers)))
    # each objective's sweep, `workers` at a time in spawned processes (fork is unsafe with torch)
    run_grid(jobs, _sweep_job, max_parallel=workers, start_method="spawn", name=lambda s: s.output_dir)
    beta = float(spec.training[BETA_FIELD[sweep.trainer]])
    runs = {o: read_runs(os.path.join(out, o), beta, sweep.seeds) for o in ens.objectives}
    settings = {"trainer": sweep.trainer, "beta": beta, "seeds": list(sweep.seeds), "penalty": ens.penalty,
                "k": len(members), "members": members, "single_reward_model": single_rm,
                "max_steps": spec.training["max_steps"], "learning_rate": spec.training["learning_rate"]}
    metrics = summarise(runs, settings)
    write_report(out, runs, metrics)
    print(summary_lines(out, metrics))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Analysis and report, from the result lines alone
# ----------------------------------------------------------------------------------------------------------------------
_FIELDS = ("end_gold", "peak_gold", "fall", "final_kl", "final_optimised", "ref_gold", "peak_step")


def run_numbers(run: dict[str, Any]) -> dict[str, float]:
    """One run's numbers: gold at the end and at its peak, the fall from the peak, final KL and optimised reward."""
    golds = [p["gold"] for p in run["curve"] if p["gold"] is not None]
    peak = max(range(len(golds)), key=lambda i: golds[i])
    end = run["curve"][-1]
    return {"end_gold": end["gold"], "peak_gold": golds[peak], "fall": golds[peak] - end["gold"],
            "final_kl": end["kl"], "final_optimised": end["proxy"], "ref_gold": run["curve"][0]["gold"],
            "peak_step": run["curve"][peak]["step"]}


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def gold_curve(runs: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Held-out gold and KL per measured step over seeds (mean, min, max); steps every run measured."""
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
    at = [{p["step"]: p for p in r["curve"]} for r in runs]
    curve: dict[str, list] = {"step": steps}
    for key in ("gold", "kl"):
        cols = [[a[s][key] for a in at] for s in steps]
        curve[f"{key}_mean"] = [sum(c) / len(c) for c in cols]
        curve[f"{key}_min"], curve[f"{key}_max"] = [min(c) for c in cols], [max(c) for c in cols]
    return curve


def summarise(runs: dict[str, Sequence[dict[str, Any]]], settings: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``: per objective, mean and min–max over seeds of each run's numbers, and the curve."""
    objectives = {}
    for name, rs in runs.items():
        nums = [run_numbers(r) for r in rs]
        objectives[name] = {"seeds": [r["seed"] for r in rs], **{k: _stats([n[k] for n in nums]) for k in _FIELDS},
                            "per_seed": [{"seed": r["seed"], **n} for r, n in zip(rs, nums)],
                            "curve": gold_curve(rs)}
    out = {"settings": settings, "objectives": objectives}
    if "single" in objectives:
        base = objectives["single"]["fall"]["mean"]
        out["fall_vs_single"] = {n: o["fall"]["mean"] - base for n, o in objectives.items() if n != "single"}
    return out


def _cell(s: dict[str, float], fmt: str = "{:.3f}") -> str:
    if s["min"] == s["max"]:
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"


_LABELS = {"single": "single RM", "mean": "ensemble mean", "min": "ensemble min (worst case)",
           "uwo": "mean − λ·std (uncertainty weighted)"}


def report_markdown(metrics: dict[str, Any]) -> str:
    """``ensemble.md``: one row per objective, cells mean [min, max] over seeds."""
    s = metrics["settings"]
    lines = [f"# Reward-model ensembles at β = {s['beta']:g} ({s['trainer']})", "",
             f"Seeds {s['seeds']}, {s['max_steps']} steps, ensemble of k = {s['k']}, λ = {s['penalty']:g}. Held-out "
             "measurements on the same fresh samples: gold, KL (sequence k3 to the reference, nats), optimised reward "
             "(each objective's own). Fall = peak gold − end gold. Cells: mean [min, max] over seeds.", "",
             "| objective | end gold | peak gold | fall from peak | peak step | final KL | final optimised reward |",
             "|---|---|---|---|---|---|---|"]
    for name, o in metrics["objectives"].items():
        lines.append(f"| {_LABELS.get(name, name)} | {_cell(o['end_gold'])} | {_cell(o['peak_gold'])} | "
                     f"{_cell(o['fall'])} | {_cell(o['peak_step'], '{:.0f}')} | {_cell(o['final_kl'])} | "
                     f"{_cell(o['final_optimised'])} |")
    first = next(iter(metrics["objectives"].values()))
    lines += ["", f"Reference (step 0) gold: {first['ref_gold']['mean']:.3f}."]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str, runs: dict[str, Sequence[dict[str, Any]]], metrics: dict[str, Any]) -> dict[str, str]:
    """Writes ``ensemble.md``, ``ensemble.png`` and ``metrics.json``; returns their paths."""
    from ..plots import plot_rm_ensemble
    from ..results import write_metrics

    os.makedirs(output_dir, exist_ok=True)
    paths = {"ensemble.md": os.path.join(output_dir, "ensemble.md"),
             "ensemble.png": os.path.join(output_dir, "ensemble.png")}
    with open(paths["ensemble.md"], "w") as f:
        f.write(report_markdown(metrics))
    plot_rm_ensemble(metrics, runs, paths["ensemble.png"])
    paths["metrics.json"] = write_metrics(output_dir, metrics, merge=False)
    return paths


def summary_lines(output_dir: str, metrics: dict[str, Any]) -> str:
    """A few console lines: per objective end gold, fall from the peak, final KL, and where the files are."""
    s = metrics["settings"]
    lines = ["", f"Reward-model ensembles at β = {s['beta']:g}: {len(metrics['objectives'])} objective(s) × "
                 f"{len(s['seeds'])} seed(s)"]
    for name, o in metrics["objectives"].items():
        lines.append(f"  {name:<7} end gold {o['end_gold']['mean']:+.3f}  peak {o['peak_gold']['mean']:+.3f}  "
                     f"fall {o['fall']['mean']:.3f}  KL {o['final_kl']['mean']:.2f}  "
                     f"optimised {o['final_optimised']['mean']:+.3f}")
    lines.append(f"  files: {os.path.join(output_dir, 'ensemble.md')}, ensemble.png, metrics.json; "
                 "per objective: <objective>/results.jsonl")
    return "\n".join(lines)

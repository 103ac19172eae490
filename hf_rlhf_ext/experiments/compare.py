"""PPO (policy + critic) against GRPO (group baseline, no critic) on the same prompts, the same number of sampled
completions per step, the same steps and the same seeds.

Why: the chapter's claim is that GRPO buys PPO's variance reduction without a critic, so it should reach a similar
gold reward with less memory. One run of each proves nothing; this module runs each trainer over several seeds and
reports what changes: held-out gold (start, peak, end), KL to the reference, proxy, the spread over seeds, the
fraction of collapsed runs (gold at the end below gold at the start), memory (training state and peak) and time per
step.

Budget per optimizer step: PPO samples ``per_device_train_batch_size`` prompts × 1 completion (32 × 1 on the lab),
GRPO ``per_device_train_batch_size / grpo_num_generations`` prompts × ``grpo_num_generations`` (4 × 8): 32 sampled
completions each, from the same prompt set.

Measurement: every ``eval_every`` steps (and at step 0) ``OveroptimizationCallback`` in sample mode scores fresh
completions of the held-out prompts with the proxy and the gold reward, and ``KLToReferenceCallback`` measures the
sequence-level KL (k3) on its own fresh samples of the same prompts. Both sample with a fixed seed of their own, so
training draws are unchanged. A step timer placed before them times the steps without the measurements.

Memory: each run is its own fresh process. ``ru_maxrss`` is per process and never decreases, so in a shared
process the second run would inherit the first one's peak. On CPU a run reports its peak RSS above the RSS it had
after importing the stack (the same imports for both trainers); on CUDA ``torch.cuda.max_memory_allocated``
(the tensors the allocator handed out: weights, optimizer states, activations), which excludes the CUDA context.
Peak RSS moves between seeds (allocator reuse, sampled lengths: 12 MB between two GRPO seeds on the lab, against a
21 MB gap between the trainers), so each run also reports its training state (``training_state_mb``): the bytes of
the tensors the trainer holds for training, fixed by the shapes and the same for every seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Callable, Sequence

from transformers import TrainerCallback

from ..plots import plot_compare
from ..results import experiment_file_lines, write_experiment_files
from ..run.spec import RLScriptArguments
from ..validation import InputError

__all__ = [
    "CompareArguments",
    "LAB_CONFIG",
    "lab_defaults",
    "TRAINERS",
    "StepTimer",
    "check_argv",
    "curve_numbers",
    "given_keys",
    "held_out_rewards",
    "parse_compare_argv",
    "CompareSpec",
    "parse_compare_spec",
    "make_run_trainer",
    "run_one",
    "run_in_subprocess",
    "run_compare",
    "spread",
    "summarise",
    "report_markdown",
    "summary_lines",
    "training_state_mb",
    "write_report",
]

TRAINERS = ("ppo", "grpo")
# Flags the comparison sets per trainer; given for both they would silently override one trainer's setting.
RESERVED_FLAGS = {
    "beta": "--grpo_beta", "kl_coef": "--ppo_kl_coef", "num_generations": "--grpo_num_generations", "seed": "--seeds",
}

# The lab run (2 CPU cores: ≈ 0.2 s per step for either trainer, ≈ 25 s per run with the held-out measurements) is
# written once, in this shipped YAML file (recipes/configs/): the parsers' defaults (its PPO-only keys go to PPO only).
# A --config file or flags override any of these.
LAB_CONFIG = "compare_lab.yaml"


@dataclass
class CompareArguments(RLScriptArguments):
    """What the comparison varies and measures; every other flag is a trainer flag, the same for both trainers.

    Args:
        seeds: training seeds; each trainer runs once per seed.
        ppo_kl_coef: PPO's β (per-token KL penalty in the reward). grpo_beta: GRPO's β (k3 KL term in the loss).
        grpo_num_generations: GRPO's completions per prompt (PPO samples one completion per prompt).
        eval_every: steps between held-out measurements (step 0 is always measured); must divide max_steps.
        gold_reward: the held-out judge off the lab (a dotted import path or a reward-model path); on the lab, the
            lab's gold reward.
        threads_per_run: torch threads of each run's process (0: torch's default).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    ppo_kl_coef: float = field(default=0.1, metadata={"help": "PPO's β (kl_coef)."})
    grpo_beta: float = field(default=0.1, metadata={"help": "GRPO's β (beta)."})
    grpo_num_generations: int = field(default=8, metadata={"help": "GRPO's completions per prompt."})
    eval_every: int = field(default=5, metadata={"help": "Steps between held-out measurements."})
    gold_reward: str | None = field(default=None, metadata={"help": "Held-out judge off the lab."})
    threads_per_run: int = field(default=0, metadata={"help": "Torch threads per run (0: default)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}.")
        if self.ppo_kl_coef < 0 or self.grpo_beta < 0:
            raise ValueError("ppo_kl_coef and grpo_beta must be >= 0.")
        if self.grpo_num_generations < 2:
            raise ValueError(f"grpo_num_generations must be >= 2 (GRPO needs groups), got {self.grpo_num_generations}.")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}.")
        if self.num_eval_prompts < 1:
            raise ValueError("The comparison measures on held-out prompts: num_eval_prompts must be >= 1.")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
def _config_class(trainer: str) -> type:
    if trainer == "ppo":
        from ..trainers.ppo_config import PPOConfig

        return PPOConfig
    from trl import GRPOConfig

    return GRPOConfig


def _ppo_only_fields() -> set[str]:
    return {f.name for f in fields(_config_class("ppo"))} - {f.name for f in fields(_config_class("grpo"))}


def lab_defaults(trainer: str) -> dict[str, Any]:
    """The comparison's lab settings for ``trainer`` from ``LAB_CONFIG``: all of them for PPO, GRPO's without the
    PPO-only ones (``critic_learning_rate``, ...)."""
    from ..run.parsing import read_shipped_config

    values = read_shipped_config(LAB_CONFIG)
    return values if trainer == "ppo" else {k: v for k, v in values.items() if k not in _ppo_only_fields()}


def given_keys(argv: Sequence[str]) -> set[str]:
    """Flag names on the command line and keys of its ``--config`` file."""
    keys = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if "--config" in argv:
        import yaml

        with open(argv[list(argv).index("--config") + 1]) as f:
            keys |= set(yaml.safe_load(f) or {})
    return keys


def check_argv(argv: Sequence[str]) -> None:
    """Refuses flags the comparison sets per trainer (a shared ``--beta`` would reach one trainer only)."""
    reserved = sorted(given_keys(argv) & set(RESERVED_FLAGS))
    if reserved:
        key = reserved[0]
        raise InputError(f"--{key} is set per trainer by the comparison; use {RESERVED_FLAGS[key]} instead.")


def make_compare_parser(trainer: str):
    """``TrlParser`` over (comparison arguments, the trainer's config, ``ModelConfig``) with the lab defaults."""
    from ..run.parsing import make_recipe_parser

    if trainer not in TRAINERS:
        raise ValueError(f"Unknown trainer {trainer!r}; choose one of {list(TRAINERS)}.")
    return make_recipe_parser(CompareArguments, _config_class(trainer), lab_defaults(trainer))


def parse_compare_argv(argv: Sequence[str], trainer: str = "ppo", seed: int | None = None) -> tuple[Any, Any, Any]:
    """(comparison args, trainer config, model config) of one trainer, from ``parse_compare_spec`` (without the checks
    that need both argument groups). Without ``seed`` the trainer's own β and group size are still applied, so that
    the result is exactly what a run of this trainer would see."""
    spec = parse_compare_spec(argv, check=False)
    return spec.compare, dataclasses.replace(spec, trainer=trainer, seed=seed).training_args(), spec.model


def run_dir(output_dir: str, trainer: str, seed: int) -> str:
    return os.path.join(output_dir, "runs", f"{trainer}_seed{seed}")


@dataclass(frozen=True)
class CompareSpec:
    """The comparison as a value: its command line parsed once per trainer. With ``trainer`` and ``seed`` it is one
    run, ``dataclasses.replace(spec, trainer=..., seed=...)``, which trains from this object alone (``run_one``).

    Args:
        compare: the parsed ``CompareArguments``. model: the parsed ``ModelConfig``.
        training: per trainer, the keyword arguments its config is built from (its own β and group size applied);
            ``training_args()`` builds a run's config with its seed and directory, as ``parse_compare_argv`` would.
    """

    compare: CompareArguments
    training: dict[str, dict[str, Any]]
    model: Any
    trainer: str | None = None
    seed: int | None = None

    @property
    def output_dir(self) -> str:
        return self.training["ppo"]["output_dir"]

    def runs(self) -> list[CompareSpec]:
        """Every (trainer, seed), seed-major."""
        return [dataclasses.replace(self, trainer=t, seed=int(s)) for s in self.compare.seeds for t in TRAINERS]

    def training_args(self) -> Any:
        """The config of this run's trainer; with a seed, the run's own (a run never pushes: the comparison's folder
        is pushed once)."""
        if self.trainer not in TRAINERS:
            raise ValueError(f"A run needs a trainer among {TRAINERS}, got {self.trainer!r}.")
        kwargs = dict(self.training[self.trainer])
        if self.seed is not None:
            kwargs.update({"seed": int(self.seed), "output_dir": run_dir(self.output_dir, self.trainer, self.seed),
                           "push_to_hub": False})
        return _config_class(self.trainer)(**kwargs)


def _own_flags(compare: CompareArguments, trainer: str) -> list[str]:
    """The flags the comparison sets per trainer: its β and completions per prompt."""
    if trainer == "ppo":
        return ["--kl_coef", repr(compare.ppo_kl_coef), "--num_generations", "1"]
    return ["--beta", repr(compare.grpo_beta), "--num_generations", str(compare.grpo_num_generations)]


def parse_compare_spec(argv: Sequence[str], check: bool = True) -> CompareSpec:
    """The comparison of a command line as a ``CompareSpec``; every argument error is raised here, before any run
    (``check=False``: not those of ``validate``)."""
    from .grid import parse_keeping_kwargs

    argv = list(argv)
    check_argv(argv)
    compare, _, _ = make_compare_parser("ppo").parse_args_and_config(argv)  # strict: PPOConfig ⊇ GRPOConfig
    training, model = {}, None
    for trainer in TRAINERS:
        (own, training_args, model, rest), kwargs = parse_keeping_kwargs(
            make_compare_parser(trainer), argv + _own_flags(compare, trainer), 1, return_remaining_strings=True)
        _refuse_unknown(trainer, rest)
        if check:
            validate(own, training_args, model)
        training[trainer] = kwargs
    return CompareSpec(compare=compare, training=training, model=model)


def _refuse_unknown(trainer: str, rest: Sequence[str]) -> None:
    """PPO-only flags are fine for GRPO (dropped there); anything else unknown is refused."""
    unknown = [a[2:] for a in rest if a.startswith("--") and a[2:] not in _ppo_only_fields()]
    if unknown:  # PPO-only flags (critic_learning_rate, ...) are fine; anything else was caught above
        raise InputError(f"Unknown arguments for {trainer}: {unknown}.")


def validate(compare: CompareArguments, training_args: Any, model_args: Any) -> None:
    """Checks that need both argument groups; raised before any run starts."""
    if training_args.max_steps < 1 or training_args.max_steps % compare.eval_every:
        raise InputError(
            f"max_steps ({training_args.max_steps}) must be a positive multiple of eval_every ({compare.eval_every}), "
            "so that the last step is measured."
        )
    if training_args.per_device_train_batch_size % compare.grpo_num_generations:
        raise InputError(
            f"per_device_train_batch_size ({training_args.per_device_train_batch_size}) must be a multiple of "
            f"grpo_num_generations ({compare.grpo_num_generations}): both trainers sample the same number per step."
        )
    if compare.dataset_name and not compare.gold_reward and 0 not in (training_args.reward_weights or []):
        raise InputError(
            "No gold reward off the lab: pass --gold_reward (a dotted import path or a reward-model directory) as the "
            "held-out judge, or a reward function with weight 0 in --reward_weights."
        )
    if min(compare.ppo_kl_coef, compare.grpo_beta) == 0 and not model_args.use_peft:
        raise InputError(
            "β = 0 leaves the trainer without a reference model, and the held-out KL needs one: use β > 0 or "
            "--use_peft (the adapter-disabled base is then the reference)."
        )


# ----------------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ----------------------------------------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Wall time of each optimizer step. Added before the measuring callbacks, its ``on_step_end`` runs before
    theirs, so held-out measurements are not counted."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None


def _weighted_reward(pairs: Sequence[tuple[Callable, float]]) -> Callable:
    """The optimised reward as one function: the weighted sum of the main reward functions (named "proxy")."""
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]

    def proxy(prompts=None, completions=None, **kwargs) -> list[float]:
        scores = [f(prompts=prompts, completions=completions, **kwargs) for f, _ in pairs]
        return [sum(w * float(s[i]) for (_, w), s in zip(pairs, scores)) for i in range(len(completions))]

    return proxy


def held_out_rewards(setup: Any, compare: CompareArguments) -> tuple[Callable, Callable]:
    """(proxy, gold) for the held-out measurements: the proxy is what the trainer optimises, the gold the lab's gold
    reward (the reward function with weight 0) or ``--gold_reward``."""
    from ..rewards import RewardModelFunction, import_reward_func

    pairs = [(f, float(w)) for f, w in zip(setup.reward_funcs, setup.reward_weights)]
    proxy = _weighted_reward([p for p in pairs if p[1] != 0])
    if compare.gold_reward:
        if os.path.isdir(compare.gold_reward):
            return proxy, RewardModelFunction(compare.gold_reward, name="judge")
        return proxy, import_reward_func(compare.gold_reward)
    tracked = [f for f, w in pairs if w == 0]
    if len(tracked) != 1:
        raise InputError(
            "No gold reward: pass --gold_reward (a dotted import path or a reward-model directory) as the held-out "
            "judge; on the lab the gold reward is used."
        )
    return proxy, tracked[0]


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: ``VmHWM`` of /proc/self/status, which belongs to the process's own
    address space — ``ru_maxrss`` also carries the peak of the process that forked it across exec, so a run spawned
    from a large parent (e.g. the chapter pipeline) would read the parent's peak. Elsewhere: ``ru_maxrss``."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, kB on Linux


def _memory_baseline() -> tuple[str, float]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "cuda_max_allocated", 0.0
    return "peak_rss_above_imports", _peak_rss_mb()


def _memory_peak(method: str, baseline: float) -> float:
    import torch

    if method == "cuda_max_allocated":
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb() - baseline


def _module_tensors(module: Any) -> list:
    return [] if module is None else [*module.parameters(), *module.buffers()]


def _storage_key(tensor: Any) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def training_state_mb(trainer: Any, reward_funcs: Sequence[Any] = ()) -> float:
    """The training state ``trainer`` holds, in MB: the parameters and buffers of the policy (``model``), the
    reference model (``ref_model``, None without one), the critic (PPO's ``value_model``) and the reward models behind
    ``reward_funcs`` (their ``.model``), one gradient per trainable parameter and the optimizer's state tensors
    (through accelerate's wrapper). Each tensor storage counts once, so tied or shared weights count once.

    Why: peak RSS moves between seeds with the allocator and the sampled lengths; this total follows from the shapes
    alone, so it is the same for every seed and differs between trainers only by what each holds. A gradient is
    counted for every trainable parameter whether or not it is held now (``zero_grad(set_to_none=True)`` frees them
    between steps, each trainer at its own point): each step holds all of them."""
    models = [trainer.model, getattr(trainer, "ref_model", None), getattr(trainer, "value_model", None)]
    models += [getattr(f, "model", None) for f in reward_funcs]
    seen: dict[tuple[str, int], int] = {}

    def add(tensor: Any) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr():  # an empty or meta tensor holds no bytes
            seen.setdefault(_storage_key(tensor), storage.nbytes())

    for module in models:
        for tensor in _module_tensors(module):
            add(tensor)
    for module in models:
        for p in (module.parameters() if module is not None else ()):
            if p.grad is not None:
                add(p.grad)
            elif p.requires_grad:  # freed between steps: the gradient a step holds, keyed by its parameter
                seen.setdefault(("grad of", *_storage_key(p)), p.numel() * p.element_size())
    optimizer = getattr(trainer, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                add(value)
    return sum(seen.values()) / 2**20


def make_run_trainer(run: CompareSpec) -> tuple[Any, Any, CompareArguments, Any]:
    """(trainer, setup, comparison arguments, training arguments) of one run (a ``CompareSpec`` with its trainer and
    seed), built as ``run_one`` trains it; the callbacks that measure are ``run_one``'s to add."""
    import copy

    from trl import GRPOTrainer

    from ..run.build import make_trainer, prepare_rl_run
    from ..trainers.ppo import PPOTrainer

    compare, training_args, model_args = copy.deepcopy(run.compare), run.training_args(), copy.deepcopy(run.model)
    setup = prepare_rl_run(compare, training_args, model_args)
    trainer = make_trainer(PPOTrainer if run.trainer == "ppo" else GRPOTrainer, setup, training_args)
    return trainer, setup, compare, training_args


def run_one(run: CompareSpec | Sequence[str], trainer_name: str | None = None,
            seed: int | None = None) -> dict[str, Any]:
    """Trains one (trainer, seed) run and returns its measurements. Meant for a fresh process (peak memory). ``run``:
    a run of a ``CompareSpec`` (``trainer_name`` / ``seed``, when given, replace its own), or the comparison's
    command line, parsed here."""
    import torch

    from ..callbacks import KLToReferenceCallback, OveroptimizationCallback
    from ..run.build import end_trainer
    from ..trainers.ppo import PPOTrainer  # noqa: F401  both trainers (PPO subclasses GRPO), before the memory baseline

    if not isinstance(run, CompareSpec):
        run = parse_compare_spec(run)
    run = dataclasses.replace(run, **{k: v for k, v in (("trainer", trainer_name), ("seed", seed)) if v is not None})
    if run.compare.threads_per_run:
        torch.set_num_threads(run.compare.threads_per_run)
    method, baseline = _memory_baseline()  # after every import both trainers need
    trainer, setup, compare, training_args = make_run_trainer(run)
    proxy, gold = held_out_rewards(setup, compare)
    timer = StepTimer()
    trainer.add_callback(timer)  # before the measuring callbacks: their time is not counted
    n = len(setup.eval_prompts)
    kl = KLToReferenceCallback(trainer, setup.eval_prompts, every_n_steps=compare.eval_every, num_samples=n)
    overopt = OveroptimizationCallback(
        trainer, proxy=proxy, gold=gold, eval_prompts=setup.eval_prompts, every_n_steps=compare.eval_every,
        num_samples=n, measure_kl=False, save_peak=False, plot=False,
    )
    trainer.add_callback(kl)
    trainer.add_callback(overopt)
    trainer.train()
    state_mb = training_state_mb(trainer, setup.reward_funcs)
    end_trainer(trainer)
    return run_result(run.trainer, run.seed, training_args, compare, overopt.points, kl.history, timer.seconds,
                      method, _memory_peak(method, baseline), state_mb)


def run_result(trainer: str, seed: int, training_args: Any, compare: CompareArguments, points: list[dict],
               kl_history: list[dict], step_seconds: list[float], memory_method: str, peak_mb: float,
               state_mb: float | None = None) -> dict:
    """One run's row: its curve (held-out gold, proxy, KL per measured step), the numbers read off it and its memory
    (``peak_mb`` by ``memory_method``; ``state_mb``: ``training_state_mb``)."""
    kl_at = {h["step"]: h for h in kl_history}
    curve = [{"step": p["step"], "gold": p["gold"], "proxy": p["proxy"],
              "kl": kl_at.get(p["step"], {}).get("kl_ref/k3_seq"),
              "kl_k1": kl_at.get(p["step"], {}).get("kl_ref/k1_seq")} for p in points]
    g = training_args.num_generations
    return {
        "trainer": trainer, "seed": seed, "beta": compare.ppo_kl_coef if trainer == "ppo" else compare.grpo_beta,
        "prompts_per_step": training_args.per_device_train_batch_size // g, "completions_per_prompt": g,
        "steps": training_args.max_steps, "curve": curve, **curve_numbers(curve),
        "peak_memory_mb": peak_mb, "memory_method": memory_method, "state_memory_mb": state_mb,
        "seconds_per_step": statistics.median(step_seconds) if step_seconds else None,
    }


def curve_numbers(curve: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Gold at the start, at its highest and at the end; KL and proxy at the end; collapsed = end gold < start."""
    first, last = curve[0], curve[-1]
    peak = max(curve, key=lambda p: p["gold"] if p["gold"] is not None else -math.inf)
    return {
        "gold_start": first["gold"], "gold_peak": peak["gold"], "gold_peak_step": peak["step"],
        "gold_end": last["gold"],
        "proxy_start": first["proxy"], "proxy_end": last["proxy"], "kl_end": last["kl"],
        "collapsed": None if None in (first["gold"], last["gold"]) else last["gold"] < first["gold"],
    }


def _run_in_child(run: CompareSpec, log_path: str) -> dict[str, Any]:
    """``run_one`` with this process's stdout and stderr (file descriptors, so also the libraries' loggers) sent to
    ``log_path``. Only for a process of its own: the redirection is never undone."""
    import sys

    with open(log_path, "w") as log:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    return run_one(run)


def _logged_run(run: CompareSpec) -> dict[str, Any]:
    """A grid job: one (trainer, seed) run in a process of its own, its console output in ``<run dir>/train.log``."""
    out = run_dir(run.output_dir, run.trainer, run.seed)
    os.makedirs(out, exist_ok=True)
    return _run_in_child(run, os.path.join(out, "train.log"))


PRELOAD = ("torch", "transformers", "trl")


def _run_fresh(runs: Sequence[CompareSpec], on_result: Callable | None = None) -> list:
    """Each run in a fresh process of its own (its own peak memory; nothing inherited from earlier runs), forked from
    a fork server that imported the stack once, so no run pays for the imports (where there is no fork server:
    spawned). The peak is read above the RSS after the imports, the same for both trainers either way."""
    from .grid import run_grid

    return run_grid(runs, _logged_run, isolate=True, fresh_process=True, preload=PRELOAD, on_result=on_result,
                    name=lambda r: f"{r.trainer} seed {r.seed}")


def run_in_subprocess(argv: Sequence[str], trainer: str, seed: int) -> dict[str, Any]:
    """``run_one`` in a fresh process (its own peak memory; nothing inherited from earlier runs); the run's
    console output goes to ``<run dir>/train.log``."""
    return _run_fresh([dataclasses.replace(parse_compare_spec(argv), trainer=trainer, seed=seed)])[0]


# ----------------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------------
def run_compare(argv: Sequence[str], progress: bool = True, runner: Callable | None = None) -> dict[str, Any]:
    """Runs every (trainer, seed) in its own process (``runner(run)``, if given, in this one), then writes the report.
    Returns the metrics written. The command line is parsed once, here; each run is a ``CompareSpec``."""
    from tqdm.auto import tqdm

    from ..run.build import load_lab
    from .grid import run_grid

    argv = list(argv)
    spec = parse_compare_spec(argv)  # every argument error before the first run
    compare, model_args = spec.compare, spec.model
    if not (model_args.model_name_or_path and compare.dataset_name and
            (compare.reward_model_name_or_path or compare.reward_funcs)):
        load_lab(compare)  # built once here, not inside the first run (its memory would count)
    runs = spec.runs()
    with tqdm(total=len(runs), desc="compare runs", disable=not progress) as bar:
        if runner is None:
            results = _run_fresh(runs, on_result=lambda *_: bar.update(1))
        else:
            results = run_grid(runs, runner, on_result=lambda *_: bar.update(1))
    metrics = summarise(results)
    metrics["settings"] = {"argv": argv, "seeds": compare.seeds, "eval_every": compare.eval_every,
                           "num_eval_prompts": compare.num_eval_prompts}
    write_report(spec.output_dir, results, metrics)
    return metrics


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


NUMBERS = ("gold_start", "gold_peak", "gold_end", "proxy_start", "proxy_end", "kl_end", "peak_memory_mb",
           "state_memory_mb", "seconds_per_step")


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per trainer: mean, std, min and max over seeds of each number, the fraction of collapsed runs and the curves
    (mean, min and max over seeds at each measured step)."""
    out: dict[str, Any] = {"trainers": {}, "runs": list(results)}
    for trainer in dict.fromkeys(r["trainer"] for r in results):
        runs = [r for r in results if r["trainer"] == trainer]
        out["trainers"][trainer] = {
            "num_runs": len(runs), "beta": runs[0]["beta"], "prompts_per_step": runs[0]["prompts_per_step"],
            "completions_per_prompt": runs[0]["completions_per_prompt"], "memory_method": runs[0]["memory_method"],
            **{k: spread([r.get(k) for r in runs]) for k in NUMBERS},  # results from before a number: n = 0
            "gold_gain": spread([r["gold_end"] - r["gold_start"] for r in runs]),
            "collapsed_fraction": sum(bool(r["collapsed"]) for r in runs) / len(runs),
            "curve": mean_curve(runs),
        }
    return out


def mean_curve(runs: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Gold and KL at each step measured in every run: mean, min and max over the runs."""
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
    out: dict[str, list] = {"step": steps}
    for key in ("gold", "kl"):
        at = [[next(p[key] for p in r["curve"] if p["step"] == s) for r in runs] for s in steps]
        at = [[v for v in vals if v is not None] for vals in at]
        out[f"{key}_mean"] = [statistics.fmean(v) if v else None for v in at]
        out[f"{key}_min"] = [min(v) if v else None for v in at]
        out[f"{key}_max"] = [max(v) if v else None for v in at]
    return out


def _cell(s: dict[str, Any], fmt: str = "{:.3f}") -> str:
    if s["mean"] is None:
        return "–"
    return fmt.format(s["mean"]) + (" ± " + fmt.format(s["std"]) if s["n"] > 1 else "")


def report_markdown(metrics: dict[str, Any]) -> str:
    """One table: a row per trainer, each number as mean ± standard deviation over seeds."""
    head = ("| trainer | prompts × completions / step | β | seeds | gold start | gold peak | gold end | KL end (k3) "
            "| proxy end | collapsed | peak memory (MB) | training state (MB) | s / step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, t in metrics["trainers"].items():
        lines.append(
            f"| {name.upper()} | {t['prompts_per_step']} × {t['completions_per_prompt']} | {t['beta']:g} "
            f"| {t['num_runs']} | {_cell(t['gold_start'])} | {_cell(t['gold_peak'])} | {_cell(t['gold_end'])} "
            f"| {_cell(t['kl_end'], '{:.2f}')} | {_cell(t['proxy_end'])} | {t['collapsed_fraction']:.0%} "
            f"| {_cell(t['peak_memory_mb'], '{:.0f}')} | {_cell(t['state_memory_mb'], '{:.1f}')} "
            f"| {_cell(t['seconds_per_step'], '{:.2f}')} |"
        )
    method = next(iter(metrics["trainers"].values()))["memory_method"]
    lines += ["", "Held-out means per measurement; ± is the standard deviation over seeds. Collapsed: gold at the end "
              f"below gold at the start. Peak memory: {MEMORY_NOTE.get(method, method)}. Training state: "
              f"{MEMORY_NOTE['state_memory_mb']}. s / step: median step time without the held-out measurements."]
    return "\n".join(lines) + "\n"


MEMORY_NOTE = {
    "peak_rss_above_imports": "peak RSS (VmHWM) of the run's own process above its peak after the imports",
    "cuda_max_allocated": "torch.cuda.max_memory_allocated of the run's own process",
    "state_memory_mb": ("the bytes of the tensors the trainer holds for training (the weights of the policy, "
                        "reference, critic and reward models, a gradient per trainable parameter, the optimizer's "
                        "state), each storage once: fixed by the shapes, the same for every seed"),
}


def write_report(output_dir: str, results: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, str]:
    """``compare.md`` (the table), ``compare.png`` (gold and KL curves) and ``metrics.json``; returns the paths."""
    return write_experiment_files(output_dir, "compare", report_markdown(metrics), partial(plot_compare, metrics),
                                  metrics)


def summary_lines(output_dir: str, metrics: dict[str, Any]) -> str:
    """A few console lines: each trainer's gold start → end, KL, memory and speed, and where the files are."""
    lines = [""]
    for name, t in metrics["trainers"].items():
        state = t.get("state_memory_mb", {}).get("mean")
        lines.append(
            f"{name.upper():<5} gold {t['gold_start']['mean']:+.3f} -> {t['gold_end']['mean']:+.3f} (peak "
            f"{t['gold_peak']['mean']:+.3f}), KL {t['kl_end']['mean']:.2f}, collapsed {t['collapsed_fraction']:.0%}, "
            f"peak memory {t['peak_memory_mb']['mean']:.0f} MB"
            + (f", training state {state:.1f} MB" if state is not None else "")
            + f", {t['seconds_per_step']['mean']:.2f} s/step"
        )
    return "\n".join(lines + experiment_file_lines(output_dir, "compare", "runs/<trainer>_seed<k>/"))

"""Reward over-optimisation monitor: proxy reward vs gold reward vs KL during RL, with peak detection, a checkpoint
at the gold peak and optional early stopping.

Goodhart's law in RLHF (Gao, Schulman & Hilton 2022, arXiv 2210.10760): as the policy moves away from its start
(KL grows), the proxy reward model's score keeps rising while the true ("gold") reward first rises, peaks and then
falls. A KL penalty acts much like early stopping; this callback does the early stopping explicitly.

Where the numbers come from:

* **logs mode** (default): TRL logs each reward function's batch mean as ``rewards/<name>/mean``. Pass the gold reward
  to the trainer with weight 0 (``reward_weights=[1, 0]``) and it is tracked without steering training.
* **sample mode** (``eval_prompts=...``): every ``every_n_steps`` steps, completions for a fixed held-out prompt set
  are sampled and scored with the ``proxy`` and ``gold`` functions (and the sequence-level KL is measured when a
  reference is available without a copy: a PEFT policy or TRL's ``ref_model``).

One KL series per run (``kl_source`` in the findings, the JSON file and the plot's axis label): the held-out
sequence-level k3 (``"held_out_k3"``) when a KL measurement is available — measured on this callback's own held-out
samples in sample mode, or read from a :class:`KLToReferenceCallback` on the same trainer — and then only at the steps
where it was measured; otherwise TRL's per-token training ``kl`` (``"training_kl"``, logged only when β > 0). The two
are different quantities (a sequence sum on fresh samples vs a token mean on the training batch) and are never mixed.
Every value is stored with the step it was measured at.

Without a gold reward, pass a held-out judge as ``gold``: a second reward model
(``hf_rlhf_ext.rewards.RewardModelFunction``) or an ensemble penalised by its disagreement
(``hf_rlhf_ext.rewards.ensemble_judge``; Coste et al. 2023, arXiv 2310.02743).

Detection: both curves are smoothed (EMA or moving window). A new gold peak is a smoothed value above the peak so far
by more than a noise threshold; the fall is confirmed after ``patience`` measurements without a new peak with the
smoothed gold below ``peak − threshold``. The threshold is ``min_delta`` when given; by default (``min_delta=None``)
it is the measurement's own standard error, gold's sample std / sqrt(number of scored completions) at that evaluation
(sample mode: the held-out samples; logs mode: TRL's ``rewards/<gold>/std`` over the generation batch; 0 when neither
is known, e.g. :meth:`update` called without ``gold_se``). A rise within the threshold does not move the peak, so the
peak can sit below a later value: ``max_gold`` / ``max_gold_step`` in the findings are the real maximum of the
smoothed gold series, and the plot marks that maximum, calling the detector's point "peak" only when nothing after it
is higher. "Proxy still rising while gold falls" (smoothed proxy above its value at the peak while gold is below
``peak − threshold``) is logged as ``overopt/flag`` and warned about once; when it holds at the confirmed fall,
``detected`` is set and, with ``stop_on_overoptimization=True``, training stops.

Checkpoint at the gold peak (``save_peak=True``): at every new smoothed peak the model (an adapter only, for PEFT) and
tokenizer are saved to ``<output_dir>/gold_peak`` with ``trainer.save_model`` (all processes take part, the main
process writes). Cost: one ``save_pretrained`` per new peak — while gold climbs, that is every measurement; for a
large full model, measure less often or set ``save_peak=False``.

Forecast (``forecast=True``): at each measurement, Gao et al.'s RL form R(d) = d(α − β ln d), d = sqrt(KL), is fitted
to the raw gold gain over the first measurement against the KL, and the KL of its peak, exp(2α/β − 2), is logged with a
bootstrap 5–95th percentile interval while the fit is valid (:func:`forecast_gold_peak`). ``stop_at_forecast=True``
stops training at the first measurement whose KL has reached the forecast peak KL with an interval narrower than
``forecast_max_ratio`` (high / low): gold is flat near its peak, so stopping at the estimate costs little either way.

Ensemble disagreement (``ensemble=``, sample mode): the mean over held-out samples of the std of the members' scores,
``overopt/ensemble_std`` — it rises where the reward models leave their training data (Coste et al. 2023).

At the end, ``overoptimization.json`` (curves and findings) and ``overoptimization.png`` are written to the output
directory from the main process. :meth:`OveroptimizationCallback.findings` returns an
:class:`OveroptimizationFindings`.

Logged keys: ``overopt/gold``, ``overopt/proxy`` (smoothed), ``overopt/kl``, ``overopt/gold_peak``,
``overopt/gold_max``, ``overopt/peak_step``, ``overopt/flag`` (and ``overopt/forecast_peak_kl``, ``_low``, ``_high``,
``overopt/ensemble_std`` when on), in the log record of the step they were measured at. In
logs mode they are added to the record that holds the rewards they come from (``state.log_history`` and the ``logs``
seen by the callbacks after this one: register it with ``trainer.callback_handler.callbacks.insert(0, callback)`` for
reporters such as TensorBoard to see them too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

from transformers import TrainerCallback

from ..objectives import fit_gao
from ..persisted_state import PersistedState
from ..reference import ReferencePolicy
from ._trainer_access import HeldOutSampler, add_metrics, check_supported_trainer, is_main_process, reward_func_name

logger = logging.getLogger(__name__)

__all__ = ["OveroptimizationCallback", "OveroptimizationFindings", "PEAK_DIR", "RESULTS_FILE", "PLOT_FILE"]

PEAK_DIR = "gold_peak"
RESULTS_FILE = "overoptimization.json"
PLOT_FILE = "overoptimization.png"

#: KL sources: name -> the log key it is read from
KL_SOURCES = {"held_out_k3": "kl_ref/k3_seq", "training_kl": "kl"}
_KL_LABELS = {
    "held_out_k3": "held-out KL(π‖π_ref), k3 per sequence",
    "training_kl": "training KL (TRL `kl`, k3 per token)",
}


@dataclass
class OveroptimizationFindings:
    """What the monitor concluded. Gold and proxy values are smoothed unless named ``*_raw``."""

    detected: bool  # gold fell (confirmed) while the proxy stayed above its value at the gold peak
    gold_fell: bool  # gold fall confirmed (patience), whatever the proxy did
    peak_step: int | None
    peak_gold: float | None
    peak_gold_raw: float | None
    final_gold: float | None
    proxy_at_peak: float | None
    final_proxy: float | None
    kl_at_peak: float | None  # KL measured at (or last before) the peak: see kl_at_peak_step and kl_source
    final_kl: float | None
    first_flag_step: int | None  # first measurement where proxy rose while gold was below its peak
    detected_step: int | None
    stopped: bool
    checkpoint_dir: str | None
    checkpoint_step: int | None
    num_points: int
    gold_name: str
    proxy_name: str
    kl_source: str | None = None  # "held_out_k3", "training_kl" or the log key given as kl_key; None: no KL
    kl_at_peak_step: int | None = None  # the step kl_at_peak was measured at (the last measurement <= peak_step)
    final_kl_step: int | None = None
    max_gold: float | None = None  # the highest smoothed gold measured (peak_gold can be lower: a rise within noise)
    max_gold_step: int | None = None
    forecast_peak_kl: float | None = None  # the latest valid forecast of the gold peak's KL (forecast=True)
    forecast_peak_kl_low: float | None = None
    forecast_peak_kl_high: float | None = None  # None also while the interval is unbounded
    forecast_step: int | None = None  # the measurement that latest forecast was made at
    forecast_stop_step: int | None = None  # where stop_at_forecast stopped training

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(float(x))


def standard_error(values: list[float]) -> float | None:
    """Sample std / sqrt(n) of the finite values: how much their mean moves between two draws of as many samples
    (None for fewer than two)."""
    v = [float(x) for x in values if _finite(x)]
    if len(v) < 2:
        return None
    mean = sum(v) / len(v)
    return math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v))


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0–100) of sorted values, linearly interpolated between neighbours (numpy's default); inf
    when an infinite neighbour takes part."""
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return a + (b - a) * (pos - lo)


def _bootstrap_peak_kls(
    d: list[float], gain: list[float], resamples: int, seed: int, baseline_se: float
) -> list[float]:
    """Peak KL of the RL-form fit on each bootstrap resample of the (d, gain) points (drawn with replacement, n of n),
    sorted; inf for a resample whose fit never turns down (β ≤ 0): its peak lies beyond any KL. A resample with a
    single distinct d determines no slope and is left out. The baseline's own error is one offset shared by every
    gain, which resampling the points cannot show: each resample also shifts all gains by a draw of
    N(0, baseline_se)."""
    rng = random.Random(seed)
    n, peaks = len(d), []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        shift = rng.gauss(0.0, baseline_se) if baseline_se > 0 else 0.0
        try:
            fit = fit_gao([d[i] for i in idx], [gain[i] + shift for i in idx], form="rl")
        except ValueError:
            continue
        peaks.append(math.inf if fit.peak_kl is None else fit.peak_kl)
    return sorted(peaks)


def forecast_gold_peak(
    kl: list[float], gain: list[float], resamples: int = 200, seed: int = 0, min_points: int = 4,
    interval: tuple[float, float] = (5.0, 95.0), baseline_se: float | None = None,
) -> dict[str, Any]:
    """Forecasts the KL at which the gold gain will peak from the points measured so far, before it is reached.

    Fits Gao et al.'s (2022, arXiv 2210.10760, eq. for RL) form R(d) = d(α − β ln d), d = sqrt(KL), with
    :func:`hf_rlhf_ext.objectives.fit_gao`. R'(d) = α − β(ln d + 1) = 0 gives d* = exp(α/β − 1), a maximum when β > 0
    (R''(d*) = −β/d*), so the peak KL is d*² = exp(2α/β − 2). The interval is the ``interval`` percentiles of the peak
    KL over ``resamples`` bootstrap resamples of the points (a seeded generator: the same points give the same
    interval; ``baseline_se``, the standard error of the gold the gains are measured from, adds that offset's error).
    Returns ``peak_kl``, ``low``, ``high`` (None: unbounded, some resamples never turn down) and ``reason``
    (None when the forecast may be read; else why not, and the peak keys are None).
    """
    pts = [(math.sqrt(k), g) for k, g in zip(kl, gain) if _finite(k) and _finite(g) and k > 1e-12]
    out: dict[str, Any] = {"peak_kl": None, "low": None, "high": None, "reason": None, "n_points": len(pts)}
    if len(pts) < max(min_points, 2) or len({x for x, _ in pts}) < 2:
        out["reason"] = f"{len(pts)} points with KL > 0; the forecast needs {max(min_points, 2)} with distinct KL"
        return out
    d, g = [x for x, _ in pts], [y for _, y in pts]
    fit = fit_gao(d, g, form="rl")
    out["reason"] = fit.reason or (None if fit.peak_kl is not None else "the fitted gold gain never turns down (β ≤ 0)")
    if out["reason"] is not None:
        return out
    peaks = _bootstrap_peak_kls(d, g, resamples, seed, float(baseline_se) if _finite(baseline_se) else 0.0)
    low, high = (_percentile(peaks, q) if peaks else math.inf for q in interval)
    out.update(peak_kl=fit.peak_kl, low=low if math.isfinite(low) else None, high=high if math.isfinite(high) else None)
    return out


def ensemble_std(member_scores: list[list[float]]) -> float | None:
    """Mean over samples of the sample std (n − 1) of the members' scores for that sample: how much the reward models
    of an ensemble disagree on the policy's completions (Coste et al. 2023, arXiv 2310.02743). It grows as the policy
    leaves the data they were trained on, where a proxy can be exploited, often before the gold reward turns down.
    Non-finite scores are left out; a sample with fewer than two finite scores has no std. None when no sample has."""
    stds = []
    for row in zip(*member_scores):
        vals = [float(v) for v in row if _finite(v)]
        if len(vals) >= 2:
            mean = sum(vals) / len(vals)
            stds.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)))
    return sum(stds) / len(stds) if stds else None

#: what a point holds about the forecast and is logged as ``overopt/<key>`` (None — not logged — while no forecast)
_FORECAST_KEYS = ("forecast_peak_kl", "forecast_peak_kl_low", "forecast_peak_kl_high")

# what a resume must restore: the curve and the detector's state (best-so-far, peak, patience, flags, checkpoint)
_STATE_FIELDS = (
    "points", "_best", "_peak_index", "_since_peak", "_flag_step", "_warned", "_detected_step", "_gold_fell",
    "_stopped", "_checkpoint_step", "_checkpoint_dir", "kl_source", "_kl_synced_step", "_forecast_stop_step",
)


class OveroptimizationCallback(TrainerCallback, PersistedState):
    """Tracks proxy reward, gold reward (or a held-out judge) and KL; finds the gold peak; saves/stops there.

    Args:
        trainer: the trainer (``trl.GRPOTrainer`` / ``trl.RLOOTrainer`` or subclass). Needed for sample mode, for
            saving the peak checkpoint with ``trainer.save_model`` and for default reward names; in logs mode without
            a trainer, ``gold`` must be given and the peak is saved with the ``model``/``processing_class`` that
            ``on_log`` receives.
        proxy: the optimised reward — a reward-function name (logged as ``rewards/<name>/mean``), a log key
            (e.g. ``"reward"``, the weighted sum) or, in sample mode, a reward function. Default: the only reward
            function with non-zero weight, else ``"reward"``.
        gold: the gold reward or held-out judge — a name/log key, or a reward function. Default: the only reward
            function with weight 0.
        eval_prompts: held-out prompts; given → sample mode (see the module docstring).
        mode: "auto" (sample mode iff ``eval_prompts`` is given), "logs" or "sample".
        every_n_steps, num_samples, batch_size, max_new_tokens, temperature, seed: sample-mode settings (defaults
            as :class:`KLToReferenceCallback`: one training generation batch, the trainer's length and temperature).
        kl_key: the log key of the one KL series to track (default: held-out k3 when measured — sample mode with a
            reference, or a ``KLToReferenceCallback`` on the trainer — else TRL's training ``kl``).
        measure_kl: sample mode: measure sequence KL on the same samples (default: when a reference exists without a
            copy, or ``allow_reference_copy``).
        smoothing: "ema" (weight ``ema_alpha`` on the newest value) or "window" (mean of the last ``window``).
        patience, min_delta: peak detection (measurements without a new peak; the change of smoothed gold that counts
            as a rise or a fall). ``min_delta=None`` (default): each measurement's own standard error of gold.
        proxy_min_delta: how much above its value at the peak the proxy must be to count as "still rising".
        save_peak: save the model + tokenizer at each new gold peak to ``<output_dir>/gold_peak``.
        stop_on_overoptimization: set ``control.should_training_stop`` once ``detected``.
        output_dir: where to write files (default: ``args.output_dir``).
        plot: write ``overoptimization.png`` at the end.
        forecast: forecast the gold peak's KL at each measurement (see the module docstring); ``seed`` seeds its
            bootstrap of ``forecast_resamples`` resamples; no forecast before ``forecast_min_points`` points with
            KL > 0.
        stop_at_forecast: set ``control.should_training_stop`` once the measured KL reaches the forecast peak KL with
            an interval high / low <= ``forecast_max_ratio`` (implies ``forecast``).
        ensemble: sample mode: the member reward functions of an ensemble (a list, or an ``ensemble_reward`` /
            ``ensemble_judge`` function), for ``overopt/ensemble_std`` on the held-out samples.
    """

    def __init__(
        self,
        trainer: Any = None,
        proxy: str | Callable[..., Any] | None = None,
        gold: str | Callable[..., Any] | None = None,
        eval_prompts: Any = None,
        mode: Literal["auto", "logs", "sample"] = "auto",
        every_n_steps: int = 10,
        num_samples: int | None = None,
        kl_key: str | None = None,
        measure_kl: bool | None = None,
        allow_reference_copy: bool = False,
        smoothing: Literal["ema", "window"] = "ema",
        ema_alpha: float = 0.5,
        window: int = 3,
        patience: int = 3,
        min_delta: float | None = None,
        proxy_min_delta: float = 0.0,
        save_peak: bool = True,
        stop_on_overoptimization: bool = False,
        output_dir: str | None = None,
        plot: bool = True,
        measure_at_start: bool = True,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int = 1234,
        forecast: bool = False,
        stop_at_forecast: bool = False,
        forecast_resamples: int = 200,
        forecast_min_points: int = 4,
        forecast_max_ratio: float = 2.0,
        ensemble: Any = None,
    ) -> None:
        if mode not in ("auto", "logs", "sample"):
            raise ValueError(f"mode must be 'auto', 'logs' or 'sample', got {mode!r}.")
        if smoothing not in ("ema", "window"):
            raise ValueError(f"smoothing must be 'ema' or 'window', got {smoothing!r}.")
        if not 0 < ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}.")
        if window < 1 or patience < 1 or every_n_steps < 1:
            raise ValueError("window, patience and every_n_steps must be >= 1.")
        if (min_delta is not None and min_delta < 0) or proxy_min_delta < 0:
            raise ValueError("min_delta and proxy_min_delta must be >= 0.")
        if forecast_resamples < 1 or forecast_min_points < 2 or not forecast_max_ratio >= 1:
            raise ValueError("forecast_resamples must be >= 1, forecast_min_points >= 2, forecast_max_ratio >= 1.")
        self.mode = "sample" if (mode == "sample" or (mode == "auto" and eval_prompts is not None)) else "logs"
        if trainer is not None or self.mode == "sample":
            check_supported_trainer(trainer, type(self).__name__, needs=("accelerator", "_metrics"))
        self.trainer = trainer
        self.smoothing, self.ema_alpha, self.window = smoothing, ema_alpha, window
        self.patience, self.min_delta, self.proxy_min_delta = patience, min_delta, proxy_min_delta
        self.save_peak, self.stop_on_overoptimization = save_peak, stop_on_overoptimization
        self.output_dir, self.plot = output_dir, plot
        self.every_n_steps, self.measure_at_start = every_n_steps, measure_at_start
        self.kl_key = kl_key
        self.forecast, self.stop_at_forecast = forecast or stop_at_forecast, stop_at_forecast
        self.forecast_resamples, self.forecast_min_points = forecast_resamples, forecast_min_points
        self.forecast_max_ratio, self.seed = forecast_max_ratio, seed

        self.proxy_func, self.gold_func = None, None
        self.proxy_name, self.proxy_key = self._resolve(proxy, "proxy")
        self.gold_name, self.gold_key = self._resolve(gold, "gold")

        self.sampler: HeldOutSampler | None = None
        self.reference: ReferencePolicy | None = None
        if self.mode == "sample":
            if eval_prompts is None:
                raise ValueError("Sample mode needs eval_prompts (held-out prompts).")
            if self.proxy_func is None or self.gold_func is None:
                raise ValueError(
                    "Sample mode scores held-out samples itself: proxy and gold must be reward functions, or names of "
                    f"the trainer's reward functions ({list(getattr(trainer, 'reward_func_names', []))})."
                )
            self.sampler = HeldOutSampler(
                trainer, eval_prompts, num_samples=num_samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                temperature=temperature, seed=seed,
            )
            if measure_kl is None:
                try:
                    self.reference = ReferencePolicy(trainer, allow_copy=allow_reference_copy, who="")
                except ValueError:
                    self.reference = None
            elif measure_kl:
                self.reference = ReferencePolicy(trainer, allow_copy=allow_reference_copy, who=type(self).__name__)
        self.ensemble_funcs = self._ensemble_members(ensemble)

        # state
        self.points: list[dict[str, Any]] = []  # raw and smoothed values per measurement
        self._best: float | None = None
        self._peak_index: int | None = None
        self._since_peak = 0
        self._flag_step: int | None = None
        self._warned = False
        self._detected_step: int | None = None
        self._gold_fell = False
        self._stopped = False
        self._checkpoint_step: int | None = None
        self._checkpoint_dir: str | None = None
        self._forecast_stop_step: int | None = None
        self.kl_source: str | None = None  # decided at train begin, fixed for the run
        self._kl_by_step: dict[int, float] = {}  # KL measured at a step that has no point yet
        self._kl_synced_step = -1  # last step of the KLToReferenceCallback history already read
        self._args_output_dir: str | None = None

    # -- configuration -------------------------------------------------------------------------------------------------
    def _reward_funcs(self) -> list[tuple[str, Any, float]]:
        t = self.trainer
        if t is None or not hasattr(t, "reward_funcs"):
            return []
        weights = [float(w) for w in t.reward_weights]
        return list(zip(t.reward_func_names, t.reward_funcs, weights))

    def _resolve(self, spec: Any, role: str) -> tuple[str, str]:
        """Returns (display name, log key) for the proxy or gold spec; sets ``<role>_func`` for sample mode."""
        funcs = self._reward_funcs()
        if spec is None:
            if role == "proxy":
                active = [f for f in funcs if f[2] != 0.0]
                spec = active[0][0] if len(active) == 1 else "reward"
            else:
                tracked = [f for f in funcs if f[2] == 0.0]
                if len(tracked) != 1:
                    raise ValueError(
                        "Say which reward is the gold reward (or held-out judge): gold='<reward function name>' or a "
                        "reward function. By default it is the only reward function with weight 0; this trainer has "
                        f"{len(tracked)} (reward_funcs {[f[0] for f in funcs]}, weights {[f[2] for f in funcs]})."
                    )
                spec = tracked[0][0]
        if callable(spec) and not isinstance(spec, str):
            name = reward_func_name(spec)
            if self.mode == "sample":
                setattr(self, f"{role}_func", self._as_function(spec, name))
            elif not any(f[1] is spec or f[0] == name for f in funcs) and self.trainer is not None:
                raise ValueError(
                    f"The {role} function '{name}' is not one of the trainer's reward functions, so it is not in the "
                    "logs: add it to reward_funcs (with weight 0 for a tracked-only reward) or give eval_prompts "
                    "(sample mode)."
                )
            return name, f"rewards/{name}/mean"
        name = str(spec)
        if self.mode == "sample":
            match = [f for f in funcs if f[0] == name]
            if not match:
                raise ValueError(
                    f"Sample mode: '{name}' is not one of the trainer's reward functions "
                    f"({[f[0] for f in funcs]}); pass the function itself."
                )
            setattr(self, f"{role}_func", self._as_function(match[0][1], name))
        key = name if ("/" in name or name in ("reward", "loss")) else f"rewards/{name}/mean"
        return name, key

    def _ensemble_members(self, ensemble: Any) -> list[Callable[..., Any]] | None:
        """The member reward functions of ``ensemble`` (a list of them, or an ``ensemble_reward`` / ``ensemble_judge``
        function, which keeps its members in ``funcs``); None when no ensemble is given."""
        if ensemble is None:
            return None
        if self.mode != "sample":
            raise ValueError("ensemble= scores the held-out samples: it needs sample mode (eval_prompts=...).")
        if callable(ensemble) and not hasattr(ensemble, "funcs"):
            raise ValueError("ensemble= takes the member reward functions (a list) or an ensemble_reward function.")
        members = list(ensemble.funcs if callable(ensemble) else ensemble)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least 2 member reward functions, got {len(members)}.")
        return [self._as_function(f, reward_func_name(f)) for f in members]

    def _as_function(self, func: Any, name: str) -> Callable[..., Any]:
        from torch import nn

        if isinstance(func, nn.Module):
            from ..rewards import RewardModelFunction

            tok = None
            if self.trainer is not None:
                for n, f, pc in zip(
                    self.trainer.reward_func_names, self.trainer.reward_funcs, self.trainer.reward_processing_classes
                ):
                    if f is func:
                        tok = pc
            return RewardModelFunction(func, tokenizer=tok, name=name)
        return func

    # -- core update (also usable directly, e.g. on a saved log history) -----------------------------------------------
    def _smooth(self, key: str, value: float | None) -> float | None:
        prev = [p[key] for p in self.points if _finite(p.get(key))]
        if not _finite(value):
            return None
        if self.smoothing == "window":
            vals = prev[-(self.window - 1) :] if self.window > 1 else []
            vals = vals + [value]
            return sum(vals) / len(vals)
        prev_s = [p[key + "_smooth"] for p in self.points if _finite(p.get(key + "_smooth"))]
        if not prev_s:
            return float(value)
        return self.ema_alpha * float(value) + (1 - self.ema_alpha) * prev_s[-1]

    def _threshold(self, gold_se: float | None) -> float:
        """The change of smoothed gold that counts: ``min_delta`` when given, else this measurement's standard error
        (a smaller move is within the held-out measurement's own noise)."""
        if self.min_delta is not None:
            return self.min_delta
        return float(gold_se) if _finite(gold_se) else 0.0

    def update(
        self, step: int, proxy: float | None, gold: float | None, kl: float | None = None, gold_se: float | None = None,
        ensemble_std: float | None = None,
    ) -> dict[str, Any]:
        """Adds one measurement and updates peak/fall detection (and the forecast, when on); returns what happened
        (``new_peak``, ``flag``, ``detected_now``, ``forecast_stop``). ``gold_se``: the standard error of ``gold``
        (used as the threshold when ``min_delta`` is None); ``ensemble_std``: the members' disagreement."""
        delta = self._threshold(gold_se)
        gold_s = self._smooth("gold", gold)
        proxy_s = self._smooth("proxy", proxy)
        if kl is None:
            kl = self._kl_by_step.pop(int(step), None)
        self._kl_by_step = {s: v for s, v in self._kl_by_step.items() if s > step}  # earlier ones have no point
        point = {
            "step": int(step), "proxy": proxy, "gold": gold, "kl": kl, "proxy_smooth": proxy_s, "gold_smooth": gold_s,
            "gold_se": float(gold_se) if _finite(gold_se) else None, "threshold": delta,
        }
        if ensemble_std is not None:
            point["ensemble_std"] = ensemble_std
        self.points.append(point)
        event = {"new_peak": False, "flag": False, "detected_now": False, "forecast_stop": False}
        if self.forecast:
            point.update(self._forecast())
            event["forecast_stop"] = self._forecast_says_stop(point)
        if gold_s is None:
            return event
        if self._best is None or gold_s > self._best + delta:
            self._best, self._peak_index, self._since_peak = gold_s, len(self.points) - 1, 0
            event["new_peak"] = True
        else:
            self._since_peak += 1
        peak = self.points[self._peak_index]
        below = gold_s < self._best - delta
        proxy_up = (
            proxy_s is not None
            and _finite(peak["proxy_smooth"])
            and proxy_s > peak["proxy_smooth"] + self.proxy_min_delta
        )
        if below and proxy_up:
            event["flag"] = True
            if self._flag_step is None:
                self._flag_step = int(step)
        if below and self._since_peak >= self.patience:
            self._gold_fell = True
            if proxy_up and self._detected_step is None:
                self._detected_step = int(step)
                event["detected_now"] = True
        point["flag"] = event["flag"]
        return event

    def _forecast(self) -> dict[str, Any]:
        """The gold-peak forecast from the points so far (:func:`forecast_gold_peak`), as the ``forecast_*`` keys of a
        point. Raw gold (smoothing would pair each KL with a lagged gold), as a gain over the first measured gold; the
        points whose KL is known; the bootstrap seeded by ``seed`` and the number of points (a resume repeats it)."""
        base = next((p for p in self.points if _finite(p["gold"])), None)
        pts = [p for p in self.points if _finite(p["gold"]) and _finite(p["kl"])] if base else []
        fc = forecast_gold_peak(
            [p["kl"] for p in pts], [p["gold"] - base["gold"] for p in pts], resamples=self.forecast_resamples,
            seed=self.seed * 1_000_003 + len(self.points), min_points=self.forecast_min_points,
            baseline_se=base["gold_se"] if base else None,
        )
        return {"forecast_peak_kl": fc["peak_kl"], "forecast_peak_kl_low": fc["low"],
                "forecast_peak_kl_high": fc["high"], "forecast_reason": fc["reason"]}

    def _forecast_says_stop(self, point: dict[str, Any]) -> bool:
        """``stop_at_forecast``'s rule, once: the latest measured KL has reached the forecast peak KL, and the forecast
        is sharp enough to act on (a bounded interval with high / low <= ``forecast_max_ratio``)."""
        if not self.stop_at_forecast or self._forecast_stop_step is not None or point["forecast_peak_kl"] is None:
            return False
        low, high = point["forecast_peak_kl_low"], point["forecast_peak_kl_high"]
        latest_kl = next((p["kl"] for p in reversed(self.points) if _finite(p["kl"])), None)
        if high is None or low is None or low <= 0 or high / low > self.forecast_max_ratio or latest_kl is None:
            return False
        if latest_kl < point["forecast_peak_kl"]:
            return False
        self._forecast_stop_step = point["step"]
        return True

    def findings(self) -> OveroptimizationFindings:
        """The monitor's conclusions so far."""
        peak = self.points[self._peak_index] if self._peak_index is not None else None
        last_gold = next((p for p in reversed(self.points) if p["gold_smooth"] is not None), None)
        last_proxy = next((p for p in reversed(self.points) if p["proxy_smooth"] is not None), None)
        measured = [p for p in self.points if _finite(p["kl"])]
        last_kl = measured[-1] if measured else None
        kl_peak = next((p for p in reversed(measured) if peak and p["step"] <= peak["step"]), None)
        top = self._max_gold_point()
        return OveroptimizationFindings(
            detected=self._detected_step is not None,
            gold_fell=self._gold_fell,
            peak_step=peak["step"] if peak else None,
            peak_gold=peak["gold_smooth"] if peak else None,
            peak_gold_raw=peak["gold"] if peak else None,
            final_gold=last_gold["gold_smooth"] if last_gold else None,
            proxy_at_peak=peak["proxy_smooth"] if peak else None,
            final_proxy=last_proxy["proxy_smooth"] if last_proxy else None,
            kl_at_peak=kl_peak["kl"] if kl_peak else None,
            final_kl=last_kl["kl"] if last_kl else None,
            first_flag_step=self._flag_step,
            detected_step=self._detected_step,
            stopped=self._stopped,
            checkpoint_dir=self._checkpoint_dir,
            checkpoint_step=self._checkpoint_step,
            num_points=len(self.points),
            gold_name=self.gold_name,
            proxy_name=self.proxy_name,
            kl_source=self.kl_source if measured else None,
            kl_at_peak_step=kl_peak["step"] if kl_peak else None,
            final_kl_step=last_kl["step"] if last_kl else None,
            max_gold=top["gold_smooth"] if top else None,
            max_gold_step=top["step"] if top else None,
            **self._forecast_findings(),
        )

    def _forecast_findings(self) -> dict[str, Any]:
        """The latest valid forecast and where stop_at_forecast stopped (findings fields; empty: the defaults)."""
        last = next((p for p in reversed(self.points) if p.get("forecast_peak_kl") is not None), None)
        out: dict[str, Any] = {"forecast_stop_step": self._forecast_stop_step}
        if last is not None:
            out.update({key: last[key] for key in _FORECAST_KEYS}, forecast_step=last["step"])
        return out

    def _max_gold_point(self) -> dict[str, Any] | None:
        """The measurement with the highest smoothed gold (the first of equal ones)."""
        scored = [p for p in self.points if _finite(p["gold_smooth"])]
        return max(scored, key=lambda p: p["gold_smooth"]) if scored else None

    # -- the one KL series -------------------------------------------------------------------------------------------
    def _kl_monitor(self) -> Any:
        """The trainer's ``KLToReferenceCallback`` (held-out KL measured at known steps), if one is registered."""
        from .kl_reference import KLToReferenceCallback

        handler = getattr(self.trainer, "callback_handler", None)
        found = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, KLToReferenceCallback)]
        return found[0] if found else None

    def _choose_kl_source(self) -> str:
        """Held-out k3 when it is measured (by us in sample mode, or by a KLToReferenceCallback), else training KL."""
        if self.kl_key is not None:
            return next((name for name, key in KL_SOURCES.items() if key == self.kl_key), self.kl_key)
        if self.reference is not None or self._kl_monitor() is not None:
            return "held_out_k3"
        return "training_kl"

    def _record_kl(self, step: int, value: Any) -> None:
        """Attaches a KL measured at ``step`` to the point of that step (kept until the point exists)."""
        if not _finite(value):
            return
        point = next((p for p in reversed(self.points) if p["step"] == step), None)
        if point is None:
            self._kl_by_step[int(step)] = float(value)
        elif point["kl"] is None:
            point["kl"] = float(value)

    def _collect_kl(self, step: int, logs: dict[str, Any]) -> None:
        """Reads newly measured KL values: the KL monitor's history (exact steps) or this log record's KL key."""
        if self.kl_source == "held_out_k3" and self.reference is not None:
            return  # measured by _measure on its own samples
        monitor = self._kl_monitor() if self.kl_source == "held_out_k3" else None
        if monitor is not None:
            for entry in monitor.history:
                if entry["step"] > self._kl_synced_step:
                    self._record_kl(entry["step"], entry[KL_SOURCES["held_out_k3"]])
                    self._kl_synced_step = entry["step"]
            return
        self._record_kl(step, logs.get(KL_SOURCES.get(self.kl_source, self.kl_source)))

    # -- reacting to an update -----------------------------------------------------------------------------------------
    def _point_metrics(self, point: dict[str, Any], flag: bool) -> dict[str, Any]:
        return {
            "overopt/gold": point["gold_smooth"],
            "overopt/proxy": point["proxy_smooth"],
            "overopt/kl": point["kl"] if _finite(point["kl"]) else None,
            "overopt/gold_peak": self._best,
            "overopt/gold_max": (self._max_gold_point() or {}).get("gold_smooth"),
            "overopt/peak_step": self.points[self._peak_index]["step"] if self._peak_index is not None else None,
            "overopt/flag": float(flag),
            "overopt/ensemble_std": point.get("ensemble_std"),
            **{f"overopt/{key}": point.get(key) for key in _FORECAST_KEYS},
        }

    def _after_update(self, event: dict[str, Any], args, state, control, model=None, processing_class=None) -> None:
        point = self.points[-1]
        if event["flag"] and not self._warned and is_main_process(state):
            self._warned = True
            peak = self.points[self._peak_index]
            msg = (
                f"Reward over-optimisation: at step {point['step']} the proxy '{self.proxy_name}' "
                f"({point['proxy_smooth']:.4g}) is above its value at the gold peak ({peak['proxy_smooth']:.4g}, step "
                f"{peak['step']}) while the gold '{self.gold_name}' fell from {self._best:.4g} to "
                f"{point['gold_smooth']:.4g}."
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)  # once: not also through the logger
        if event["new_peak"] and self.save_peak and state.global_step > 0:
            self._save_peak(args, state, model, processing_class)
        if event["detected_now"] and self.stop_on_overoptimization:
            self._stop(state, control, f"Stopping training at step {point['step']}: gold fell for {self.patience} "
                       f"measurements after its peak at step {self.points[self._peak_index]['step']} while the proxy "
                       "kept rising.")
        if event["forecast_stop"]:
            self._stop(state, control, f"Stopping training at step {point['step']}: the KL reached the forecast gold "
                       f"peak's KL ({point['forecast_peak_kl']:.4g}, interval {point['forecast_peak_kl_low']:.4g}–"
                       f"{point['forecast_peak_kl_high']:.4g}).")

    def _stop(self, state, control, message: str) -> None:
        control.should_training_stop = True
        self._stopped = True
        if is_main_process(state):
            logger.warning(message)

    def _out_dir(self, args) -> str:
        return self.output_dir or getattr(args, "output_dir", None) or self._args_output_dir or "."

    def _save_peak(self, args, state, model=None, processing_class=None) -> None:
        path = os.path.join(self._out_dir(args), PEAK_DIR)
        if self.trainer is not None:
            self.trainer.save_model(path)  # every process calls it (ZeRO-3 gathers); the main process writes
        elif is_main_process(state) and model is not None:
            model.save_pretrained(path)
            if processing_class is not None:
                processing_class.save_pretrained(path)
        else:
            return
        peak = self.points[self._peak_index]
        self._checkpoint_step, self._checkpoint_dir = int(state.global_step), path
        if is_main_process(state):
            info = {"global_step": int(state.global_step), **{k: peak[k] for k in ("step", "gold", "gold_smooth",
                                                                                    "proxy", "proxy_smooth", "kl")}}
            with open(os.path.join(path, "peak_info.json"), "w") as f:
                json.dump(info, f, indent=2)

    # -- state kept across a resume (in the checkpoint's trainer_state.json) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **{name.lstrip("_"): getattr(self, name) for name in _STATE_FIELDS},
            "kl_by_step": {str(step): kl for step, kl in self._kl_by_step.items()},  # JSON keys are strings
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"forecast_stop_step": None, **state}  # checkpoints written before the forecast existed
        for name in _STATE_FIELDS:
            setattr(self, name, state[name.lstrip("_")])
        self._kl_by_step = {int(step): kl for step, kl in state["kl_by_step"].items()}

    # -- TrainerCallback events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._args_output_dir = args.output_dir
        self.restore(args, state, getattr(getattr(self.trainer, "callback_handler", None), "callbacks", None))
        if self.reference is not None:
            from .kl_reference import check_reference_on_resume

            check_reference_on_resume(self.reference, state, type(self).__name__)
        if self.kl_source is None:
            self.kl_source = self._choose_kl_source()
        if self.reference is not None:
            self.reference.snapshot()
        if self.mode == "sample" and self.measure_at_start and not self.points:
            self._measure(args, state, control, **kwargs)  # the step-0 baseline: in `points`, no log record of its own

    def on_step_end(self, args, state, control, **kwargs):
        if (
            self.mode == "sample"
            and state.global_step % self.every_n_steps == 0
            and not (self.points and self.points[-1]["step"] == state.global_step)
        ):
            event = self._measure(args, state, control, **kwargs)
            # the log record of this step is written after on_step_end: the values land in it
            add_metrics(self.trainer, self._point_metrics(self.points[-1], event["flag"]))
        return control

    def _measure(self, args, state, control, **kwargs) -> dict[str, Any]:
        from .kl_reference import measure_sequence_kl

        sampler = self.sampler
        kl = None
        with sampler.policy_for_generation() as policy:
            wants_kl = self.reference is not None and self.kl_source == "held_out_k3"
            batch = sampler.sample(policy, state.global_step, full_log_probs=wants_kl)  # the exact KL's log π
            proxy_vals, gold_vals = sampler.score([self.proxy_func, self.gold_func], batch, state)
            members = sampler.score(self.ensemble_funcs, batch, state) if self.ensemble_funcs else None
            if wants_kl:
                kl = measure_sequence_kl(sampler, self.reference, state.global_step, batch=batch, policy=policy)[
                    KL_SOURCES["held_out_k3"]
                ]
        proxy_vals, gold_vals = sampler.gather(proxy_vals), sampler.gather(gold_vals)
        mean = lambda xs: (lambda v: sum(v) / len(v) if v else None)([x for x in xs if math.isfinite(x)])  # noqa
        se = standard_error(gold_vals)
        ens_std = ensemble_std([sampler.gather(m) for m in members]) if members else None
        event = self.update(state.global_step, mean(proxy_vals), mean(gold_vals), kl, gold_se=se, ensemble_std=ens_std)
        self._after_update(event, args, state, control, kwargs.get("model"), kwargs.get("processing_class"))
        return event

    def _logged_gold_se(self, logs: dict[str, Any], args: Any) -> float | None:
        """Standard error of a logged gold mean: TRL's ``rewards/<name>/std`` over sqrt(the generation batch), the
        completions it was measured on (None when either is unknown)."""
        if not self.gold_key.endswith("/mean"):
            return None
        std = logs.get(self.gold_key[: -len("/mean")] + "/std")
        n = getattr(args, "generation_batch_size", None)
        if not (_finite(std) and isinstance(n, int) and n > 1):
            return None
        return float(std) / math.sqrt(n)

    @staticmethod
    def _add_to_record(logs: dict[str, Any], state, values: dict[str, Any]) -> None:
        """Adds values to the log record being handled: ``logs`` (seen by the callbacks after this one) and the copy the
        Trainer stored in ``state.log_history`` just before calling ``on_log``."""
        values = {k: v for k, v in values.items() if v is not None}
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or any(k.startswith("eval_") for k in logs):
            return
        self._collect_kl(state.global_step, logs)
        if self.mode != "logs":
            # sample mode: a KL that arrived after this step's measurement (training KL, a monitor's) joins its record
            last = self.points[-1] if self.points else None
            if last and last["step"] == state.global_step and _finite(last["kl"]) and "overopt/kl" not in logs:
                self._add_to_record(logs, state, {"overopt/kl": last["kl"]})
            return
        has_rewards = any(k.startswith("rewards/") for k in logs) or "reward" in logs
        if not has_rewards:
            return  # e.g. the end-of-training summary record
        missing = [k for k in (self.proxy_key, self.gold_key) if k not in logs]
        if missing:
            raise KeyError(
                f"{type(self).__name__}: the training logs have no {missing}. Reward keys logged: "
                f"{sorted(k for k in logs if k.startswith('reward'))}. Pass the gold reward to the trainer "
                "(reward_funcs=[proxy, gold], reward_weights=[1, 0]) or name the logged rewards with proxy=/gold=."
            )
        proxy, gold = logs.get(self.proxy_key), logs.get(self.gold_key)
        event = self.update(
            state.global_step, float(proxy) if _finite(proxy) else None, float(gold) if _finite(gold) else None,
            gold_se=self._logged_gold_se(logs, args),
        )
        self._add_to_record(logs, state, self._point_metrics(self.points[-1], event["flag"]))
        self._after_update(event, args, state, control, kwargs.get("model"), kwargs.get("processing_class"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not is_main_process(state):
            return
        out = self._out_dir(args)
        os.makedirs(out, exist_ok=True)
        result = {
            "findings": self.findings().to_dict(),
            "points": self.points,
            "settings": {
                "mode": self.mode, "proxy_key": self.proxy_key, "gold_key": self.gold_key,
                "smoothing": self.smoothing, "ema_alpha": self.ema_alpha, "window": self.window,
                "patience": self.patience, "min_delta": self.min_delta, "proxy_min_delta": self.proxy_min_delta,
                "threshold": "min_delta" if self.min_delta is not None else "gold standard error per measurement",
                "every_n_steps": self.every_n_steps if self.mode == "sample" else None,
                "kl_source": self.kl_source,
                "forecast": self.forecast, "stop_at_forecast": self.stop_at_forecast,
                "forecast_resamples": self.forecast_resamples, "forecast_max_ratio": self.forecast_max_ratio,
            },
        }
        from ..results import _jsonable

        tmp = os.path.join(out, RESULTS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(_jsonable(result), f, indent=2)
        os.replace(tmp, os.path.join(out, RESULTS_FILE))
        if self.plot and self.points:
            self.save_plot(os.path.join(out, PLOT_FILE))

    def _plot_marks(self, f: OveroptimizationFindings) -> list[tuple[int, float, str]]:
        """(step, smoothed gold, label) to mark: the maximum of the smoothed gold, called "gold peak" when the
        detector's peak is that point; a detector peak lower than a later value is only "last rise above noise"."""
        if f.max_gold_step is None:
            return []
        if f.peak_step is None or f.peak_step == f.max_gold_step or f.peak_gold >= f.max_gold:
            return [(f.max_gold_step, f.max_gold, "gold peak")]
        return [(f.max_gold_step, f.max_gold, "gold max (a rise within noise)"),
                (f.peak_step, f.peak_gold, "last rise above noise")]

    def save_plot(self, path: str) -> str:
        """Gold and proxy (raw and smoothed) and KL against step, with the gold peak marked (matplotlib Agg)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [p["step"] for p in self.points]
        has_kl = any(_finite(p["kl"]) for p in self.points)
        fig = Figure(figsize=(7, 5.5 if has_kl else 3.5))
        FigureCanvasAgg(fig)
        axes = fig.subplots(2 if has_kl else 1, 1, sharex=True, squeeze=False)[:, 0]
        ax = axes[0]
        for key, colour, label in (("gold", "tab:green", self.gold_name), ("proxy", "tab:blue", self.proxy_name)):
            raw = [p[key] if _finite(p[key]) else float("nan") for p in self.points]
            sm = [p[key + "_smooth"] if _finite(p[key + "_smooth"]) else float("nan") for p in self.points]
            ax.plot(steps, raw, color=colour, alpha=0.3, lw=1)
            ax.plot(steps, sm, color=colour, lw=2, label=f"{label} ({'gold' if key == 'gold' else 'proxy'})")
        f = self.findings()
        for step, value, label in self._plot_marks(f):
            for a in axes:
                a.axvline(step, color="grey", ls="--", lw=1)
            ax.annotate(label, (step, value), textcoords="offset points", xytext=(4, 4))
        ax.set_ylabel("reward")
        ax.legend(loc="best", fontsize=8)
        title = "over-optimisation detected" if f.detected else "no over-optimisation detected"
        ax.set_title(title)
        if has_kl:
            measured = [p for p in self.points if _finite(p["kl"])]  # only the steps where the KL was measured
            axes[1].plot([p["step"] for p in measured], [p["kl"] for p in measured], "o-", color="tab:red", ms=3)
            axes[1].set_ylabel(_KL_LABELS.get(self.kl_source, f"KL ({self.kl_source})"), fontsize=8)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path

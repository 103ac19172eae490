"""Checks that the group-relative advantages a GRPO/RLOO trainer trains on are what the method says they are.

For every checked generation batch it recomputes the advantages from the per-sample rewards TRL stores in
``trainer._logs["rewards"][<func>]`` (gathered over processes), weighted by ``reward_weights`` as TRL does, with the
trainer's own settings, and compares:

* GRPO (DeepSeekMath, arXiv 2402.03300; TRL ``scale_rewards``): A = (r − mean_group) / (std + 1e-4) for "group",
  the batch std for "batch", no division for "none" (Dr. GRPO, arXiv 2503.20783) — via
  :func:`hf_rlhf_ext.objectives.group_advantages`; "normalize_then_sum" aggregation as in TRL.
* RLOO (arXiv 2402.14740): A_i = r_i − mean of the other k − 1 rewards, where r already includes −β·KL_seq when β ≠ 0
  (we recompute that KL with the reference, at checked steps only), optionally normalised over the batch.

Checks (logged under ``adv_check/`` into the trainer's next log record):

* ``max_abs_group_mean``: every group's advantages must average to ≈ 0 (true of all the formulas above);
* ``sign_mismatch_frac``: sign(A) must equal sign(r − group mean);
* ``max_abs_diff``: recomputed ≈ logged — the configured scaling really was applied;
* ``used_vs_logged_diff``: the advantages handed to the loss equal the logged ones for this process's slice;
* ``zero_std_groups`` / ``zero_std_frac``: groups with identical rewards (no signal; DAPO drops them);
* ``max_abs_adv`` / ``num_extreme``: with group scaling |A| ≤ (G − 1)/√G always holds (the largest z-score in a group
  of G with the unbiased std), so anything above ``max_abs_advantage`` (default: that bound) is a bug of the kind
  NeMo-RL #4161 reported (one advantage of 7428 from float residue);
* ``violations``: how many checks failed in the batch.

A violation warns (``on_violation="warn"``) or raises :class:`GroupAdvantageViolation` (``"raise"``).

How it hooks in: on train begin it wraps this trainer instance's ``_generate_and_score_completions`` (TRL calls it
once per generation batch), so each batch is checked exactly once, right after TRL logged it, and the advantages that
the loss will use are at hand; on train end the wrapper is removed. Between checked batches it costs one modulo.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from ..objectives import group_advantages, zero_std_groups
from ..persisted_state import PersistedState
from ._trainer_access import UnsupportedTrainerError, add_metrics, check_supported_trainer, is_main_process

logger = logging.getLogger(__name__)

__all__ = ["GroupAdvantageCheckCallback", "GroupAdvantageViolation", "expected_advantages"]


class GroupAdvantageViolation(RuntimeError):
    """The trainer's advantages break a property of group-relative advantages."""


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaNs (the same arithmetic as ``trl.trainer.utils.nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    std = torch.sqrt(var * count / (count - 1))
    return std if keepdim or dim is None else std.squeeze(dim)


def expected_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    group_size: int,
    method: Literal["grpo", "rloo"] = "grpo",
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    normalize: bool = False,
    clip_range: tuple[float, float] | None = None,
    beta: float = 0.0,
    kl_seq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputes (advantages, effective rewards) from per-function rewards (N, F), laid out group by group.

    The effective reward is what the advantage is centred on: the weighted sum (clipped and minus β·KL for RLOO).
    Unscorable rows (NaN for every function) get NaN reward and advantage 0, as in TRL.
    """
    weights = reward_weights.to(rewards_per_func)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    if method == "rloo":
        if clip_range:
            rewards = rewards.clamp(min=clip_range[0], max=clip_range[1])
        if beta != 0.0:
            if kl_seq is None:
                raise ValueError("RLOO with beta != 0 needs the per-sequence KL to recompute its rewards.")
            rewards = rewards - beta * kl_seq.to(rewards)
        grouped = rewards.view(-1, group_size)
        counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        # leave-one-out baseline: mean of the other k − 1 rewards; A = k/(k−1)·(r − mean) (RLOO, arXiv 2402.14740)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
        adv = rewards - baselines.view(-1)
        if normalize:
            adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + 1e-4)
        return torch.nan_to_num(adv, nan=0.0), rewards
    if aggregation == "normalize_then_sum":
        f = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, group_size, f)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, f)
        summed = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
        summed[unscorable] = torch.nan
        adv = (summed - torch.nanmean(summed)) / (_nanstd(summed) + 1e-4)
        return torch.nan_to_num(adv, nan=0.0), summed
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"Unknown scale_rewards {scale!r}.")
    if torch.isfinite(rewards).all():
        return group_advantages(rewards, group_size, scale=scale), rewards
    # NaN-aware fallback (rows where every reward function returned None), following TRL's nan-aware arithmetic
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if scale == "group":
        centred = centred / (_nanstd(grouped, dim=1, keepdim=True).expand(-1, group_size).reshape(-1) + 1e-4)
    elif scale == "batch":
        centred = centred / (_nanstd(rewards) + 1e-4)
    return torch.nan_to_num(centred, nan=0.0), rewards


class GroupAdvantageCheckCallback(TrainerCallback, PersistedState):
    """Recomputes and checks GRPO/RLOO group advantages on the trainer's own logged rewards.

    Args:
        trainer: a ``trl.GRPOTrainer`` or ``trl.RLOOTrainer`` (or subclass producing group advantages).
        on_violation: "warn" (log a warning, keep training) or "raise" (stop with :class:`GroupAdvantageViolation`).
        atol: tolerance for "≈", relative to the advantage scale (max(1, max |A|)).
        max_abs_advantage: |A| above this counts as extreme; default: (G − 1)/√G + atol with group scaling, no
            limit otherwise (then ``max_abs_adv`` is only reported).
        every_n_steps: check the batches generated when ``global_step % every_n_steps == 0``.
        max_warnings: how many violation warnings to print before going quiet (all are counted and logged).

    ``history`` holds the statistics of every checked batch; ``violations`` the failed checks (step, kind, detail).
    """

    def __init__(
        self,
        trainer: Any,
        on_violation: Literal["warn", "raise"] = "warn",
        atol: float = 1e-3,
        max_abs_advantage: float | None = None,
        every_n_steps: int = 1,
        max_warnings: int = 5,
    ) -> None:
        check_supported_trainer(
            trainer, type(self).__name__,
            needs=("_logs", "_generate_and_score_completions", "reward_weights", "num_generations", "_metrics"),
        )
        if on_violation not in ("warn", "raise"):
            raise ValueError(f"on_violation must be 'warn' or 'raise', got {on_violation!r}.")
        if atol <= 0:
            raise ValueError(f"atol must be > 0, got {atol}.")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        from trl import RLOOTrainer

        self.trainer = trainer
        self.method: Literal["grpo", "rloo"] = "rloo" if isinstance(trainer, RLOOTrainer) else "grpo"
        self.on_violation = on_violation
        self.atol = float(atol)
        self.max_abs_advantage = max_abs_advantage
        self.every_n_steps = int(every_n_steps)
        self.max_warnings = max_warnings
        self.history: list[dict[str, float]] = []
        self.violations: list[dict[str, Any]] = []
        self._warned = 0
        self._original = None

    # -- state kept across a resume (in the checkpoint's trainer_state.json) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "violations": self.violations, "warned": self._warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.violations = list(state["history"]), list(state["violations"])
        self._warned = int(state["warned"])

    # -- hook management -----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(args, state, self.trainer.callback_handler.callbacks)
        if self._original is not None:
            return
        trainer = self.trainer
        original = trainer._generate_and_score_completions
        self._original = original

        def checked(inputs, *a, **kw):
            output = original(inputs, *a, **kw)
            if trainer.model.training and trainer.state.global_step % self.every_n_steps == 0:
                self.check(output)
            return output

        trainer._generate_and_score_completions = checked

    def on_train_end(self, args, state, control, **kwargs):
        if self._original is not None:
            # the instance attribute shadows the class method; deleting it restores TRL's own method
            if "_generate_and_score_completions" in vars(self.trainer):
                del self.trainer._generate_and_score_completions
            self._original = None

    # -- the check -----------------------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        t = self.trainer
        scale = getattr(t, "scale_rewards", "group")
        scale = {True: "group", False: "none"}.get(scale, scale)
        return {
            "scale": scale,
            "aggregation": getattr(t, "multi_objective_aggregation", "sum_then_normalize"),
            "normalize": bool(getattr(t, "normalize_advantages", False)),
            "clip_range": getattr(t, "reward_clip_range", None),
            "beta": float(getattr(t, "beta", 0.0) or 0.0),
        }

    @torch.no_grad()
    def _rloo_kl(self, output: dict[str, Any]) -> torch.Tensor:
        """Per-sequence k1 KL as RLOO subtracts it from the reward (old log π − log π_ref, summed), gathered."""
        t = self.trainer
        from ..reference import ReferencePolicy

        p_ids, p_mask = output["prompt_ids"], output["prompt_mask"]
        c_ids, c_mask = output["completion_ids"], output["completion_mask"]
        ids = torch.cat([p_ids, c_ids], dim=1)
        attn = torch.cat([p_mask, c_mask], dim=1)
        bs = t.args.per_device_train_batch_size
        policy = t.accelerator.unwrap_model(t.model)
        with ReferencePolicy(t, allow_copy=False, who=type(self).__name__).model(policy) as ref_model:
            module = t.model if ref_model is policy else ref_model  # the PEFT policy: called as TRL calls it
            ref, _, _ = t._get_per_token_logps_and_entropies(module, ids, attn, c_ids.size(1), bs)
        kl = output["old_logps"] - (ref * c_mask).sum(1)
        return t.accelerator.gather(kl).float().cpu()

    def check(self, output: dict[str, Any]) -> dict[str, float]:
        """Checks one generation batch (``output`` of ``_generate_and_score_completions``); returns its statistics."""
        t = self.trainer
        used = output.get("advantages")
        if used is None or used.dim() != 1:
            raise UnsupportedTrainerError(
                f"{type(self).__name__} checks group-relative advantages (one per completion, as GRPO and RLOO "
                f"compute them); {type(t).__name__} produces advantages of shape "
                f"{None if used is None else tuple(used.shape)} (e.g. per-token GAE advantages), which it cannot check."
            )
        acc = t.accelerator
        n_local = used.shape[0]
        n = n_local * acc.num_processes
        g = int(t.num_generations)
        settings = self._settings()
        logged = torch.tensor(list(t._logs["advantages"])[-n:], dtype=torch.float32)
        names = list(t.reward_func_names)
        rpf = torch.tensor([list(t._logs["rewards"][name])[-n:] for name in names], dtype=torch.float32).T
        if logged.numel() != n or rpf.shape[0] != n or n % g != 0:
            raise UnsupportedTrainerError(
                f"{type(self).__name__}: trainer._logs holds {logged.numel()} advantages and {rpf.shape[0]} rewards "
                f"for "
                f"a batch of {n} completions in groups of {g}; this TRL version stores its logs differently."
            )
        kl_seq = None
        if self.method == "rloo" and settings["beta"] != 0.0:
            kl_seq = self._rloo_kl(output)
        expected, eff_rewards = expected_advantages(
            rpf, t.reward_weights.float().cpu(), g, method=self.method, scale=settings["scale"],
            aggregation=settings["aggregation"], normalize=settings["normalize"], clip_range=settings["clip_range"],
            beta=settings["beta"], kl_seq=kl_seq,
        )
        step = int(t.state.global_step)
        stats, problems = self._statistics(logged, expected, eff_rewards, used, g, settings)
        self.history.append({"step": step, **stats})
        add_metrics(t, {f"adv_check/{k}": v for k, v in stats.items()})
        for kind, detail in problems:
            self._violation(step, kind, detail)
        return stats

    def _statistics(self, logged, expected, rewards, used, g, settings):
        acc = self.trainer.accelerator
        tol = self.atol * max(1.0, float(logged.abs().max()) if logged.numel() else 1.0)
        finite = ~torch.isnan(rewards)
        grouped_adv = logged.view(-1, g)
        group_mean = grouped_adv.mean(dim=1)
        max_abs_group_mean = float(group_mean.abs().max())
        # sign(A) vs sign(r − group mean), on rows whose reward differs from the group mean by more than the tolerance
        r_grouped = rewards.view(-1, g)
        dev = (r_grouped - torch.nanmean(r_grouped, dim=1, keepdim=True)).view(-1)
        reward_scale = max(1.0, float(torch.nan_to_num(rewards).abs().max()) if rewards.numel() else 1.0)
        decided = finite & (dev.abs() > 1e-6 * reward_scale)  # exact ties with the mean have no sign
        decided &= logged.abs() > 0  # A = 0 (e.g. zero-std groups, clipped) has no sign to compare
        mismatch = (torch.sign(logged) != torch.sign(dev)) & decided
        n_decided = int(decided.sum())
        sign_mismatch_frac = float(mismatch.sum()) / n_decided if n_decided else 0.0
        max_abs_diff = float((logged - expected).abs().max())
        start = acc.process_index * used.shape[0]
        used_vs_logged = float((used.detach().float().cpu() - logged[start : start + used.shape[0]]).abs().max())
        finite_groups = finite.view(-1, g).all(dim=1)
        zero_std = zero_std_groups(torch.nan_to_num(rewards), g)[finite_groups]
        bound = self.max_abs_advantage
        if bound is None and self.method == "grpo" and settings["scale"] == "group" and (
            settings["aggregation"] == "sum_then_normalize"
        ):
            bound = (g - 1) / math.sqrt(g) + self.atol
        max_abs_adv = float(logged.abs().max())
        num_extreme = int((logged.abs() > bound).sum()) if bound is not None else 0
        problems: list[tuple[str, str]] = []
        if max_abs_group_mean > tol:
            problems.append(("group_mean", f"a group's advantages average {max_abs_group_mean:.4g}, not 0"))
        if sign_mismatch_frac > 0:
            problems.append(
                ("sign", f"{int(mismatch.sum())}/{n_decided} advantages have the opposite sign of r − group mean")
            )
        if max_abs_diff > tol:
            what = (
                f"scale_rewards={settings['scale']!r}, aggregation={settings['aggregation']!r}"
                if self.method == "grpo"
                else f"leave-one-out, normalize_advantages={settings['normalize']}, beta={settings['beta']}"
            )
            problems.append(
                ("recompute", f"logged advantages differ from the recomputed ones ({what}) by up to {max_abs_diff:.4g}")
            )
        if used_vs_logged > tol:
            problems.append(
                ("used_vs_logged",
                 f"the advantages given to the loss differ from the logged ones by {used_vs_logged:.4g}")
            )
        if num_extreme:
            problems.append(("extreme", f"{num_extreme} advantages exceed |A| <= {bound:.4g} (max {max_abs_adv:.4g})"))
        stats = {
            "max_abs_group_mean": max_abs_group_mean,
            "sign_mismatch_frac": sign_mismatch_frac,
            "max_abs_diff": max_abs_diff,
            "used_vs_logged_diff": used_vs_logged,
            "zero_std_groups": float(zero_std.sum()),
            "zero_std_frac": float(zero_std.float().mean()) if zero_std.numel() else 0.0,
            "max_abs_adv": max_abs_adv,
            "num_extreme": float(num_extreme),
            "violations": float(len(problems)),
        }
        return stats, problems

    def _violation(self, step: int, kind: str, detail: str) -> None:
        self.violations.append({"step": step, "kind": kind, "detail": detail})
        message = f"Group-advantage check failed at step {step} ({kind}): {detail}."
        if self.on_violation == "raise":
            raise GroupAdvantageViolation(message)
        if self._warned < self.max_warnings and is_main_process(trainer=self.trainer):
            self._warned += 1
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)

"""REINFORCE, with and without a baseline, as a thin subclass of TRL's ``GRPOTrainer``.

"Do more of what worked": the policy-gradient theorem gives

    ∇J(θ) = E_{x, y ~ π_θ}[ ∇ log π_θ(y | x) · (R(x, y) − b) ],     log π_θ(y | x) = Σ_t log π_θ(y_t | x, y_<t)

for any baseline b that does not depend on the sampled y (it leaves the expectation unchanged, because
E[∇ log π] = 0, and can cut the variance a lot). This module offers three baselines:

- ``"none"``: b = 0, the advantage is the raw reward R. With a reward like 5 + signal, every sample is pushed up,
  and the useful signal is a small difference between large, noisy pushes.
- ``"running_mean"``: b = exponential moving average of the mean reward of *past* generation batches
  (bias-corrected like Adam's moments). It uses no sample of the current batch, so the estimator stays unbiased;
  on the very first batch, where there is no past, the current batch mean is used (a one-off O(1/B) bias, much
  smaller than starting from b = 0). The state is saved in checkpoints and restored on resume.
- ``"group"``: the leave-one-out mean of the *other* completions of the same prompt (RLOO, Ahmadian et al. 2024,
  arXiv 2402.14740): b_i = mean_{j≠i} R_j, so A_i = G/(G−1)·(R_i − mean_group). Because b_i does not use y_i the
  estimator is unbiased, which the plain group mean (GRPO's, with y_i inside b_i) is not.

What is inherited from GRPO, and why it is exactly REINFORCE
------------------------------------------------------------
Generation, reward functions, reference model, PEFT, accelerate and logging are GRPO's. Only the advantage step is
replaced (after ``super()._generate_and_score_completions``, from the gathered per-function rewards). The loss is
GRPO's, kept on purpose: REINFORCE is on-policy, so ``ReinforceConfig`` requires ``num_iterations == 1`` and a
generation batch that is used within one optimizer step. Then GRPO never computes old log-probs, the ratio is
ρ = exp(log π − stop_grad(log π)) ≡ 1 and the clip is inactive, and the gradient of −min(ρA, clip(ρ)A) is exactly
−A·∇log π per token. Reusing the loss keeps the β·k3 KL term, the entropy bonus and the metrics without copying them.

``aggregation`` picks how per-token terms become one loss (a scale that multiplies the learning rate, and how much
each sequence counts):

- ``"sequence"`` (default, the textbook estimator): loss = −(1/B) Σ_i A_i Σ_t log π(y_i,t), i.e. the gradient is the
  sample mean of (R_i − b_i)·∇log π(y_i | x_i). Implemented with GRPO's ``loss_type="luspo"`` (sum over a sequence's
  tokens, mean over sequences). A β > 0 KL term is then summed over each sequence's tokens as well (a sequence KL).
- ``"token"``: GRPO's ``loss_type="dapo"``: Σ_i A_i Σ_t log π(y_i,t) divided by the number of completion tokens in
  the generation batch. Same direction within a batch, scaled by B / #tokens (which varies from batch to batch).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from .._trl_compat import check_trl_contract
from ..objectives import group_advantages
from ..persisted_state import StateHolderCallback
from ..reward_guard import attach_reward_guard
from ..reward_guard_config import NanRewardsArguments
from ..validation import check_trainer_prompts, validate_trainer_inputs
from .resumable_sampling import ResumableSampling

BASELINES = ("none", "running_mean", "group")
AGGREGATIONS = {"sequence": "luspo", "token": "dapo"}  # aggregation -> GRPO loss_type that implements it


# ----------------------------------------------------------------------------------------------------------------
# Pure maths
# ----------------------------------------------------------------------------------------------------------------
def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """b_i = mean of the other scorable rewards of i's group (RLOO). NaN rewards (unscorable) are left out.

    A group with a single scorable completion has no "other" sample: its baseline is NaN (the caller zeroes the
    advantage, as TRL's RLOO does).
    """
    if group_size < 2:
        raise ValueError(f"The 'group' baseline needs at least 2 completions per prompt, got group_size={group_size}.")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    grouped = rewards.float().view(-1, group_size)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    others = total - grouped  # NaN where the sample itself is unscorable: it gets no baseline (and advantage 0)
    baseline = others / (scorable - 1).to(grouped.dtype)  # 0/0 = NaN when no other sample is scorable
    return baseline.view(-1)


def reinforce_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str,
    running_mean: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages A = R − b for one (gathered) generation batch, and the baseline b used for each sample.

    Args:
        rewards: (B,) total reward per completion, grouped by prompt (``group_size`` consecutive completions share a
            prompt, as TRL's RepeatSampler lays them out). NaN = unscorable: its advantage is 0 and it is left out of
            every baseline.
        baseline: ``"none"`` (b = 0), ``"running_mean"`` (b = ``running_mean``, or the batch mean when it is None,
            i.e. before any past batch exists) or ``"group"`` (leave-one-out group mean).
    """
    if baseline not in BASELINES:
        raise ValueError(f"Unknown REINFORCE baseline {baseline!r}; choose one of {list(BASELINES)}.")
    rewards = rewards.float()
    if baseline == "none":
        b = torch.zeros_like(rewards)
    elif baseline == "running_mean":
        value = torch.nanmean(rewards).item() if running_mean is None else float(running_mean)
        b = torch.full_like(rewards, value)
    elif bool(torch.isfinite(rewards).all()):
        if group_size < 2:
            raise ValueError(
                f"The 'group' baseline needs at least 2 completions per prompt, got group_size={group_size}."
            )
        # RLOO: R_i − mean_{j≠i} R_j = G/(G−1)·(R_i − mean_group); groups of equal rewards give exactly 0
        advantages = group_advantages(rewards, group_size, scale="none") * (group_size / (group_size - 1))
        return advantages, rewards - advantages
    else:  # unscorable completions present: the NaN-aware leave-one-out mean
        b = leave_one_out_baseline(rewards, group_size)
    advantages = torch.nan_to_num(rewards - b, nan=0.0)
    return advantages, b


@dataclass
class RunningMeanBaseline:
    """Bias-corrected exponential moving average of past batch-mean rewards.

    ``value`` is None until the first update; after n updates it is m_n / (1 − decay^n) with
    m_n = decay·m_{n−1} + (1 − decay)·r̄_n, so the first batches are not pulled towards 0.
    """

    decay: float = 0.9
    ema: float = 0.0
    num_updates: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.decay}.")

    @property
    def value(self) -> float | None:
        if self.num_updates == 0:
            return None
        return self.ema / (1.0 - self.decay**self.num_updates)

    def update(self, batch_mean: float) -> None:
        if not math.isfinite(batch_mean):  # a batch with no scorable completion carries no information
            return
        self.ema = self.decay * self.ema + (1.0 - self.decay) * float(batch_mean)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "ema": self.ema, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.ema = float(state["ema"])
        self.num_updates = int(state["num_updates"])


class RunningMeanBaselineState(StateHolderCallback):
    """Carries the running-mean baseline in checkpoints (``trainer_state.json``) and restores it on resume."""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReinforceConfig(NanRewardsArguments, GRPOConfig):
    r"""Configuration for [`ReinforceTrainer`]: every [`~trl.GRPOConfig`] field, plus:

    > REINFORCE

    Parameters:
        baseline (`str`, *optional*, defaults to `"running_mean"`):
            `"none"` (advantage = raw reward), `"running_mean"` (exponential moving average of past batch-mean
            rewards) or `"group"` (leave-one-out mean of the other completions of the same prompt, as RLOO).
        baseline_decay (`float`, *optional*, defaults to `0.9`):
            Decay of the running mean (`"running_mean"` only): m ← decay·m + (1 − decay)·mean reward of the batch,
            after the batch is used; the baseline is the bias-corrected b = m / (1 − decay^n) after n batches.
        aggregation (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: loss = −mean_i A_i Σ_t log π(y_i,t), the textbook REINFORCE estimator (GRPO's
            `loss_type="luspo"`). `"token"`: the same sum divided by the number of completion tokens in the batch
            (GRPO's `loss_type="dapo"`). `loss_type` is set from this field; leave it unset.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Unlike GRPO's default: sampling runs without dropout, so ∇log π should be taken without it too.

    REINFORCE is on-policy: `num_iterations` must be 1 and `gradient_accumulation_steps` a multiple of
    `steps_per_generation`, so that each sample is used once, by the policy that generated it (the GRPO ratio is
    then exactly 1 and its clip never acts). `scale_rewards` is ignored (REINFORCE does not normalise advantages);
    `beta` adds GRPO's k3 KL penalty to the loss, as in GRPO. `bf16` and `gradient_checkpointing` default to `True`
    on CUDA and `False` without it (TRL's `bf16=True` default fails on CPU).
    """

    baseline: str = field(
        default="running_mean",
        metadata={"help": "REINFORCE baseline.", "choices": list(BASELINES)},
    )
    baseline_decay: float = field(
        default=0.9,
        metadata={
            "help": "Decay of the running-mean baseline (m ← decay·m + (1 − decay)·batch mean; b = m / (1 − decay^n))."
        },
    )
    aggregation: str = field(
        default="sequence",
        metadata={
            "help": "'sequence': −mean_i A_i Σ_t log π (textbook REINFORCE); 'token': divided by the batch's token "
            "count instead.",
            "choices": list(AGGREGATIONS),
        },
    )
    loss_type: str | None = field(
        default=None,
        metadata={"help": "Set from `aggregation` ('sequence' → 'luspo', 'token' → 'dapo'); leave unset."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Gradient checkpointing; default True on CUDA, False on CPU."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout (default True, unlike GRPO): the policy that samples (no dropout) and the one "
            "whose log π is differentiated should be the same function, and the KL to the reference starts at 0."
        },
    )

    def __post_init__(self) -> None:
        cuda = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None and not cuda:
            self.bf16 = False  # TRL's default (bf16=True) fails or crawls on CPU
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = cuda
        if self.baseline not in BASELINES:
            raise ValueError(f"Unknown REINFORCE baseline {self.baseline!r}; choose one of {list(BASELINES)}.")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"Unknown aggregation {self.aggregation!r}; choose one of {list(AGGREGATIONS)}.")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}.")
        wanted = AGGREGATIONS[self.aggregation]
        if self.loss_type is None:
            self.loss_type = wanted
        elif self.loss_type != wanted:
            raise ValueError(
                f"ReinforceConfig sets loss_type from aggregation ({self.aggregation!r} → {wanted!r}); got "
                f"loss_type={self.loss_type!r}. Leave loss_type unset and choose aggregation='sequence' or 'token'."
            )
        if self.loss_type == "luspo":
            # With ratio ≡ 1 the IS level does not change the gradient; "sequence" silences TRL's LUSPO warning.
            self.importance_sampling_level = "sequence"
        if self.num_iterations != 1:
            raise ValueError(
                f"REINFORCE is on-policy: num_iterations must be 1 (got {self.num_iterations}). Several passes over "
                "the same samples need importance ratios and clipping: use PPO or GRPO."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "REINFORCE uses the weighted sum of the raw rewards; multi_objective_aggregation must be "
                f"'sum_then_normalize' (got {self.multi_objective_aggregation!r})."
            )
        requested = self.num_generations
        if requested == 1 and self.baseline != "group":  # GRPOConfig refuses 1; these baselines need no groups
            self.num_generations_eval = self.num_generations_eval or 1
            steps = self.steps_per_generation or self.gradient_accumulation_steps
            self.num_generations = self.generation_batch_size or self.per_device_train_batch_size * steps
            if self.num_generations < 2:
                raise ValueError("REINFORCE with num_generations=1 needs at least 2 completions per generation "
                                 "batch: raise per_device_train_batch_size or gradient_accumulation_steps.")
        elif requested is not None and requested < 2 and self.baseline == "group":
            raise ValueError("The 'group' baseline needs num_generations >= 2 completions per prompt, got "
                             f"{requested}: "
                             "raise num_generations, or use baseline='running_mean' (no groups needed).")
        try:
            super().__post_init__()  # checks the generation batch against a stand-in group size that divides it
        finally:
            self.num_generations = requested
        if self.gradient_accumulation_steps % self.steps_per_generation != 0:
            raise ValueError(
                f"REINFORCE is on-policy: gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be a "
                f"multiple of steps_per_generation ({self.steps_per_generation}), so that no optimizer step happens "
                "between generating a batch and learning from it."
            )


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
class ReinforceTrainer(ResumableSampling, GRPOTrainer):
    """REINFORCE (optionally with a baseline) on TRL's GRPO machinery; see the module docstring for the maths.

    Logged per generation batch: ``reinforce/baseline`` (mean b over the batch), ``reinforce/advantage_mean``,
    ``reinforce/advantage_std``, ``reinforce/advantage_abs_mean``, and for the running mean ``reinforce/running_mean``
    (after the update). The completions table shows REINFORCE's advantages, not GRPO's.
    """

    _tag_names = ["trl", "reinforce", "hf_rlhf_ext"]
    _name = "REINFORCE"
    _paper = {  # the model card cites REINFORCE-for-LLMs; the estimator itself is Williams (1992)
        "title": "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
        "id": "2402.14740",
        "citation": textwrap.dedent("""\
            @inproceedings{ahmadian2024back,
                title        = {{Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
                                 Feedback in LLMs}},
                author       = {Arash Ahmadian and Chris Cremer and Matthias Gallé and Marzieh Fadaee and
                                Julia Kreutzer and Olivier Pietquin and Ahmet Üstün and Sara Hooker},
                year         = 2024,
                booktitle    = {ACL},
            }"""),
    }

    def __init__(
        self, model, reward_funcs=None, args: ReinforceConfig | None = None, *more_args: Any, **kwargs: Any
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path or "model"
            args = ReinforceConfig(f"{str(name).rstrip('/').split('/')[-1]}-REINFORCE")
        if not isinstance(args, ReinforceConfig):
            raise TypeError(
                f"ReinforceTrainer needs a ReinforceConfig (got {type(args).__name__}); it carries the baseline and "
                "the on-policy checks."
            )
        validate_trainer_inputs(args, kwargs.get("train_dataset", more_args[0] if more_args else None))
        check_trl_contract()  # the private TRL names this trainer overrides or reads exist in the installed TRL
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        check_trl_contract(self)
        check_trainer_prompts(self)
        attach_reward_guard(self)  # NaN/inf rewards stop the run or are dropped (args.nan_rewards)
        self.baseline = args.baseline
        self.running_baseline = RunningMeanBaseline(decay=args.baseline_decay)
        self.add_callback(RunningMeanBaselineState(self.running_baseline))  # saved in checkpoints, restored on resume
        self._last_rewards_per_func: torch.Tensor | None = None

    # -- rewards: keep the gathered tensor GRPO computes (the output dict of the parent has none) --------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._last_rewards_per_func
        if rewards_per_func is None:  # pragma: no cover - GRPO always scores through _calculate_rewards
            raise RuntimeError("ReinforceTrainer found no rewards: GRPO's _calculate_rewards was not called.")
        self._last_rewards_per_func = None
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval

        # Total reward, as GRPO forms it: weighted sum over functions; a row where every function returned None is NaN.
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan

        running = self.running_baseline.value if self.baseline == "running_mean" else None
        advantages, baselines = reinforce_advantages(rewards, group_size, self.baseline, running_mean=running)
        if self.baseline == "running_mean" and mode == "train":
            # update *after* use: the baseline of batch t only sees batches < t (no dependence on this batch's samples)
            self.running_baseline.update(torch.nanmean(rewards).item())

        # Slice the gathered batch down to this process's samples, as GRPO does.
        local = output["prompt_ids"].size(0)
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(output["prompt_ids"].device)

        self._log_advantage_stats(mode, advantages, baselines, rewards)
        return output

    def _log_advantage_stats(
        self, mode: str, advantages: torch.Tensor, baselines: torch.Tensor, rewards: torch.Tensor
    ) -> None:
        metrics = self._metrics[mode]
        valid = ~torch.isnan(rewards)
        adv = advantages[valid] if valid.any() else advantages
        metrics["reinforce/baseline"].append(torch.nanmean(baselines).item() if valid.any() else float("nan"))
        metrics["reinforce/advantage_mean"].append(adv.mean().item())
        metrics["reinforce/advantage_std"].append(adv.std().item() if adv.numel() > 1 else 0.0)
        metrics["reinforce/advantage_abs_mean"].append(adv.abs().mean().item())
        if self.baseline == "running_mean" and self.running_baseline.value is not None:
            metrics["reinforce/running_mean"].append(self.running_baseline.value)
        # The completions table should show the advantages that were trained on, not GRPO's discarded ones.
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())


__all__ = [
    "BASELINES",
    "ReinforceConfig",
    "ReinforceTrainer",
    "RunningMeanBaseline",
    "RunningMeanBaselineState",
    "leave_one_out_baseline",
    "reinforce_advantages",
]

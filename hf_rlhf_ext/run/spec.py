"""What a recipe run is: the script arguments every RL recipe shares (on top of TRL's ``ScriptArguments``), the
``--monitor`` names they accept, and the built setup a recipe hands to its trainer. Plain data, so that parsing,
building, monitoring and finishing a run all depend on this module and never on each other in a circle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from trl import ScriptArguments

from ..validation import InputError

# --monitor names -> the hf_rlhf_ext.callbacks class each one attaches
MONITORS = {
    "overoptimization": "OveroptimizationCallback",
    "kl": "KLToReferenceCallback",
    "advantages": "GroupAdvantageCheckCallback",
    "grad_variance": "GradientVarianceCallback",
}


def parse_monitors(value: str | Sequence[str] | None) -> list[str] | None:
    """The monitor names in ``--monitor`` ("a,b", or a YAML list); None for "auto", [] for "none"."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip() for n in names if n and n.strip()]
    if names == ["auto"]:
        return None
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in MONITORS]
    if unknown:
        raise InputError(f"Unknown --monitor {', '.join(unknown)}: choose among {', '.join(MONITORS)} "
                         "(comma-separated), 'auto' or 'none'.")
    return names


@dataclass
class RLScriptArguments(ScriptArguments):
    """Script arguments shared by the RL recipes (on top of TRL's ``ScriptArguments``: ``dataset_name``,
    ``dataset_config``, ``dataset_train_split``, ``dataset_test_split``).

    Args:
        lab_dir: the lab directory (put there if missing); default: ``$HF_RLHF_EXT_LAB_DIR``, else the cached default
            lab. The same directory as ``hf-rlhf-ext lab build --lab_dir``.
        reward_model_name_or_path: a reward model (``AutoModelForSequenceClassification``, ``num_labels=1``) to
            optimise; default on the lab: the lab's proxy reward model.
        reward_funcs: reward functions as dotted import paths (``my_pkg.rewards.fn``) or names in ``trl.rewards``.
        track_gold: on the lab, add the gold reward with weight 0 (logged as ``rewards/gold_reward/mean``, not
            optimised). Reward weights come from the training config's ``reward_weights`` (main functions first).
        num_eval_prompts: held-out completions evaluated before and after training (0 disables the evaluation);
            the test prompts are cycled when this exceeds the test split (several samples per prompt).
        eval_sampling: "sample" (temperature 1: the KL to the initial policy is then a true KL estimate) or "greedy".
        num_sample_completions: sample completions stored in ``metrics.json`` before and after training.
    """

    lab_dir: str | None = field(
        default=None, metadata={"help": "Lab directory (default: $HF_RLHF_EXT_LAB_DIR, else the cached default lab)."}
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model to optimise (default on the lab: its proxy RM)."}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Reward functions: dotted import paths or names in trl.rewards."}
    )
    track_gold: bool = field(default=True, metadata={"help": "On the lab, log the gold reward with weight 0."})
    num_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for the before/after evaluation."})
    eval_sampling: str = field(default="sample", metadata={"help": "'sample' (temperature 1) or 'greedy'."})
    num_sample_completions: int = field(default=4, metadata={"help": "Sample completions kept in metrics.json."})
    monitor: str = field(
        default="none",
        metadata={"help": "Callbacks to attach, comma-separated: " + ", ".join(MONITORS) + "; 'auto' = the cheap ones "
                  "that apply to this run; 'none'."},
    )
    monitor_every_n_steps: int = field(default=10, metadata={"help": "Measure every N optimizer steps (kl, "
                                                                     "advantages, grad_variance, overoptimization)."})
    monitor_num_samples: int | None = field(
        default=None, metadata={"help": "Held-out completions per KL measurement (default: one generation batch)."}
    )
    monitor_save_peak: bool = field(
        default=False, metadata={"help": "overoptimization: save the policy at each new gold peak to <out>/gold_peak."}
    )
    monitor_min_delta: float = field(
        default=0.05,
        metadata={"help": "overoptimization: how far the smoothed gold must fall below its peak to count (a smaller "
                          "dip is sampling noise; ≈ 1.5 standard errors on the lab's logged batches)."},
    )
    monitor_stop_on_overoptimization: bool = field(
        default=False, metadata={"help": "overoptimization: stop training once gold falls while the proxy rises."}
    )
    monitor_forecast: bool = field(
        default=True,
        metadata={"help": "overoptimization: forecast the KL of the gold peak (Gao et al.'s RL form fitted to the "
                          "points so far, 5th–95th percentile bootstrap interval), logged as "
                          "overopt/forecast_peak_kl* when the fit is valid; false turns it off."},
    )
    monitor_stop_at_forecast: bool = field(
        default=False,
        metadata={"help": "overoptimization: stop training once the KL reaches the forecast gold peak's KL (with an "
                          "interval narrower than a factor 2); implies --monitor_forecast."},
    )
    # the command line the recipe was parsed from (set by the recipe parser; shown in the model card)
    cli_args: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.eval_sampling not in ("sample", "greedy"):
            raise ValueError(f"eval_sampling must be 'sample' or 'greedy', got {self.eval_sampling!r}")
        if self.num_eval_prompts < 0:
            raise ValueError("num_eval_prompts must be >= 0")
        parse_monitors(self.monitor)  # an unknown name fails here, before any model is loaded


@dataclass
class RLSetup:
    """Everything a recipe hands to its trainer, plus what the evaluation needs."""

    model: str
    tokenizer: Any
    train_dataset: Any
    eval_prompts: list
    reward_funcs: list
    reward_weights: list[float]
    eval_rewards: dict[str, Callable]
    peft_config: Any
    callbacks: list
    lab: Any = None
    on_lab: bool = False

"""hf-rlhf-ext: the experiments of an RLHF chapter, real and measured, as thin extensions of TRL.

The public API is re-exported here and imported lazily, so ``import hf_rlhf_ext`` stays cheap:

    from hf_rlhf_ext import build_lab, PPOConfig, PPOTrainer, OveroptimizationCallback
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> sub-module that defines it
_EXPORTS = {
    # results contract and input checks
    "write_metrics": "results",
    "read_metrics": "results",
    "read_log_history": "results",
    "ResultsCallback": "results",
    "DataValidationError": "validation",
    "InputError": "validation",
    "validate_grpo_args": "validation",
    # reward faults during training
    "attach_reward_guard": "reward_guard",
    "guard_reward_funcs": "reward_guard",
    "NonFiniteRewardError": "reward_guard",
    "RewardFunctionError": "reward_guard",
    # the offline lab
    "LabConfig": "lab.config",
    "Lab": "lab.build",
    "build_lab": "lab.build",
    "gold_reward": "lab.task",
    # reward models and reward functions
    "train_reward_model": "reward_modeling",
    "pairwise_report": "reward_modeling",
    "RewardModelFunction": "rewards",
    # trainers and KL control
    "PPOConfig": "trainers.ppo_config",
    "PPOTrainer": "trainers.ppo",
    "ReinforceConfig": "trainers.reinforce",
    "ReinforceTrainer": "trainers.reinforce",
    "AdaptiveKLController": "trainers.kl_control",
    "FixedKLController": "trainers.kl_control",
    "AdaptiveKLCallback": "callbacks.adaptive_kl",
    # callbacks for any TRL GRPO/RLOO script
    "OveroptimizationCallback": "callbacks.overoptimization",
    "KLToReferenceCallback": "callbacks.kl_reference",
    "GroupAdvantageCheckCallback": "callbacks.group_advantage",
    "GradientVarianceCallback": "callbacks.grad_variance",
    # experiments
    "BestOfNSampler": "experiments.best_of_n",
    "best_of_n_curve": "experiments.best_of_n",
    "distill_best_of_n": "experiments.best_of_n",
    "fit_gao": "objectives",
    "best_of_n_kl": "objectives",
    "ensemble_reward": "rewards",
    "build_reward_ensemble": "lab.ensemble",
    "run_sweep": "experiments.sweeps",
    "penalty_vs_early_stopping": "experiments.early_stopping",
    "Claim": "experiments.report",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS) + ["__version__"]

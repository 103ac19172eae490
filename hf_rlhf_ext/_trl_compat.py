"""Every private TRL / transformers name this package relies on, in one place, checked at trainer construction.

Our trainers subclass ``trl.GRPOTrainer`` and our callbacks read its per-sample logs: that reaches below TRL's public
API (hooks such as ``_generate_and_score_completions``, state such as ``_metrics``). TRL may rename any of them in a
minor release; the danger is a silent change — a hook we override that is no longer called, or an attribute read with
a default. So the names are listed here, :func:`check_trl_contract` verifies each (methods with the parameter names
we call them with or override them with), and a failure names the TRL versions this package was tested with.
Testing a new TRL release: bump the pin in ``pyproject.toml``, run ``tests/test_trl_contract.py``, then the suite.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

SUPPORTED_TRL = ">=1.16,<1.17"

# Model inputs of vision-language batches that GRPO passes to the policy's forward (PPO's loss passes them on).
GRPO_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                          "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# GRPOTrainer (and RLOOTrainer, for the callbacks) methods we override or call: name -> leading parameter names.
GRPO_METHODS: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),  # PPO/REINFORCE: score a rollout; group-advantage check
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"),  # PPO: sampling with log-probs
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),  # PPO: the rewards
    "_generate": ("self", "prompts"),  # PPO's rollout: tokenise, sample (through _generate_single_turn), decode
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss",
                                           *GRPO_MULTIMODAL_INPUTS),  # PPO: plain LM head, own loss
    "_compute_loss": ("self", "model", "inputs"),  # PPO: its own loss
    "_tokenize_prompts": ("self", "prompts"),
    "_get_train_sampler": ("self", "dataset"),  # our trainers: a sampler whose prompt order survives a resume
}
# transformers.Trainer methods we override.
TRAINER_METHODS: dict[str, tuple[str, ...]] = {
    "_clip_grad_norm": ("self", "model"),  # PPO: clip the critic too
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),  # PPO: restore the critic
    # PPO overrides it; the recipes call it with _internal_call=True (no push: the folder is pushed once, with its card)
    "save_model": ("self", "output_dir", "_internal_call"),
}
# Attributes a GRPOTrainer / RLOOTrainer instance has after construction.
GRPO_ATTRIBUTES: dict[str, str] = {
    "_metrics": "per-mode lists of logged scalars (trainers add their own metrics; callbacks read them)",
    "_logs": "per-sample deques of the latest generation batch (completions table; callbacks read them)",
    "_tokenizer": "the text tokenizer of the processing class",
    "_dist": "the distributed backend (summon_full_params around generation)",
    "_is_vlm": "whether the processing class is a vision-language processor",
    "_step": "micro-steps taken (PPO zeroes the critic's gradients at the start of each accumulation window)",
    "_buffered_inputs": "the current generation batch split into micro-batches (gradient-variance callback)",
    "_pending_extra_logs": "columns reward functions logged with log_extra (PPO's rollout flushes them into _logs)",
    "_pending_metrics": "scalars reward functions logged with log_metric (PPO's rollout flushes them into _metrics)",
}

# Undocumented (but not underscored) GRPOTrainer instance attributes PPOTrainer reads.
GRPO_PUBLIC_ATTRIBUTES = (
    "use_vllm", "use_transformers_continuous_batching", "generation_kwargs", "generation_config", "temperature",
    "max_completion_length", "eos_token_ids", "pad_to_multiple_of", "reward_funcs", "reward_processing_classes",
    "reward_weights", "num_iterations", "loss_type", "epsilon_low", "epsilon_high", "aux_loss_enabled",
    "router_aux_loss_coef", "beta", "ref_model", "num_generations", "num_generations_eval",
    "mask_truncated_completions", "reward_func_names",
)
# Functions of TRL's internal modules: "module.name" -> leading parameter names.
TRL_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "trl.trainer.utils.pad": ("tensors", "padding_value", "padding_side", "pad_to_multiple_of"),
    "trl.trainer.utils.nanstd": ("tensor", "dim"),
    "trl.trainer.utils.use_adapter": ("model", "adapter_name"),
    "trl.trainer.utils.disable_dropout_in_model": ("model",),
    "trl.trainer.utils.create_model_from_path": ("model_id",),
    # its constructor's parameters are also the attributes EpochReplaySampler reads back
    "trl.trainer.grpo_trainer.RepeatSampler": ("data_source", "mini_repeat_count", "batch_size", "repeat_count",
                                               "shuffle", "seed"),
    "trl.trainer.utils.log_table_to_comet_experiment": ("name", "table"),  # compat: generate_completions' table
    "trl.models.utils.unwrap_model_for_generation": ("model", "accelerator", "gather_deepspeed3_params",
                                                     "generation_kwargs", "gradient_checkpointing_kwargs"),
}
# Private attributes of transformers objects: (class, attribute) read directly (``config.name_or_path`` is public).
TRANSFORMERS_ATTRIBUTES = (("PretrainedConfig", "_name_or_path"),)


class TRLContractError(RuntimeError):
    """The installed TRL / transformers lacks a private name this package relies on."""


def _parameter_problems(owner: type, methods: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for name, expected in methods.items():
        method = inspect.getattr_static(owner, name, None)
        if method is None:
            problems.append(f"{owner.__name__}.{name} is missing")
            continue
        params = tuple(inspect.signature(getattr(owner, name)).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"{owner.__name__}.{name}{params} no longer starts with the parameters {expected}")
    return problems


@functools.cache
def _class_problems() -> tuple[str, ...]:
    from transformers import Trainer
    from trl import GRPOTrainer, RLOOTrainer

    problems = _parameter_problems(GRPOTrainer, GRPO_METHODS) + _parameter_problems(Trainer, TRAINER_METHODS)
    problems += _parameter_problems(RLOOTrainer, {"_generate_and_score_completions": ("self", "inputs")})
    problems += _function_problems()
    import transformers

    problems += [f"transformers.{cls}().{name} is missing" for cls, name in TRANSFORMERS_ATTRIBUTES
                 if name not in vars(getattr(transformers, cls)())]
    return tuple(problems)


def _function_problems() -> list[str]:
    problems = []
    for path, expected in TRL_FUNCTIONS.items():
        module_name, name = path.rsplit(".", 1)
        try:
            function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            problems.append(f"{path} is missing")
            continue
        params = tuple(inspect.signature(function).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"{path}{params} no longer starts with the parameters {expected}")
    return problems


def contract_problems(trainer: Any = None) -> list[str]:
    """What is missing or changed; with ``trainer``, also the instance attributes of :data:`GRPO_ATTRIBUTES`."""
    problems = list(_class_problems())
    if trainer is not None:
        problems += [f"{type(trainer).__name__} instance has no {name} ({why})"
                     for name, why in GRPO_ATTRIBUTES.items() if name not in vars(trainer)]
        if isinstance(trainer, _grpo_trainer_class()):
            problems += [f"{type(trainer).__name__} instance has no {name}"
                         for name in GRPO_PUBLIC_ATTRIBUTES if name not in vars(trainer)]
    return problems


def _grpo_trainer_class() -> type:
    from trl import GRPOTrainer

    return GRPOTrainer


def check_trl_contract(trainer: Any = None) -> None:
    """Raises :class:`TRLContractError` naming every private TRL/transformers name that is missing or changed."""
    problems = contract_problems(trainer)
    if problems:
        import transformers
        import trl

        raise TRLContractError(
            f"hf_rlhf_ext supports trl{SUPPORTED_TRL}; installed trl {trl.__version__}, transformers "
            f"{transformers.__version__} lacks private names it relies on: " + "; ".join(problems)
            + ". Install a supported TRL version (pip install 'trl" + SUPPORTED_TRL + "')."
        )

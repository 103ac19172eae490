"""REINFORCE with or without a baseline (hf_rlhf_ext.trainers.ReinforceTrainer), with the policy-gradient variance
measured as it trains — on the offline lab by default, on any model with flags.

    python recipes/reinforce.py                                     # the lab, baseline = running mean
    python recipes/reinforce.py --baseline none --output_dir runs/reinforce-none
    python recipes/reinforce.py --baseline group --grad_variance_every 5
    python recipes/reinforce.py --baseline none --reward_offset 5   # the chapter's case for a baseline
    accelerate launch recipes/reinforce.py --config my_reinforce.yaml
    python recipes/reinforce.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_name_or_path <rm> --use_peft --output_dir runs/reinforce-qwen

Writes <output_dir>/{README.md (model card), metrics.json, log_history.jsonl, training_curves.png} and the policy.
``--monitor`` attaches our other callbacks (default ``auto``). ``GradientVarianceCallback`` is on by default:
``grad_var/*`` appears in log_history.jsonl at the measuring steps and ``metrics.json["grad_variance"]`` holds the
mean over the run and every measurement — run two baselines and compare ``grad_variance.grad_var/total``.
"""

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

from hf_rlhf_ext.callbacks.grad_variance import GradientVarianceCallback
from hf_rlhf_ext.experiments.baselines import add_reward_offset
from hf_rlhf_ext.model_card import RecipeCard
from hf_rlhf_ext.run.build import make_trainer, prepare_rl_run
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import train_and_report
from hf_rlhf_ext.run.monitors import add_monitors
from hf_rlhf_ext.run.parsing import make_recipe_parser, read_lab_config
from hf_rlhf_ext.run.spec import RLScriptArguments, parse_monitors
from hf_rlhf_ext.trainers.reinforce import ReinforceConfig, ReinforceTrainer

#: The lab run's settings, written once in this YAML file: the parser's defaults on the lab only (elsewhere TRL's);
#: flags and --config override them.
LAB_CONFIG = Path(__file__).parent / "configs" / "reinforce_lab.yaml"
CARD = RecipeCard(
    script="recipes/reinforce.py", method="REINFORCE", tags=("reinforce",),
    hyperparameters=("baseline", "baseline_decay", "aggregation", "beta", "reward_offset", "num_generations",
                     "learning_rate", "per_device_train_batch_size", "max_completion_length", "temperature",
                     "max_steps", "seed"),
)


@dataclass
class ReinforceScriptArguments(RLScriptArguments):
    """The RL recipes' arguments plus the gradient-variance measurement.

    Args:
        grad_variance_every: measure the policy-gradient variance every this many optimizer steps (0 = off).
        grad_variance_estimates: number of disjoint slices of the generation batch (K) per measurement.
        reward_offset: a constant added to the optimised reward (as one more reward function, weight 1, logged as
            ``rewards/reward_offset/mean``). It changes no expected gradient, only the variance without a baseline:
            compare ``--baseline none --reward_offset 5`` with ``--baseline running_mean --reward_offset 5``.
    """

    grad_variance_every: int = field(
        default=10, metadata={"help": "Measure the gradient variance every N optimizer steps (0 disables)."}
    )
    grad_variance_estimates: int = field(
        default=4, metadata={"help": "Disjoint slices of the generation batch per measurement (K >= 2)."}
    )
    reward_offset: float = field(
        default=0.0,
        metadata={"help": "Constant added to every reward (the chapter's experiment: b = 0 is then a bad baseline)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.grad_variance_every < 0:
            raise ValueError(f"grad_variance_every must be >= 0, got {self.grad_variance_every}.")
        if "grad_variance" in (parse_monitors(self.monitor) or []):
            raise ValueError("REINFORCE measures the gradient variance with --grad_variance_every and "
                             "--grad_variance_estimates: leave grad_variance out of --monitor.")


def main(script_args: ReinforceScriptArguments, training_args: ReinforceConfig, model_args: ModelConfig) -> dict:
    setup = prepare_rl_run(script_args, training_args, model_args)
    add_reward_offset(setup, training_args, script_args.reward_offset)
    trainer = make_trainer(ReinforceTrainer, setup, training_args)
    variance = None
    if script_args.grad_variance_every > 0:
        variance = GradientVarianceCallback(
            trainer, every_n_steps=script_args.grad_variance_every, num_estimates=script_args.grad_variance_estimates
        )
        trainer.add_callback(variance)
    monitors = add_monitors(trainer, setup, script_args)

    def extra() -> dict:
        out = {
            "baseline": training_args.baseline,
            "aggregation": training_args.aggregation,
            "reward_offset": script_args.reward_offset,
        }
        if variance is not None:
            out["grad_variance"] = {
                **variance.summary(),
                "every_n_steps": variance.every_n_steps,
                "num_estimates": variance.num_estimates,
                "measurements": [m.to_dict() for m in variance.measurements],
            }
        return out

    return train_and_report(trainer, setup, script_args, training_args, card=CARD, monitors=monitors,
                            extra_metrics=extra)


def make_parser():
    return make_recipe_parser(ReinforceScriptArguments, ReinforceConfig, read_lab_config(LAB_CONFIG))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

"""GRPO (TRL's own ``GRPOTrainer``, with a prompt order that survives a resume) with the project's defaults,
callbacks, results contract, held-out evaluation and model card — on the offline lab by default, on any model with
flags.

    python recipes/grpo.py                                  # the lab: SFT policy, proxy RM, gold tracked at weight 0
    accelerate launch recipes/grpo.py --config recipes/configs/grpo_lab.yaml
    python recipes/grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_funcs my_pkg.rewards.length_reward --use_peft --output_dir runs/grpo-qwen

Writes <output_dir>/{README.md (model card), metrics.json, log_history.jsonl, training_curves.png} and the policy.
On the lab our callbacks are on (``--monitor auto``: the over-optimisation monitor, KL to the reference on held-out
prompts, the group-advantage check); off it the default is ``--monitor none``. ``--monitor auto`` turns them on,
``--monitor none`` off, ``--monitor kl,grad_variance --monitor_every_n_steps 5`` chooses.
"""

from pathlib import Path

from trl import GRPOConfig, ModelConfig

from hf_rlhf_ext.model_card import RecipeCard
from hf_rlhf_ext.reward_guard_config import GuardedGRPOConfig
from hf_rlhf_ext.run.build import make_trainer, prepare_rl_run
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import train_and_report
from hf_rlhf_ext.run.monitors import add_monitors
from hf_rlhf_ext.run.parsing import make_recipe_parser, read_lab_config
from hf_rlhf_ext.run.spec import RLScriptArguments
from hf_rlhf_ext.trainers.resumable_sampling import ResumableGRPOTrainer

#: The lab run's settings, written once in this YAML file: the parser's defaults on the lab only (elsewhere TRL's);
#: flags and --config override them.
LAB_CONFIG = Path(__file__).parent / "configs" / "grpo_lab.yaml"
CARD = RecipeCard(
    script="recipes/grpo.py", method="GRPO (TRL's GRPOTrainer)", tags=("grpo",),
    hyperparameters=("beta", "num_generations", "loss_type", "scale_rewards", "epsilon", "learning_rate",
                     "per_device_train_batch_size", "max_completion_length", "temperature", "max_steps", "seed"),
)


def main(script_args: RLScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> dict:
    setup = prepare_rl_run(script_args, training_args, model_args)
    trainer = make_trainer(ResumableGRPOTrainer, setup, training_args)
    monitors = add_monitors(trainer, setup, script_args)
    return train_and_report(trainer, setup, script_args, training_args, card=CARD, monitors=monitors)


def make_parser():
    # GRPOConfig plus --nan_rewards (error | drop) for the reward guard make_trainer attaches
    return make_recipe_parser(RLScriptArguments, GuardedGRPOConfig, read_lab_config(LAB_CONFIG))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

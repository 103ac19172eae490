"""PPO with a critic (hf_rlhf_ext.trainers.PPOTrainer) — on the offline lab by default, on any model with flags.

    python recipes/ppo.py                                   # the lab: SFT policy, proxy RM, gold tracked at weight 0
    accelerate launch recipes/ppo.py --config recipes/configs/ppo_lab.yaml
    python recipes/ppo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_name_or_path <rm> --use_peft --critic_shares_base --output_dir runs/ppo-qwen

Writes <output_dir>/{README.md (model card), metrics.json, log_history.jsonl, training_curves.png}, the policy and
<output_dir>/value_model (the critic); ``--push_to_hub --hub_model_id you/name`` uploads all of it.
On the lab our callbacks are on (``--monitor auto``: the over-optimisation monitor, KL to the reference on held-out
prompts); off it the default is ``--monitor none``. ``--monitor auto`` turns them on, ``--monitor none`` off,
``--monitor kl,grad_variance --monitor_every_n_steps 5`` chooses.
"""

from pathlib import Path

from trl import ModelConfig

from hf_rlhf_ext.model_card import RecipeCard
from hf_rlhf_ext.run.build import make_trainer, prepare_rl_run
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import train_and_report
from hf_rlhf_ext.run.monitors import add_monitors
from hf_rlhf_ext.run.parsing import make_recipe_parser, read_lab_config
from hf_rlhf_ext.run.spec import RLScriptArguments
from hf_rlhf_ext.trainers.ppo import PPOTrainer
from hf_rlhf_ext.trainers.ppo_config import PPOConfig

#: The lab run's settings, written once in this YAML file: the parser's defaults on the lab only (elsewhere TRL's);
#: flags and --config override them.
LAB_CONFIG = Path(__file__).parent / "configs" / "ppo_lab.yaml"
CARD = RecipeCard(
    script="recipes/ppo.py", method="PPO with a critic", tags=("ppo",),
    hyperparameters=("kl_coef", "kl_target", "kl_horizon", "kl_estimator", "gamma", "lam", "cliprange",
                     "cliprange_value", "vf_coef", "num_ppo_epochs", "num_mini_batches", "learning_rate",
                     "critic_learning_rate", "per_device_train_batch_size", "max_completion_length", "temperature",
                     "max_steps", "seed"),
)


def main(script_args: RLScriptArguments, training_args: PPOConfig, model_args: ModelConfig) -> dict:
    setup = prepare_rl_run(script_args, training_args, model_args)
    trainer = make_trainer(PPOTrainer, setup, training_args)
    monitors = add_monitors(trainer, setup, script_args)
    return train_and_report(trainer, setup, script_args, training_args, card=CARD, monitors=monitors)


def make_parser():
    return make_recipe_parser(RLScriptArguments, PPOConfig, read_lab_config(LAB_CONFIG))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

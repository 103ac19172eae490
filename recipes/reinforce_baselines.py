"""REINFORCE with each baseline (none / running mean / group) over several seeds, on a reward with a constant offset:
the measured policy-gradient variance over training and the reward curves — on the offline lab by default, on any
model with flags.

    python recipes/reinforce_baselines.py                         # the lab: 3 baselines × 3 seeds, reward = proxy + 5
    python recipes/reinforce_baselines.py --config recipes/configs/reinforce_baselines_lab.yaml  # the same
    python recipes/reinforce_baselines.py --baselines none running_mean --seeds 0 1 --max_steps 30
    python recipes/reinforce_baselines.py --reward_offset 0 --output_dir runs/baselines-no-offset
    python recipes/reinforce_baselines.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_name_or_path <rm> --use_peft --output_dir runs/baselines-qwen

Every flag other than the study's own (``--baselines``, ``--seeds``, ``--reward_offset``, ``--grad_variance_every``,
``--grad_variance_estimates``, ``--final_window``) is a ``ReinforceConfig`` flag shared by every run.

Writes <output_dir>/{baselines.md, baselines.png, metrics.json} and, per run, runs/<baseline>_seed<k>/.
"""

import sys

from hf_rlhf_ext.experiments.baselines import parse_baselines_argv, run_baselines, summary_lines
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import finish_experiment
from hf_rlhf_ext.run.parsing import announce_settings


def main(argv: list[str]) -> dict:
    announce_settings(parse_baselines_argv(argv)[0])
    metrics = run_baselines(argv)
    _, training_args, _ = parse_baselines_argv(argv)
    print(summary_lines(training_args.output_dir, metrics))
    finish_experiment(
        training_args, "recipes/reinforce_baselines.py", argv, tags=("reinforce", "baselines"),
        table_file="baselines.md",
        summary="REINFORCE with each baseline over several seeds, on a reward with a constant offset: the measured "
                "policy-gradient variance over training and the reward curves.",
        plots={"baselines.png": "Training reward (top) and gradient variance (bottom, log) against step: mean over "
                                "seeds, band = min–max"},
        settings={k: v for k, v in metrics.get("settings", {}).items() if k != "argv"},
    )
    return metrics


if __name__ == "__main__":
    cli_main(lambda: main(sys.argv[1:]))

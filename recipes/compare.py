"""PPO (policy + critic) against GRPO (TRL's GRPOTrainer) over several seeds, on the same prompts and the same number
of sampled completions per step — on the offline lab by default, on any model with flags.

    python recipes/compare.py                                 # the lab: 3 seeds × {PPO 32×1, GRPO 4×8}, 60 steps
    python recipes/compare.py --config recipes/configs/compare_lab.yaml
    python recipes/compare.py --seeds 0 1 --max_steps 30 --ppo_kl_coef 0.05 --grpo_beta 0.05
    python recipes/compare.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_model_name_or_path <rm> --gold_reward <held-out judge> --use_peft --output_dir runs/compare-qwen

Every flag other than the comparison's own (``--seeds``, ``--ppo_kl_coef``, ``--grpo_beta``,
``--grpo_num_generations``, ``--eval_every``, ``--gold_reward``, ``--threads_per_run``) goes to both trainers;
PPO-only flags (``--critic_learning_rate``, ...) to PPO only. Each run is its own process (its own peak memory).

Writes <output_dir>/{compare.md, compare.png, metrics.json} and, per run, runs/<trainer>_seed<k>/log_history.jsonl.
"""

import sys

from hf_rlhf_ext.experiments.compare import run_compare, summary_lines
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import finish_experiment
from hf_rlhf_ext.run.parsing import announce_settings


def main(argv: list[str]) -> dict:
    from hf_rlhf_ext.experiments.compare import parse_compare_argv

    announce_settings(parse_compare_argv(argv, "ppo")[0])
    metrics = run_compare(argv)
    _, training_args, _ = parse_compare_argv(argv, "ppo")
    print(summary_lines(training_args.output_dir, metrics))
    finish_experiment(
        training_args, "recipes/compare.py", argv, tags=("ppo", "grpo", "comparison"), table_file="compare.md",
        summary="PPO with a critic against GRPO over several seeds, on the same prompts and the same number of "
                "sampled completions per step: held-out gold, KL to the reference, stability, memory and time.",
        plots={"compare.png": "Held-out gold (top) and KL (bottom) against step: mean over seeds, band = min–max"},
        settings={k: v for k, v in metrics.get("settings", {}).items() if k != "argv"},
    )
    return metrics


if __name__ == "__main__":
    cli_main(lambda: main(sys.argv[1:]))

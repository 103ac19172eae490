"""The β sweep: PPO or GRPO trained once per KL coefficient β (and seed), everything else identical; held-out KL,
proxy and gold per measurement, the Gao et al. (2022) fit, and a report — on the offline lab by default.

    python recipes/beta_sweep.py                                     # GRPO on the lab, β ∈ {0, .005, .02, .05, .2, 1}
    python recipes/beta_sweep.py --config recipes/configs/beta_sweep_lab.yaml --max_parallel 2     # = the defaults
    python recipes/beta_sweep.py --config recipes/configs/beta_sweep_ppo_lab.yaml                  # = --trainer ppo
    python recipes/beta_sweep.py --trainer ppo --betas 0 0.05 0.2 --seeds 0 1 2 --output_dir runs/sweep-ppo
    python recipes/beta_sweep.py --backend ray --cpus_per_point 4 --gpus_per_point 1 \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \\
        --reward_funcs my_pkg.rm my_pkg.judge --reward_weights 1 0 --use_peft --output_dir runs/sweep-qwen

Writes <output_dir>/{results.jsonl, sweep.md, frontier.png, metrics.json}; rerunning the same command resumes.
"""

import sys

from hf_rlhf_ext.experiments.sweeps import parse_sweep_argv, run_sweep
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import finish_experiment
from hf_rlhf_ext.run.parsing import announce_settings


def main(argv: list[str]) -> dict:
    parsed = parse_sweep_argv(argv)  # bad input fails here
    announce_settings(parsed[0])
    training_args = parsed[2]
    metrics = run_sweep(argv)
    finish_experiment(
        training_args, "recipes/beta_sweep.py", argv, tags=(metrics["trainer"], "beta-sweep", "overoptimization"),
        table_file="sweep.md",
        summary=f"{metrics['trainer'].upper()} trained once per KL coefficient β (and seed), everything else "
                "identical: held-out KL, proxy and gold per measurement, and the Gao et al. (2022) fit.",
        plots={"frontier.png": "The frontier: proxy and gold against sqrt(KL) per run, end points per β and seed, "
                               "and the fitted Gao curve on gold"},
        settings={"trainer": metrics["trainer"], "betas": metrics["betas"], "seeds": metrics["seeds"]},
    )
    return metrics


if __name__ == "__main__":
    cli_main(lambda: main(sys.argv[1:]))

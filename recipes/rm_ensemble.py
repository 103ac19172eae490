"""Reward-model ensembles against over-optimisation (Coste et al. 2023): the same low-β GRPO run optimising a single
proxy RM, the ensemble's mean, its minimum, or mean − λ·std; held-out gold, KL and optimised reward per objective.

    python recipes/rm_ensemble.py                                      # the lab: β = 0.005, 3 seeds, 4 objectives
    python recipes/rm_ensemble.py --config recipes/configs/rm_ensemble_lab.yaml --max_parallel 2
    python recipes/rm_ensemble.py --objectives single uwo --penalty 0.5 --k 5 --seeds 0 1 --output_dir runs/ens-k5
    python recipes/rm_ensemble.py --model_name_or_path my/policy --dataset_name my/prompts --use_peft \\
        --ensemble_reward_models rm_a rm_b rm_c --gold_reward my_pkg.judge --beta 0.01 --output_dir runs/ens-own

Writes <output_dir>/{ensemble.md, ensemble.png, metrics.json} and one β-sweep directory per objective
(<output_dir>/<objective>/results.jsonl, ...); rerunning the same command resumes.
"""

import sys

from hf_rlhf_ext.experiments.ensembles import parse_argv, run_experiment
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import finish_experiment
from hf_rlhf_ext.run.parsing import announce_settings


def main(argv: list[str]) -> dict:
    parsed = parse_argv(argv)  # bad input fails here, before any model is loaded
    announce_settings(parsed[0])
    training_args = parsed[3]
    metrics = run_experiment(argv)
    finish_experiment(
        training_args, "recipes/rm_ensemble.py", argv, tags=("grpo", "reward-model-ensemble", "overoptimization"),
        table_file="ensemble.md",
        summary="Reward-model ensembles against over-optimisation (Coste et al. 2023): the same low-β GRPO run "
                "optimising a single proxy reward model, the ensemble's mean, its minimum, or mean − λ·std.",
        plots={"ensemble.png": "Held-out gold against step per objective, and each run's gold against sqrt(KL)"},
        settings=metrics.get("settings", {}),
    )
    return metrics


if __name__ == "__main__":
    cli_main(lambda: main(sys.argv[1:]))

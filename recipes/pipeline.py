"""The RLHF chapter in one command: every experiment, in the chapter's order, and a report whose claims are decided by
the measured numbers.

    accelerate launch recipes/pipeline.py                         # the lab, full run (about 15 min on 2 CPU cores)
    python recipes/pipeline.py --quick --output_dir runs/chapter-quick
    hf-rlhf-ext report --quick                                    # the same, from the console entry point

Writes <output_dir>/report.md, claims.json, one folder per stage (its metrics and plots) and stages/<name>.json (its
result, with a fingerprint of the settings and versions that made it). Rerunning the same command after a kill redoes
only the stages without a result; a stored result made with other settings, or without a fingerprint, is rerun.

On your own model: ``--model_name_or_path``, ``--dataset_name``, ``--reward_funcs`` / ``--reward_model_name_or_path``
(the optimised reward) and ``--gold_funcs`` (a held-out judge standing in for gold). Stages that only make sense on
the lab (its gold reward, its preference pairs) are skipped with the reason, never faked.
"""

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from hf_rlhf_ext.experiments.report import StageStore
from hf_rlhf_ext.run.errors import cli_main
from hf_rlhf_ext.run.finish import outputs_line

if __package__:  # hf_rlhf_ext.recipes.pipeline (installed, or `hf-rlhf-ext report`)
    from . import pipeline_stages as stages
else:  # run as a script: its directory is on sys.path
    import pipeline_stages as stages


@dataclass
class PipelineArguments:
    """Flags of the chapter pipeline.

    Args:
        output_dir: where the report, claims, plots and every stage's files go.
        quick: smaller grids and fewer steps (about 3 minutes once the lab is built) — every claim is still decided.
        seed: the base seed of every stage.
        stages: run only these stages (by name; the report covers what has results).
        max_parallel: processes for the sweeps' points (2 on a 2-core machine).
        model_name_or_path, dataset_name, reward_funcs, reward_model_name_or_path, gold_funcs, use_peft: run the
            stages on your own policy, prompts and rewards (the lab by default).
    """

    output_dir: str = field(default="runs/chapter", metadata={"help": "Output directory."})
    quick: bool = field(default=False, metadata={"help": "Smaller grids and fewer steps (about 3 minutes)."})
    seed: int = field(default=0, metadata={"help": "Base seed."})
    stages: list[str] | None = field(default=None, metadata={"help": f"Only these stages: {stages.NAMES}."})
    max_parallel: int = field(default=2, metadata={"help": "Parallel processes for the sweeps' points."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy (default: the lab's SFT model)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Prompts with a test split (default: lab)."})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Optimised reward functions (dotted)."})
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Optimised reward model."})
    gold_funcs: list[str] | None = field(default=None, metadata={"help": "Held-out judge(s) standing in for gold."})
    use_peft: bool = field(default=False, metadata={"help": "LoRA for every trained policy."})

    def __post_init__(self):
        unknown = sorted(set(self.stages or []) - set(stages.NAMES))
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}; the stages are {stages.NAMES}.")
        if self.max_parallel < 1:
            raise ValueError(f"--max_parallel must be >= 1, got {self.max_parallel}.")

    @property
    def on_lab(self) -> bool:
        return not (self.model_name_or_path or self.dataset_name)


def make_parser():
    from hf_rlhf_ext.run.parsing import RecipeParser

    return RecipeParser((PipelineArguments,))  # unknown flags get a "did you mean"; --output_dir must be a folder


def main(args: PipelineArguments) -> dict[str, Any]:
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    store = StageStore(args.output_dir)
    todo = [s for s in stages.STAGES if args.stages is None or s.name in args.stages]
    results: dict[str, Any] = {}
    bar = tqdm(todo, desc="chapter", unit="stage")
    for stage in bar:
        bar.set_postfix_str(stage.name)
        fingerprint = stages.fingerprint(args, stage.name)
        if reason := store.stale_reason(stage.name, fingerprint):
            tqdm.write(f"[{stage.name}] {reason}; running it")
        results[stage.name], reused = store.run(stage.name, lambda out, s=stage: s.run(args, out), fingerprint)
        if reused:
            tqdm.write(f"[{stage.name}] reused its stored result")
    for name in stages.NAMES:  # earlier invocations' stages count only when made with the same settings
        if name in results:
            continue
        if (stored := store.load(name, stages.fingerprint(args, name))) is not None:
            results[name] = stored
        elif reason := store.stale_reason(name, stages.fingerprint(args, name)):
            results[name] = {"skipped": reason}
    payload = stages.write_report(args, results, seconds=time.time() - start, store=store)
    write_card(args, payload)
    print(outputs_line(args.output_dir, metrics_file="claims.json"))
    return payload


def write_card(args: PipelineArguments, payload: dict[str, Any]) -> None:
    """README.md of the output folder: the claims and their verdicts, the findings, how the run was made."""
    import shlex

    from hf_rlhf_ext.model_card import RunCard, hub_id_or_none, markdown_table, write_model_card
    from hf_rlhf_ext.run.parsing import launch_command

    claims = [(c["id"], c["exercise"], c["statement"], "skipped" if c["holds"] is None else
               ("holds" if c["holds"] else "does NOT hold")) for c in payload["claims"]]
    findings = [(f["id"], f["statement"]) for f in payload["findings"]]
    write_model_card(args.output_dir, RunCard(
        title=os.path.basename(os.path.abspath(args.output_dir)), recipe="recipes/pipeline.py",
        summary="Every experiment of the RLHF chapter in one command; each claim is decided by the measured "
                "statistic in claims.json, and report.md reads every number and plot.",
        command=" ".join([launch_command("recipes/pipeline.py"), *(shlex.quote(a) for a in sys.argv[1:])]),
        tags=("rlhf-chapter", "report"), base_model=hub_id_or_none(args.model_name_or_path),
        datasets=[d for d in [hub_id_or_none(args.dataset_name)] if d], library_name=None,
        hyperparameters={"quick": args.quick, "seed": args.seed, "on the lab": args.on_lab},
        results_markdown=markdown_table(["claim", "exercise", "statement", "verdict"], claims)
        + ("\n\n" + markdown_table(["finding", "statement"], findings) if findings else ""),
        usage="The statistics behind each verdict are in `claims.json`; the full reading is in `report.md`.",
    ))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

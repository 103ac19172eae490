"""The RLHF chapter in one command: every experiment, in the chapter's order, and a report whose claims are decided by
the measured numbers.

    accelerate launch recipes/pipeline.py                      # the lab, full run (about 13.5 minutes on 2 CPU cores)
    python recipes/pipeline.py --quick --output_dir runs/chapter-quick
    hf-rlhf-ext report --quick                                    # the same, from the console entry point

Writes <output_dir>/report.md, claims.json, one folder per stage (its metrics and plots) and stages/<name>.json (its
result, with a fingerprint of the settings and versions that made it). Rerunning the same command after a kill redoes
only the stages without a result; a stored result made with other settings, or without a fingerprint, is rerun.

On a testbed (``hf-rlhf-ext lab build --policy ...``): ``--lab_dir <testbed>``. On your own model:
``--model_name_or_path``, ``--dataset_name``, ``--reward_funcs`` / ``--reward_model_name_or_path``
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
        max_parallel: stages running side by side, each in its own process (2 on a 2-core machine; 1: one after
            another in this process, their output on the console).
        lab_dir: the lab, or a testbed (``hf-rlhf-ext lab build --policy ...``): its policy, prompts, proxy RM and
            judge as the gold; stages that need the lab itself are skipped with the reason.
        model_name_or_path, dataset_name, reward_funcs, reward_model_name_or_path, gold_funcs, use_peft: run the
            stages on your own policy, prompts and rewards (the lab by default).
        learning_rate: of every trained policy (the mini loop's ``--lr``); unset, each stage keeps its own.
    """

    output_dir: str = field(default="runs/chapter", metadata={"help": "Output directory."})
    quick: bool = field(default=False, metadata={"help": "Smaller grids and fewer steps (about 3 minutes)."})
    seed: int = field(default=0, metadata={"help": "Base seed."})
    stages: list[str] | None = field(default=None, metadata={"help": f"Only these stages: {stages.NAMES}."})
    max_parallel: int = field(default=2, metadata={"help": "Stages running side by side (processes)."})
    lab_dir: str | None = field(default=None, metadata={"help": "Lab directory, or a testbed's (default: the lab)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy (default: the lab's SFT model)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Prompts with a test split (default: lab)."})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Optimised reward functions (dotted)."})
    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "Optimised reward model."})
    gold_funcs: list[str] | None = field(default=None, metadata={"help": "Held-out judge(s) standing in for gold."})
    use_peft: bool = field(default=False, metadata={"help": "LoRA for every trained policy."})
    learning_rate: float | None = field(default=None, metadata={"help": (
        "Learning rate of every trained policy (default: each stage's own: the lab's on the lab, TRL's off it). A "
        "model of your own needs one chosen for it: at TRL's 1e-6 a policy barely moves in the chapter's steps.")})

    def __post_init__(self):
        unknown = sorted(set(self.stages or []) - set(stages.NAMES))
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}; the stages are {stages.NAMES}.")
        if self.max_parallel < 1:
            raise ValueError(f"--max_parallel must be >= 1, got {self.max_parallel}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")

    @property
    def on_lab(self) -> bool:
        return not (self.model_name_or_path or self.dataset_name)

    @property
    def on_testbed(self) -> bool:
        """On a testbed's policy, prompts and proxy (``--lab_dir`` of one): the lab's own numbers do not apply."""
        from hf_rlhf_ext.lab.testbed_settings import saved_settings

        return self.on_lab and saved_settings(self.lab_dir) is not None


def make_parser():
    from hf_rlhf_ext.run.parsing import RecipeParser

    return RecipeParser((PipelineArguments,))  # unknown flags get a "did you mean"; --output_dir must be a folder


def main(args: PipelineArguments) -> dict[str, Any]:
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    store = StageStore(args.output_dir)
    todo = [s for s in stages.STAGES if args.stages is None or s.name in args.stages]
    results = run_chapter(args, store, todo)
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


def run_chapter(args: PipelineArguments, store: StageStore, todo: list) -> dict[str, Any]:
    """The stages of ``todo``: the lab first, then the independent stages in ``--max_parallel`` worker processes
    (longest first), then the concepts (they read the best-of-N stage's model). Each result is stored as it finishes;
    a stored one with this run's fingerprint is reused."""
    from functools import partial

    from hf_rlhf_ext.experiments.stage_runner import StageJob, run_stages, worker_threads

    first = [s for s in todo if s.name in stages.FIRST]
    last = [s for s in todo if s.name in stages.LAST]
    middle = sorted((s for s in todo if s not in first + last), key=lambda s: -s.cost)
    lanes = min(args.max_parallel, max(1, len(middle)))
    inner = stages.stage_args(args, lanes, worker_threads(lanes) if lanes > 1 else 0)
    bar = tqdm(total=len(todo), desc="chapter", unit="stage")

    def on_done(job: StageJob, result: dict[str, Any], reused: bool) -> None:
        bar.update()
        tqdm.write(f"[{job.name}] reused its stored result" if reused else
                   f"[{job.name}] done in {result.get('stage_seconds', 0):.0f} s")

    def jobs(group: list) -> list[StageJob]:
        for stage in group:
            if reason := store.stale_reason(stage.name, stages.fingerprint(args, stage.name)):
                tqdm.write(f"[{stage.name}] {reason}; running it")
        return [StageJob(s.name, stages.fingerprint(args, s.name), partial(s.run, inner)) for s in group]

    results = run_stages(store, jobs(first), 1, on_done)
    results |= run_stages(store, jobs(middle), lanes, on_done)
    results |= run_stages(store, jobs(last), 1, on_done)
    bar.close()
    return results


def write_card(args: PipelineArguments, payload: dict[str, Any]) -> None:
    """README.md of the output folder: the claims and their verdicts, the findings, how the run was made."""
    import shlex

    from hf_rlhf_ext.model_card import RunCard, hub_id_or_none, markdown_table, write_model_card
    from hf_rlhf_ext.run.parsing import launch_command

    claims = [(c["id"], c["exercise"], c["statement"], "skipped" if c["holds"] is None else
               ("holds" if c["holds"] else "does NOT hold")) for c in payload["claims"]]
    findings = [(f["id"], f["statement"]) for f in payload["findings"]]
    on_testbed = getattr(args, "on_testbed", False)
    write_model_card(args.output_dir, RunCard(
        title=os.path.basename(os.path.abspath(args.output_dir)), recipe="recipes/pipeline.py",
        summary="Every experiment of the RLHF chapter in one command; each claim is decided by the measured "
                "statistic in claims.json, and report.md reads every number and plot.",
        command=" ".join([launch_command("recipes/pipeline.py"), *(shlex.quote(a) for a in sys.argv[1:])]),
        tags=("rlhf-chapter", "report"), base_model=hub_id_or_none(args.model_name_or_path),
        datasets=[d for d in [hub_id_or_none(args.dataset_name)] if d], library_name=None,
        hyperparameters={"quick": args.quick, "seed": args.seed, "on the lab": args.on_lab and not on_testbed,
                         **({"testbed": args.lab_dir} if on_testbed else {})},
        results_markdown=markdown_table(["claim", "exercise", "statement", "verdict"], claims)
        + ("\n\n" + markdown_table(["finding", "statement"], findings) if findings else ""),
        usage="The statistics behind each verdict are in `claims.json`; the full reading is in `report.md`.",
    ))


if __name__ == "__main__":
    cli_main(lambda: main(*make_parser().parse_args_and_config()))

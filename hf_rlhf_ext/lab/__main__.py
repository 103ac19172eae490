"""Command line: ``python -m hf_rlhf_ext.lab build|path`` (also ``hf-rlhf-ext lab ...`` and ``hf-rlhf-lab ...``).

    hf-rlhf-ext lab build [--lab_dir DIR] [--force] [--seed N] [--json]
        put the lab in place, print where and its numbers
    hf-rlhf-ext lab path [--lab_dir DIR]                                    print only its directory (for shell scripts)

The lab lives in ``--lab_dir`` if given, else in ``$HF_RLHF_EXT_LAB_DIR`` if set, else in the cache
(``$HF_RLHF_EXT_HOME``, default ``~/.cache/hf_rlhf_ext``): the recipes' ``--lab_dir`` and the lab reward functions
follow the same rule, so one directory serves them all. The default lab ships with the package and is copied there in
a second; ``--force`` (or a ``--seed`` other than 0) trains one from scratch, about a minute on a free CPU core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

KEY_METRICS = (
    "sft_test_gold_mean", "sft_test_eos_rate", "sft_test_mean_words", "sft_test_item_rate", "gold_min", "gold_max",
    "pairs_train_flip_rate", "rm_test_accuracy", "rm_test_gold_accuracy", "rm_test_n_gold_pairs", "rm_test_corr_gold",
)  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-rlhf-ext lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="put the lab in place (or reuse it) and print its location and metrics")
    path = sub.add_parser("path", help="print the lab's directory, putting the default lab there if missing")
    for p in (build, path):
        p.add_argument(
            "--lab_dir", "--output_dir", dest="lab_dir", default=None,
            help="the lab's directory (default: $HF_RLHF_EXT_LAB_DIR, else the cache)",
        )  # fmt: skip
    build.add_argument("--seed", type=int, default=0, help="the lab's seed (another seed trains a new lab)")
    build.add_argument("--force", action="store_true", help="train from scratch even if a complete lab is there")
    build.add_argument("--json", action="store_true", help="print all metrics as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from .build import build_lab, open_lab
    from .config import LabConfig

    if args.command == "path":
        print(open_lab(args.lab_dir).root)
        return 0
    start = time.perf_counter()
    lab = build_lab(LabConfig(seed=args.seed), output_dir=args.lab_dir, force=args.force)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"root": lab.root, **lab.metrics}, indent=2, sort_keys=True))
        return 0
    print(f"lab: {lab.root}  ({elapsed:.1f} s)")
    print(f"  policy:       {lab.policy_path}")
    print(f"  reward model: {lab.reward_model_path}")
    print(f"  prompts:      {lab.prompts_path}  (train.jsonl, test.jsonl: `--dataset_name` of `trl grpo`)")
    for k in KEY_METRICS:
        v = lab.metrics.get(k)
        print(f"  {k:24s} {v:.4g}" if isinstance(v, float) else f"  {k:24s} {v}")
    print(f"  build_times              {lab.metrics.get('build_times')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m hf_rlhf_ext.lab build [--output_dir DIR] [--seed N] [--force]`` (also ``hf-rlhf-lab``).

Prints where the lab is and its key numbers; a second call with the same config reuses the cache.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-rlhf-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse) the lab and print its location and metrics")
    b.add_argument("--output_dir", default=None, help="where to build (default: the cache, see default_lab_dir)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if a complete lab is cached")
    b.add_argument("--json", action="store_true", help="print all metrics as JSON")
    args = parser.parse_args(argv)

    from .build import build_lab
    from .config import LabConfig

    start = time.perf_counter()
    lab = build_lab(LabConfig(seed=args.seed), output_dir=args.output_dir, force=args.force)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"root": lab.root, **lab.metrics}, indent=2, sort_keys=True))
        return 0
    print(f"lab: {lab.root}  ({elapsed:.1f} s)")
    print(f"  policy:       {lab.policy_path}")
    print(f"  reward model: {lab.reward_model_path}")
    for k in KEY_METRICS:
        v = lab.metrics.get(k)
        print(f"  {k:24s} {v:.4g}" if isinstance(v, float) else f"  {k:24s} {v}")
    print(f"  build_times              {lab.metrics.get('build_times')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

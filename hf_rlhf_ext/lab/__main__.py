"""Command line: ``python -m hf_rlhf_ext.lab build|path`` (also ``hf-rlhf-ext lab ...`` and ``hf-rlhf-lab ...``).

    hf-rlhf-ext lab build [--lab_dir DIR] [--force] [--seed N] [--json]
        put the lab in place, print where and its numbers
    hf-rlhf-ext lab build --policy PATH_OR_ID --gold_funcs pkg.mod.judge --lab_dir DIR [--prompts FILE.jsonl]
        [--label_noise TAU] [--n_pairs_train N] [--reward_model_base PATH|policy] ...
        a testbed around a model of one's own (``hf_rlhf_ext.lab.testbed``; docs/testbed.md)
    hf-rlhf-ext lab path [--lab_dir DIR]                                    print only its directory (for shell scripts)

The lab lives in ``--lab_dir`` if given, else in ``$HF_RLHF_EXT_LAB_DIR`` if set, else in the cache
(``$HF_RLHF_EXT_HOME``, default ``~/.cache/hf_rlhf_ext``): the recipes' ``--lab_dir`` and the lab reward functions
follow the same rule, so one directory serves them all. The default lab ships with the package and is copied there in
a second; ``--force`` (or a ``--seed`` other than 0) trains one from scratch, about a minute on a free CPU core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

KEY_METRICS = (
    "sft_test_gold_mean", "sft_test_eos_rate", "sft_test_mean_words", "sft_test_item_rate", "gold_min", "gold_max",
    "pairs_train_flip_rate", "rm_test_accuracy", "rm_test_gold_accuracy", "rm_test_n_gold_pairs", "rm_test_corr_gold",
)  # fmt: skip
TESTBED_METRICS = (
    "policy_test_gold_mean", "policy_test_gold_std", "policy_test_eos_rate", "pairs_train_flip_rate", "rm_kind",
    "rm_params", "rm_test_accuracy", "rm_test_gold_accuracy", "rm_test_n_gold_pairs", "rm_test_corr_gold",
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
    tb = build.add_argument_group("testbed (a lab around a model and a gold judge of one's own: give --policy)")
    tb.add_argument("--policy", default=None, help="causal LM (local directory or Hub id): builds a testbed")
    tb.add_argument("--gold_funcs", default=None, help="the gold judge: dotted path of a TRL reward function")
    tb.add_argument("--prompts", default=None, help="JSONL file with a 'prompt' column (default: the lab's prompts)")
    from .testbed import TestbedConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TestbedConfig)}
    for name, kind, what in (
        ("label_noise", float, "Bradley-Terry temperature on the judge's gold gap (0 = noiseless labels)"),
        ("n_pairs_train", int, "training pairs for the proxy RM"), ("n_pairs_test", int, "held-out pairs"),
        ("max_new_tokens", int, "sampling limit per reply"), ("temperature", float, "sampling temperature"),
        ("test_fraction", float, "share of --prompts held out"),
        ("reward_model_base", str, "pretrained proxy RM (path, Hub id or 'policy'); default: a small GPT-2 from "
                                   "scratch on the policy's tokenizer"),
        ("reward_model_lora_r", int, "LoRA rank for --reward_model_base (0: full fine-tuning)"),
        ("rm_n_embd", int, "width of the from-scratch RM"), ("rm_n_layer", int, "layers of the from-scratch RM"),
        ("rm_init_embeddings", _yes_no, "start the from-scratch RM's token embeddings from the policy's (projected)"),
        ("rm_dropout", float, "dropout of the from-scratch RM while it trains (against memorising noisy labels)"),
        ("rm_epochs", float, "RM epochs"), ("rm_batch_size", int, "RM batch size"),
        ("rm_lr", float, "RM learning rate (default by kind: 1e-3 scratch, 2e-5 full, 2e-4 LoRA)"),
    ):
        default = defaults[name]
        tb.add_argument(f"--{name}", type=kind, default=default, help=f"{what} (default: {default})")
    return parser


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def build_testbed_from_args(args: argparse.Namespace):
    from ..validation import InputError
    from .testbed import TestbedConfig, build_testbed

    if not args.gold_funcs:
        raise InputError("--policy builds a testbed and needs its gold judge: add --gold_funcs pkg.module.function.")
    fields = ("label_noise", "n_pairs_train", "n_pairs_test", "max_new_tokens", "temperature", "test_fraction",
              "reward_model_base", "reward_model_lora_r", "rm_n_embd", "rm_n_layer", "rm_init_embeddings", "rm_dropout",
              "rm_epochs", "rm_batch_size", "rm_lr")
    config = TestbedConfig(policy=args.policy, gold_funcs=args.gold_funcs, prompts=args.prompts, seed=args.seed,
                           **{k: getattr(args, k) for k in fields})
    return build_testbed(config, args.lab_dir, force=args.force)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from .build import build_lab, open_lab
    from .config import LabConfig

    if args.command == "path":
        print(open_lab(args.lab_dir).root)
        return 0
    start = time.perf_counter()
    if args.policy or args.gold_funcs:
        from ..validation import InputError

        if not args.policy:
            print("error: --gold_funcs is the judge of a testbed: add --policy (the model to build it around).",
                  file=sys.stderr)
            return 2
        try:
            lab = build_testbed_from_args(args)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        lab = build_lab(LabConfig(seed=args.seed), output_dir=args.lab_dir, force=args.force)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"root": lab.root, **lab.metrics}, indent=2, sort_keys=True))
        return 0
    print(f"lab: {lab.root}  ({elapsed:.1f} s)")
    print(f"  policy:       {lab.policy_path}")
    print(f"  reward model: {lab.reward_model_path}")
    print(f"  prompts:      {lab.prompts_path}  (train.jsonl, test.jsonl: `--dataset_name` of `trl grpo`)")
    if lab.is_testbed:
        print(f"  gold judge:   {lab.gold_funcs}  (tracked by the recipes as {lab.metrics.get('gold_metric')})")
    for k in TESTBED_METRICS if lab.is_testbed else KEY_METRICS:
        v = lab.metrics.get(k)
        print(f"  {k:24s} {v:.4g}" if isinstance(v, float) else f"  {k:24s} {v}")
    print(f"  build_times              {lab.metrics.get('build_times')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Samples/s of ``BestOfNSampler``'s pool (the KV-cache sampler, finished rows leaving the batch) against
``model.generate`` drawing the same pool (same prompts × M, same batches, same sampling settings), on the lab policy.

    OMP_NUM_THREADS=1 python benchmarks/best_of_n_speed.py --repeats 5

Interleaved repeats (ours, generate, ours, generate, …) so that machine noise hits both alike; prints each repeat, the
median ratio and its min–max. Target: ≥ 1.5×.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=80, help="held-out lab prompts")
    parser.add_argument("--pool", type=int, default=16, help="samples per prompt (M)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()

    from hf_rlhf_ext.experiments.best_of_n import sample_pool
    from hf_rlhf_ext.lab import build_lab

    lab = build_lab()
    tokenizer, policy = lab.load_tokenizer(), lab.load_policy()
    prompts = list(lab.load_prompts()["test"]["prompt"])[: args.prompts]
    n = len(prompts) * args.pool

    def run(use_kv_cache: bool, seed: int) -> float:
        start = time.perf_counter()
        sample_pool(policy, tokenizer, prompts, args.pool, args.max_new_tokens, batch_size=args.batch_size, seed=seed,
                    use_kv_cache=use_kv_cache)
        return n / (time.perf_counter() - start)

    run(True, 0), run(False, 0)  # warm-up
    ratios = []
    for r in range(args.repeats):
        ours, generate = run(True, r), run(False, r)
        ratios.append(ours / generate)
        print(json.dumps({"repeat": r, "samples": n, "ours_samples_per_s": round(ours, 1),
                          "generate_samples_per_s": round(generate, 1), "ratio": round(ours / generate, 3)}))
    print(f"threads={torch.get_num_threads()} prompts={len(prompts)} pool={args.pool} batch={args.batch_size} "
          f"max_new_tokens={args.max_new_tokens}")
    print(f"ours / generate samples/s: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}) over {args.repeats} interleaved repeats (target >= 1.5x)")


if __name__ == "__main__":
    main()

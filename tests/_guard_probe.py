"""Launched on two gloo ranks by test_reward_guard. First a clean batch where only rank 1's completion is empty (the
logged counts must cover both ranks), then rank 1's reward is NaN, rank 0's finite; each rank prints, as one JSON
line, what it logged and what its guard raised (both must stop, or rank 0 would wait forever in the next collective).
Each rank also writes it to probe-rank<k>.json in the output folder, which the test reads: two processes printing to
one pipe can interleave their lines."""

import json
import math
import sys

import torch.distributed as dist
from transformers import TrainingArguments

from hf_rlhf_ext.reward_guard import RewardGuard

args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to="none")  # joins the gloo group
rank = args.distributed_state.process_index


def rank_reward(prompts=None, completions=None, **kwargs):
    return [math.nan if rank == 1 and c == "nan" else 1.0 for c in completions]


guard = RewardGuard([rank_reward], sys.argv[1])
logged = {}
guard.reward_funcs[0](prompts=["p"], completions=["" if rank == 1 else "ok"], log_metric=logged.__setitem__)
outcome = {"rank": rank, "raised": None, "path": None, "logged": logged}
try:
    guard.reward_funcs[0](prompts=["p"], completions=["nan"], log_metric=lambda *a: None)
except Exception as exc:  # noqa: BLE001 - reported to the test
    outcome.update(raised=type(exc).__name__, message=str(exc), path=getattr(exc, "path", None))
with open(f"{sys.argv[1]}/probe-rank{rank}.json", "w") as f:
    json.dump(outcome, f)
print("PROBE " + json.dumps(outcome), flush=True)
dist.destroy_process_group()

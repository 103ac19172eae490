"""Launched by test_accelerate_configs: each rank prints what accelerate set up, as one JSON line."""

import json

import torch.distributed as dist
from transformers import TrainingArguments

# The recipes run on the CPU through TrainingArguments(use_cpu=True); that is what makes the ranks join a gloo group.
args = TrainingArguments(output_dir="/tmp/_dist_probe", use_cpu=True, report_to="none")
state = args.distributed_state
t = __import__("torch").tensor([float(state.process_index + 1)])
if dist.is_initialized():
    dist.all_reduce(t)
print("PROBE " + json.dumps({"rank": state.process_index, "world": state.num_processes, "backend": state.backend,
                             "sum": t.item()}), flush=True)
if dist.is_initialized():
    dist.destroy_process_group()

"""Run by test_value_head: starts two gloo ranks (``torch.multiprocessing``, free port) that each train PPOTrainer with
value_head_on_policy=True under DDP (what accelerate prepares on CPU), each on its own prompts. Each rank writes
``rank<N>.json`` after training."""

import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ppo_helpers import ppo_args, prompts, target_word  # noqa: E402


def train_on_rank(rank: int, world_dir: str, out_dir: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from hf_rlhf_ext.trainers.ppo import PPOTrainer

    args = ppo_args(out_dir, value_head_on_policy=True, max_steps=3, learning_rate=1e-2, critic_learning_rate=5e-2,
                    vf_coef=1.0)
    trainer = PPOTrainer(model=os.path.join(world_dir, "policy"), reward_funcs=target_word, args=args,
                         train_dataset=prompts(16))
    trainer.train()
    head = trainer.value_model.value_head
    result = {
        "ddp": type(trainer.model_wrapped).__name__,
        "head": head.weight.detach().flatten().tolist() + head.bias.detach().tolist(),
        "policy": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
        "local_returns": trainer.last_rollout.returns.sum(dim=1).tolist(),  # this rank's own completions
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.start_processes(train_on_rank, args=(sys.argv[1], sys.argv[2], free_port), nprocs=2, start_method="spawn")

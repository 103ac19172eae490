"""Launched on two gloo ranks by test_ppo_fsdp2: PPOTrainer's rollout, loss, critic clipping and one optimizer over
policy and critic, with both models sharded by FSDP2 (``fully_shard``). Accelerate's FSDP path does not engage on CPU
(it runs DDP there), so the policy is sharded here as accelerate would shard it, and the critic by our own
``shard_critic``. Each rank prints one JSON line per step."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ppo_helpers import ppo_args, prompts, target_word  # noqa: E402

from hf_rlhf_ext.objectives import clipped_value_loss  # noqa: E402
from hf_rlhf_ext.trainers.critic import load_critic, save_critic, shard_critic  # noqa: E402
from hf_rlhf_ext.trainers.ppo import PPOTrainer  # noqa: E402

world_dir, out_dir, steps = sys.argv[1], sys.argv[2], 3


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded(module) -> bool:
    params = list(module.parameters())
    return all(hasattr(p, "full_tensor") for p in params) and any(p.to_local().numel() < p.numel() for p in params)


def checksum(module) -> float:
    return float(sum(full(p.detach()).double().sum() for p in module.parameters()))


def run(mode: str) -> None:
    from peft import LoraConfig

    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM") if mode == "shared" else None
    args = ppo_args(os.path.join(out_dir, mode), critic_shares_base=mode == "shared", vf_coef=1.0, seed=0,
                    generation_kwargs={"eos_token_id": None})  # fixed length: every rank runs the same forwards
    trainer = PPOTrainer(model=os.path.join(world_dir, "policy"), reward_funcs=target_word, args=args,
                         train_dataset=prompts(), peft_config=peft)
    rank = trainer.accelerator.process_index
    reference_critic = copy.deepcopy(trainer.value_model)  # unsharded, to check the gradient reduction
    for block in trainer.model.base_model.modules() if peft is None else trainer.model.modules():
        if isinstance(block, torch.nn.ModuleList):
            for layer in block:
                fully_shard(layer)
    fully_shard(trainer.model)
    trainer.value_model_wrapped = shard_critic(trainer.value_model)
    trainer.current_gradient_accumulation_steps = 1
    optimizer = trainer.optimizer = trainer.create_optimizer()
    trainer.model.train()
    rows = [{"prompt": p} for p in prompts(8)["prompt"]][rank * 4 : (rank + 1) * 4]  # each rank its own prompts
    before = (checksum(trainer.model), checksum(trainer.value_model))
    for step in range(steps):
        batch = trainer._generate_and_score_completions(rows)
        trainer._compute_loss(trainer.model, batch).backward()
        # The sharded critic's gradient must be that of the value loss token-averaged over *both* ranks' tokens, as
        # one process holding the whole batch computes it (and as DDP gets it): the ranks' completions end at
        # different lengths, so this is not the mean of the ranks' own token means. Reference: each rank's
        # unsharded copy backpropagates its summed token losses / all ranks' tokens; the sum over ranks is the
        # gradient of the global token mean.
        reference_critic.load_state_dict({k: full(v) for k, v in trainer.value_model.state_dict().items()})
        reference_critic.zero_grad(set_to_none=True)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        mask = batch["completion_mask"].float()
        tokens = mask.sum()
        all_tokens = tokens.clone()
        dist.all_reduce(all_tokens)
        values = reference_critic(ids, att, completion_length=batch["completion_ids"].size(1))
        local_mean = clipped_value_loss(values, batch["old_values"], batch["returns"], args.cliprange_value, mask)
        (local_mean * tokens / all_tokens).backward()
        grad_err, grad_max, compared = 0.0, 0.0, 0
        for p, q in zip(trainer.value_model.parameters(), reference_critic.parameters()):
            if q.grad is not None:
                dist.all_reduce(q.grad)
                grad_err = max(grad_err, float((full(p.grad) - q.grad).abs().max()))
                grad_max, compared = max(grad_max, float(q.grad.abs().max())), compared + 1
        trainer._clip_grad_norm(trainer.model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.value_model.zero_grad(set_to_none=True)
        after = (checksum(trainer.model), checksum(trainer.value_model))
        print("FSDP2 " + json.dumps({
            "mode": mode, "rank": rank, "step": step, "policy": after[0], "critic": after[1],
            "policy_moved": after[0] != before[0], "critic_moved": after[1] != before[1],
            "policy_sharded": sharded(trainer.model), "critic_sharded": sharded(trainer.value_model),
            "critic_grad_err": grad_err, "critic_grad_max": grad_max, "critic_grads_compared": compared,
            "tokens": int(tokens),
        }), flush=True)
        before = after
    # Checkpoint round trip: every rank gathers the full critic, rank 0 writes it; loading restores the shards.
    save_critic(trainer.value_model, os.path.join(out_dir, mode), is_main_process=rank == 0)
    dist.barrier()
    saved = checksum(trainer.value_model)
    with torch.no_grad():
        for p in trainer.value_model.parameters():
            p.add_(1.0)
    restored = None
    if mode == "separate":
        load_critic(trainer.value_model, os.path.join(out_dir, mode))
        restored = checksum(trainer.value_model)
    print("FSDP2_SAVE " + json.dumps({"mode": mode, "rank": rank, "saved": saved, "restored": restored,
                                      "written": os.path.isfile(os.path.join(out_dir, mode, "value_model",
                                                                             "value_head.safetensors"))}), flush=True)


for mode in ("separate", "shared"):
    run(mode)
dist.barrier()
dist.destroy_process_group()

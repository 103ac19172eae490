"""hf_rlhf_ext's PPOTrainer (PPO with a critic on TRL 1.16's GRPOTrainer) on exactly the work of the peer benchmark in
../shared/bench/peer (see its README and task.py): GPT-2 h=128 × 2 layers policy, the same frozen GPT-2 reward model
and GPT-2 critic checkpoint (task.py's ``value_<h>``: a fresh zero head on its body), reference model with KL coef 0.05,
temperature 0.7 and no top-k/p, 16 samples per optimizer step (G=1: 16 distinct prompts), 8-token prompts and
32-token responses, 512 samples; ``--epochs`` = PPO epochs per rollout (1 optimizer step each, one mini-batch).

Fixed-length responses: instead of ``min_new_tokens`` (which PPOTrainer refuses, because it changes the sampling
distribution and breaks the KL) generation ignores EOS (``generation_kwargs={"eos_token_id": None}``), as trl 1.12
PPO does with ``stop_token=None``. Prints the same ``RESULT {json}`` line as the other peer scripts.

  OMP_NUM_THREADS=1 python benchmarks/peer/ppo_ours.py --epochs 1 [--peer ../shared/bench/peer]
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--peer", default=os.path.join(HERE, "..", "..", "..", "shared", "bench", "peer"),
               help="directory of the peer benchmark (task.py)")
p.add_argument("--h", type=int, default=128)
p.add_argument("--bs", type=int, default=16)
p.add_argument("--len", type=int, default=32)
p.add_argument("--epochs", type=int, default=1, help="num_ppo_epochs")
p.add_argument("--episodes", type=int, default=512)
p.add_argument("--lr", type=float, default=5e-5)
p.add_argument("--beta", type=float, default=0.05)
p.add_argument("--logprobs", default="sampling", choices=["sampling", "forward"],
               help="rollout log-probs from the sampling logits (default) or from one extra forward pass")
p.add_argument("--generation", default="fast", choices=["fast", "generate"],
               help="PPOConfig.fast_generation: the KV-cache sampling loop (default) or model.generate")
p.add_argument("--tag", default="ours")
p.add_argument("--out", default=None)
a = p.parse_args()

sys.path.insert(0, os.path.abspath(a.peer))
import task  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from hf_rlhf_ext.trainers.ppo import PPOTrainer  # noqa: E402
from hf_rlhf_ext.trainers.ppo_config import PPOConfig  # noqa: E402

torch.manual_seed(0)
tok = task.tokenizer()
paths = task.model_paths(a.h)
policy = GPT2LMHeadModel.from_pretrained(paths["policy"])
reward_model = GPT2ForSequenceClassification.from_pretrained(paths["reward"])
# trailing space: GRPO builds the RM input as prompt_text + completion_text; the prompt stays 8 tokens
ds = Dataset.from_dict({"prompt": [t + " " for t in task.prompt_texts()]})
out = a.out or tempfile.mkdtemp(prefix="ppo_ours_")
steps = a.episodes // a.bs * a.epochs
args = PPOConfig(
    output_dir=out, use_cpu=True, report_to="none", bf16=False, fp16=False, gradient_checkpointing=False,
    per_device_train_batch_size=a.bs, gradient_accumulation_steps=1, num_generations=1, num_ppo_epochs=a.epochs,
    max_completion_length=a.len, temperature=0.7, top_k=0, top_p=1.0, generation_kwargs={"eos_token_id": None},
    kl_coef=a.beta, learning_rate=a.lr, max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
    seed=0, dataloader_num_workers=0, logprobs_from_sampling=a.logprobs == "sampling",
    fast_generation=a.generation == "fast",
    value_model_name_or_path=paths["value"],
)
trainer = PPOTrainer(model=policy, reward_funcs=reward_model, args=args, train_dataset=ds, processing_class=tok,
                     reward_processing_classes=tok)
trainer.remove_callback(PrinterCallback)

t0 = time.perf_counter()
trainer.train()
wall = time.perf_counter() - t0

hist = [h for h in trainer.state.log_history if "objective/scores" in h]
keys = ["objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg",
        "policy/clipfrac_avg", "val/explained_variance", "completions/mean_length"]


def avg(rows, k):
    v = [r[k] for r in rows if r.get(k) is not None]
    return round(sum(v) / len(v), 5) if v else None


samples = trainer.state.global_step // a.epochs * a.bs
q = max(1, len(hist) // 4)
res = dict(
    tool="ppo_ours", tag=a.tag, h=a.h, bs=a.bs, G=1, len=a.len, epochs=a.epochs, beta=a.beta, logprobs=a.logprobs,
    generation=a.generation,
    episodes=samples, optimizer_steps=trainer.state.global_step, train_wall_s=round(wall, 3),
    samples_per_s=round(samples / wall, 2), peak_rss_mb=round(task.peak_rss_mb(), 1),
    first_quarter={k: avg(hist[:q], k) for k in keys}, last_quarter={k: avg(hist[-q:], k) for k in keys},
    versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__),
)
print("RESULT", json.dumps(res), flush=True)

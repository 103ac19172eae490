"""Peak memory of PPO (policy + critic + reference + RM) against GRPO (policy + reference + RM), with LoRA, with the
critic as its own model, as a LoRA adapter + value head on the policy's frozen base (``--critic_shares_base``), or as
a value head on the policy's own hidden states (``--value_head_on_policy``).

    OMP_NUM_THREADS=1 python benchmarks/memory.py [--n_embd 512] [--n_layer 8] [--steps 3] [--runs grpo_lora ...]

Builds a mid-size GPT-2 policy and reward model locally (so that weights, not imports, dominate), then runs each
configuration of ``recipes/ppo.py`` / ``recipes/grpo.py`` in its own process and reads its peak RSS (CPU) or peak CUDA
memory. Prints peak memory above the import baseline and the ratios to GRPO.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
RUNS = {
    "grpo_lora": ["grpo", "--use_peft", "--num_generations", "4"],
    "ppo_lora": ["ppo", "--use_peft"],
    "ppo_lora_shared_critic": ["ppo", "--use_peft", "--critic_shares_base"],
    "ppo_lora_value_head": ["ppo", "--use_peft", "--value_head_on_policy"],
    "grpo_full": ["grpo", "--num_generations", "4"],
    "ppo_full": ["ppo"],
}


def build_models(root: str, n_embd: int, n_layer: int) -> tuple[str, str, str]:
    """A policy and a reward model on the lab's tokenizer, and the lab's prompts, saved where the recipes load them."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from hf_rlhf_ext.lab import build_lab

    lab = build_lab()
    tok = lab.load_tokenizer()
    cfg = dict(vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=8,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy, rm = os.path.join(root, "policy"), os.path.join(root, "rm")
    GPT2LMHeadModel(GPT2Config(**cfg)).save_pretrained(policy)
    GPT2ForSequenceClassification(GPT2Config(**cfg, num_labels=1)).save_pretrained(rm)
    for path in (policy, rm):
        tok.save_pretrained(path)
    prompts = os.path.join(root, "prompts")
    lab.load_prompts().save_to_disk(prompts)
    return policy, rm, prompts


def baseline_mb() -> float:
    """Peak RSS of a process that only imports the stack (what every run pays before any model)."""
    code = ("import resource, torch, transformers, trl, peft, accelerate, datasets;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout)


def peak_mb(cmd: list[str]) -> float:
    """Peak RSS (MB) of ``cmd`` run to completion in a fresh process (RUSAGE_CHILDREN of a one-child wrapper)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=ENV)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="configurations to run")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    a = parser.parse_args()
    base = baseline_mb()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm, prompts = build_models(tmp, a.n_embd, a.n_layer)
        for name in a.runs:
            recipe, *flags = RUNS[name]
            cmd = [sys.executable, os.path.join(ROOT, "recipes", f"{recipe}.py"), "--model_name_or_path", policy,
                   "--reward_model_name_or_path", rm, "--dataset_name", prompts,
                   "--output_dir", os.path.join(tmp, name), "--max_steps", str(a.steps), "--num_eval_prompts", "0",
                   "--per_device_train_batch_size", "16", "--max_completion_length", "32", "--disable_tqdm", "true",
                   "--logging_steps", "1", "--save_strategy", "no", *flags]
            rows[name] = peak_mb(cmd) - base
            print(f"{name:<24} peak above imports {rows[name]:8.1f} MB", flush=True)
    print(f"\nimport baseline {base:.0f} MB; GPT-2 n_embd {a.n_embd} x {a.n_layer} layers")
    print("| run | peak MB above imports | ÷ GRPO (same LoRA setting) |")
    print("|---|---|---|")
    for name, mb in rows.items():
        ref = rows.get("grpo_lora" if "lora" in name else "grpo_full")
        print(f"| {name} | {mb:.0f} | {f'{mb / ref:.2f}' if ref else 'n/a'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"baseline_mb": base, "rows": rows, "n_embd": a.n_embd, "n_layer": a.n_layer}, f, indent=2)


if __name__ == "__main__":
    main()

"""Does a lower sampling temperature (the mini loop's ``--temperature``) make SmolLM2 end a reply politely before any
learning? 64 training prompts of the mini loop, one reply each of at most 32 tokens, sampled at T = 1, 0.7 and 0.5
(no top-k, no top-p) through SmolLM2's chat template; a reply counts as the mini loop counts it (it ends with its EOS
and its last words are a polite closing). Output: temperature_check.json."""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "..", "recipes"))
from mini_loop import POLITE_CLOSINGS, ends_politely  # noqa: E402

torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained("/tmp/smollm2")
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained("/tmp/smollm2").eval()
with open(os.path.join(HERE, "..", "prompts", "train.jsonl")) as f:
    prompts = [json.loads(line)["prompt"] for line in f][:64]
texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in prompts]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
out = {"prompts": len(prompts), "max_new_tokens": 32, "polite_closings": list(POLITE_CLOSINGS), "by_temperature": []}
for temperature in (1.0, 0.7, 0.5):
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=32, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    finished, polite = 0, 0
    for row in gen.tolist():
        if tok.eos_token_id in row:
            finished += 1
            polite += ends_politely(tok.decode(row[: row.index(tok.eos_token_id)], skip_special_tokens=True))
    out["by_temperature"].append({"temperature": temperature, "finished_share": finished / len(prompts),
                                  "polite_share": polite / len(prompts)})
with open(os.path.join(HERE, "temperature_check.json"), "w") as f:
    json.dump(out, f, indent=2)
print(json.dumps(out, indent=2))

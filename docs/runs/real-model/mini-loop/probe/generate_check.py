"""transformers generate (greedy and temperature 1, no top-k/top-p) on two of the mini loop prompts, rendered through
SmolLM2's chat template: are the incoherent temperature-1 replies of the mini loop the model's or the sampler's?
Output in generate_check.txt."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_rlhf_ext.sampling import per_token_logps

torch.set_num_threads(1)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained("/tmp/smollm2")
tok.padding_side = "left"
m = AutoModelForCausalLM.from_pretrained("/tmp/smollm2").eval()
ps = ["Thanks, my scarf works now. Bye!", "Great, the new frying pan arrived. That is all, thanks!"]
texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in ps]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    g = m.generate(**enc, max_new_tokens=20, do_sample=False)
    print("greedy", tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True))
    s = m.generate(**enc, max_new_tokens=20, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    print("T=1 generate", tok.batch_decode(s[:, enc.input_ids.shape[1]:], skip_special_tokens=True))
    comp = g[:, enc.input_ids.shape[1]:]
    ours = per_token_logps(m, enc.input_ids, enc.attention_mask, comp, torch.ones_like(comp))
    print("ours per-token mean logp", ours.mean(1).tolist())

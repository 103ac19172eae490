"""One resolver of π_ref for every caller: which reference a trainer has, and the module that computes log π_ref."""

from __future__ import annotations

import pytest
import torch
from _callbacks_helpers import build_policy, good_reward, grpo_config, prompt_dataset, prompts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return build_policy(str(tmp_path_factory.mktemp("ref") / "policy"))


def _grpo(policy_path, out, peft=False, **cfg):
    from peft import LoraConfig
    from trl import GRPOTrainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM") if peft else None
    return GRPOTrainer(model=policy_path, reward_funcs=[good_reward], args=grpo_config(str(out), **cfg),
                       train_dataset=prompt_dataset(), peft_config=lora)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_trainer_gets_its_cheapest_reference(policy_path, tmp_path):
    from hf_rlhf_ext.reference import ReferencePolicy, resolve_reference
    from hf_rlhf_ext.run.finish import _reference_for_eval

    full = _grpo(policy_path, tmp_path / "full", beta=0.0)
    assert resolve_reference(full) is None and _reference_for_eval(full) is None
    with pytest.raises(ValueError, match="allow_reference_copy=True"):
        ReferencePolicy(full, allow_copy=False, who="test")
    copy = resolve_reference(full, allow_copy=True)
    copy.snapshot()
    with torch.no_grad():
        for p in full.model.parameters():
            p.add_(0.5)  # the policy moves; the copy taken before stays where it was
    ids = torch.tensor([[4, 5, 6]])
    with copy.model(full.model) as ref:
        assert ref is not full.model and not torch.allclose(_logits(ref, ids), _logits(full.model, ids))

    with_beta = _grpo(policy_path, tmp_path / "beta", beta=0.1)
    assert _reference_for_eval(with_beta).kind == "trainer_ref_model"
    with _reference_for_eval(with_beta).model(with_beta.model) as ref:
        assert ref is with_beta.ref_model

    lora = _grpo(policy_path, tmp_path / "lora", peft=True, beta=0.1)  # TRL makes no ref_model for a PEFT policy
    reference = _reference_for_eval(lora)
    assert reference.kind == "peft_adapter_disabled"
    policy = lora.accelerator.unwrap_model(lora.model)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)  # the adapter now changes the output
    with reference.model(policy) as ref:
        base = _logits(ref, ids)
    assert not torch.allclose(base, _logits(policy, ids))  # the adapter is back on afterwards
    with policy.disable_adapter():
        torch.testing.assert_close(base, _logits(policy, ids))


def test_reference_model_takes_a_module_or_the_adapter_switch(policy_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_rlhf_ext.reference import reference_model

    base = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(policy_path),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)).eval()
    ids = torch.tensor([[4, 5, 6, 7]])
    with reference_model(policy, "disable_adapter") as ref:
        torch.testing.assert_close(_logits(ref, ids), _logits(base, ids))
    assert not torch.allclose(_logits(policy, ids), _logits(base, ids))
    with reference_model(policy, base) as ref:
        assert ref is base
    with pytest.raises(ValueError, match="disable_adapter"):
        with reference_model(policy, "adapter_off"):
            pass
    with pytest.raises(ValueError, match="needs a PEFT policy"):
        with reference_model(base, "disable_adapter"):
            pass


def test_evaluation_kl_to_the_adapter_disabled_reference(policy_path, tmp_path):
    """The recipes' held-out KL uses the same resolver: ≈ 0 for a fresh LoRA policy (its adapter starts at zero),
    positive once the adapter moved."""
    from hf_rlhf_ext.run.finish import _reference_for_eval, evaluate_policy

    lora = _grpo(policy_path, tmp_path / "lora", peft=True)
    policy = lora.accelerator.unwrap_model(lora.model)
    tok = lora.processing_class
    args = dict(reward_funcs={"good": good_reward}, max_new_tokens=8, reference=_reference_for_eval(lora), seed=1)
    start = evaluate_policy(policy, tok, prompts(8), **args)
    assert abs(start["kl_to_reference"]) < 1e-5 and abs(start["kl_k3_to_reference"]) < 1e-6
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    moved = evaluate_policy(policy, tok, prompts(8), **args)
    assert moved["kl_k3_to_reference"] > 1e-3

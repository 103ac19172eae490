"""The critic: zero-initialised per-token head, save/load round trips (full and LoRA), weight sharing, in-place load."""

from __future__ import annotations

import os

import pytest
import torch
from _ppo_helpers import build_world

from hf_rlhf_ext.trainers.value_model import HEAD_WEIGHTS, ValueModel, share_weights_copy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("vm_world")))


def _ids(n=3, length=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, length), generator=g)


def test_fresh_critic_predicts_zero_and_slices_completion_positions(world):
    critic = ValueModel.from_backbone_path(world["reward"])
    ids = _ids()
    values = critic(ids, torch.ones_like(ids))
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert torch.count_nonzero(values) == 0  # zero head: V ≡ 0 before training
    with torch.no_grad():
        critic.value_head.weight.normal_()
    full = critic(ids, torch.ones_like(ids))
    tail = critic(ids, torch.ones_like(ids), completion_length=3)
    # V(s_t) for completion token t is read at the position that predicts it: positions L-4 .. L-2
    torch.testing.assert_close(tail, full[:, -4:-1])


def test_save_and_from_pretrained_round_trip(world, tmp_path):
    torch.manual_seed(0)
    critic = ValueModel.from_backbone_path(world["policy"])
    with torch.no_grad():
        critic.value_head.weight.normal_()
        critic.value_head.bias.fill_(0.3)
        next(critic.backbone.parameters()).add_(0.01)
    critic.save_pretrained(str(tmp_path / "vm"))
    assert os.path.isfile(tmp_path / "vm" / HEAD_WEIGHTS)
    assert any(f.endswith(".safetensors") and f != HEAD_WEIGHTS for f in os.listdir(tmp_path / "vm"))
    loaded = ValueModel.from_pretrained(str(tmp_path / "vm"))
    ids = _ids()
    torch.testing.assert_close(loaded(ids), critic(ids))


def test_from_model_copies_and_share_weights_copy_shares(world):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(world["policy"])
    copied = ValueModel.from_model(policy)
    shared = ValueModel.from_model(policy, share_weights=True)
    p_policy = policy.transformer.wte.weight
    assert copied.backbone.wte.weight.data_ptr() != p_policy.data_ptr()
    assert shared.backbone.wte.weight is p_policy  # same tensor: stored once
    assert shared.backbone is not policy.transformer  # but separate modules (adapters can differ)
    body = share_weights_copy(policy.transformer)
    assert all(a is b for a, b in zip(body.parameters(), policy.transformer.parameters()))


def test_load_weights_from_keeps_parameter_identity(world, tmp_path):
    """Resuming loads in place: an optimizer holding the critic's parameters must still hold the live ones."""
    source = ValueModel.from_backbone_path(world["policy"])
    with torch.no_grad():
        source.value_head.weight.normal_()
        for p in source.backbone.parameters():
            p.add_(0.05)
    source.save_pretrained(str(tmp_path / "vm"))
    target = ValueModel.from_backbone_path(world["policy"])
    before = [id(p) for p in target.parameters()]
    target.load_weights_from(str(tmp_path / "vm"))
    assert [id(p) for p in target.parameters()] == before
    ids = _ids()
    torch.testing.assert_close(target(ids), source(ids))


def test_lora_critic_round_trip(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    backbone = get_peft_model(AutoModel.from_pretrained(world["policy"]),
                              LoraConfig(r=4, target_modules=["c_attn"], task_type="FEATURE_EXTRACTION"))
    critic = ValueModel(backbone)
    with torch.no_grad():
        critic.value_head.weight.normal_()
        for n, p in critic.named_parameters():
            if "lora_B" in n:
                p.normal_()
    critic.save_pretrained(str(tmp_path / "lora_vm"))
    # only the adapter is written, in a sub-folder the Trainer's PEFT resume does not mistake for a policy adapter
    assert not os.path.isfile(tmp_path / "lora_vm" / "adapter_model.safetensors")
    loaded = ValueModel.from_pretrained(str(tmp_path / "lora_vm"), base_model_name_or_path=world["policy"])
    ids = _ids()
    torch.testing.assert_close(loaded(ids), critic(ids))
    fresh = ValueModel(get_peft_model(AutoModel.from_pretrained(world["policy"]),
                                      LoraConfig(r=4, target_modules=["c_attn"], task_type="FEATURE_EXTRACTION")))
    fresh.load_weights_from(str(tmp_path / "lora_vm"))
    torch.testing.assert_close(fresh(ids), critic(ids))


def test_from_pretrained_rejects_other_directories(world):
    with pytest.raises(FileNotFoundError, match="value_head"):
        ValueModel.from_pretrained(world["policy"])

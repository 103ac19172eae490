"""Reward-model helpers: scoring, held-out report against labels and gold, training through trl.RewardTrainer,
and clear errors for bad preference data."""

import pytest
import torch
from datasets import Dataset

from hf_rlhf_ext.lab.tokenizer import build_tokenizer
from hf_rlhf_ext.reward_modeling import pairwise_report, train_reward_model
from hf_rlhf_ext.scoring import score_texts, score_token_ids
from hf_rlhf_ext.validation import DataValidationError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class CountingRM(torch.nn.Module):
    """A transparent 'reward model': reward = number of `good` tokens minus number of `bad` tokens (pads ignored)."""

    def __init__(self, good: int, bad: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.good, self.bad = good, bad

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        r = ((input_ids == self.good) & (mask == 1)).sum(-1) - ((input_ids == self.bad) & (mask == 1)).sum(-1)
        return type("Out", (), {"logits": r.float().unsqueeze(-1) + self.dummy})()


@pytest.fixture(scope="module")
def counting_rm(tokenizer):
    vocab = tokenizer.get_vocab()
    return CountingRM(good=vocab["thank"], bad=vocab["whatever"])


def test_score_texts_batches_and_padding(tokenizer, counting_rm):
    texts = ["thank you thank you", "whatever .", "ok ."] * 5
    scores = score_texts(counting_rm, tokenizer, texts, batch_size=4)
    assert scores.shape == (15,)
    assert scores[:3].tolist() == [2.0, -1.0, 0.0]
    assert torch.equal(scores, score_texts(counting_rm, tokenizer, texts, batch_size=64))
    with pytest.raises(TypeError):
        score_texts(counting_rm, tokenizer, "a single string")


def test_pairwise_report_against_hand_computed_values(tokenizer, counting_rm):
    ds = Dataset.from_dict(
        {
            "prompt": ["customer : hi agent :"] * 4,
            "chosen": [" thank you .", " ok .", " whatever .", " thank you thank you ."],
            "rejected": [" whatever .", " thank you .", " ok .", " ok ."],
            "chosen_gold": [1.0, 0.0, 0.5, 1.0],
            "rejected_gold": [0.0, 1.0, 0.45, 0.0],
        }
    )
    rep = pairwise_report(counting_rm, tokenizer, ds, gold_margin=0.5)
    # rewards: chosen [1, 0, -1, 2], rejected [-1, 1, 0, 0]
    assert rep["accuracy"] == pytest.approx(2 / 4)
    assert rep["mean_margin"] == pytest.approx((2 - 1 - 1 + 2) / 4)
    assert rep["std_margin"] == pytest.approx(torch.tensor([2.0, -1.0, -1.0, 2.0]).std().item())
    # pair 3 is not clearly separated (|0.5 - 0.45| < 0.5); pair 2 is, with gold preferring the *rejected* reply,
    # which the RM also scores higher -> the RM agrees with gold on all 3 separated pairs
    assert rep["n_gold_pairs"] == 3
    assert rep["gold_accuracy"] == pytest.approx(1.0)
    assert rep["label_gold_agreement"] == pytest.approx(2 / 3)
    assert rep["corr_gold"] > 0.5


def test_pairwise_report_prefers_pretokenised_ids(tokenizer, counting_rm):
    vocab = tokenizer.get_vocab()
    ds = Dataset.from_dict(
        {
            "chosen": [" whatever ."],  # text says bad, ids say good: the ids are what the RM is shown
            "rejected": [" thank you ."],
            "chosen_ids": [[vocab["thank"], vocab["you"]]],
            "rejected_ids": [[vocab["whatever"]]],
        }
    )
    assert pairwise_report(counting_rm, tokenizer, ds)["accuracy"] == 1.0


def test_score_token_ids_rejects_empty_sequence(counting_rm):
    with pytest.raises(ValueError):
        score_token_ids(counting_rm, [[4, 5], []], pad_token_id=0)


def _tiny_rm(tokenizer, seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    return GPT2ForSequenceClassification(cfg)


def _args(tmp_path, **kw):
    from trl import RewardConfig

    defaults = dict(
        output_dir=str(tmp_path / "rm"), per_device_train_batch_size=16, num_train_epochs=4, learning_rate=1e-2,
        max_length=32, report_to="none", bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no",
        logging_steps=5, disable_tqdm=True, seed=0,
    )  # fmt: skip
    defaults.update(kw)
    return RewardConfig(**defaults)


def test_train_reward_model_learns_a_separable_preference(tokenizer, tmp_path):
    import random

    rng = random.Random(0)
    items = ["kettle", "laptop", "phone", "lamp"]
    rows = []
    for _ in range(96):
        item = rng.choice(items)
        rows.append(
            {
                "prompt": f"customer : my {item} is broken agent :",
                "chosen": f" we will repair your {item} . thank you .",
                "rejected": f" we will repair your {item} . whatever .",
            }
        )
    ds = Dataset.from_list(rows)
    before = pairwise_report(_tiny_rm(tokenizer), tokenizer, ds)
    trainer = train_reward_model(_tiny_rm(tokenizer), tokenizer, ds, None, _args(tmp_path))
    after = pairwise_report(trainer.model, tokenizer, ds)
    assert after["accuracy"] == 1.0
    assert after["mean_margin"] > 1.0
    assert abs(before["mean_margin"]) < 0.5  # the margin comes from training, not from the initialisation


def test_bad_preference_data_raises_clear_errors(tokenizer, tmp_path):
    model = _tiny_rm(tokenizer)
    no_columns = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    with pytest.raises(DataValidationError, match="chosen"):
        train_reward_model(model, tokenizer, no_columns, None, _args(tmp_path))
    empty = Dataset.from_dict({"chosen": [], "rejected": []})
    with pytest.raises(DataValidationError, match="empty"):
        train_reward_model(model, tokenizer, empty, None, _args(tmp_path))
    with pytest.raises(DataValidationError, match="empty"):
        pairwise_report(model, tokenizer, empty)
    too_long = Dataset.from_dict({"chosen": [" thank you ." * 20], "rejected": [" ok ."]})
    with pytest.raises(DataValidationError, match="max_length"):
        train_reward_model(model, tokenizer, too_long, None, _args(tmp_path))
    from transformers import GPT2Config, GPT2ForSequenceClassification

    two_labels = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=2))
    ok = Dataset.from_dict({"chosen": [" a"], "rejected": [" b"]})
    with pytest.raises(ValueError, match="num_labels"):
        train_reward_model(two_labels, tokenizer, ok, None, _args(tmp_path))

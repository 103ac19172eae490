"""Bad input gets a clear error naming the problem."""

import math

import pytest
from datasets import Dataset, DatasetDict

from hf_rlhf_ext.validation import (
    DataValidationError,
    check_rewards,
    require_preference_columns,
    require_prompt_column,
    validated_reward_func,
)


def test_preferences_without_chosen_rejected():
    ds = DatasetDict(train=Dataset.from_dict({"prompt": ["a"], "better": ["b"]}))
    with pytest.raises(DataValidationError, match=r"preference pairs.*'train'.*\['chosen', 'rejected'\]"):
        require_preference_columns(ds)


def test_prompts_without_prompt_column():
    with pytest.raises(DataValidationError, match="prompts.*no column.*'prompt'"):
        require_prompt_column(Dataset.from_dict({"text": ["a"]}))


def test_empty_dataset():
    empty = Dataset.from_dict({"prompt": []})
    with pytest.raises(DataValidationError, match="empty"):
        require_prompt_column(DatasetDict(test=empty))


def test_valid_data_passes():
    require_preference_columns(Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}))
    require_prompt_column(DatasetDict(train=Dataset.from_dict({"prompt": ["a"]})))


@pytest.mark.parametrize(
    "rewards, message",
    [([1.0, math.nan], "nan at index 1"), ([1.0], "returned 1 values for 2"), ([1.0, "x"], "non-number"),
     (None, "not a list"), ([math.inf, 0.0], "inf at index 0")],
)
def test_bad_reward_outputs(rewards, message):
    with pytest.raises(DataValidationError, match=message):
        check_rewards(rewards, 2, "f")


def test_validated_reward_func_keeps_name_and_checks():
    def my_reward(prompts, completions, **kwargs):
        return [float(len(c)) if c != "bad" else math.nan for c in completions]

    wrapped = validated_reward_func(my_reward)
    assert wrapped.__name__ == "my_reward"
    assert wrapped(prompts=["p", "p"], completions=["ab", "c"]) == [2.0, 1.0]
    assert check_rewards([None, 1], 2, "f") == [None, 1]  # None = "no opinion", as TRL allows
    with pytest.raises(DataValidationError, match="'my_reward' returned nan"):
        wrapped(prompts=["p"], completions=["bad"])

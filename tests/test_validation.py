"""Bad input gets a clear error naming the problem."""

import math

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rlhf_ext.validation import (
    ConfigValidationError,
    DataValidationError,
    InputError,
    check_prompt_lengths,
    check_prompt_rows,
    check_rewards,
    require_existing_path,
    require_preference_columns,
    require_prompt_column,
    validate_grpo_args,
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


def test_valid_data_passes_and_the_same_data_one_column_short_does_not():
    """The checks accept exactly what they name: the same rows pass with the column and fail without it."""
    pairs = Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]})
    assert require_preference_columns(pairs) is None
    with pytest.raises(DataValidationError, match="rejected"):
        require_preference_columns(pairs.remove_columns("rejected"))
    prompts = DatasetDict(train=Dataset.from_dict({"prompt": ["a"], "x": [1]}))
    assert require_prompt_column(prompts) is None
    with pytest.raises(DataValidationError, match="'prompt'"):
        require_prompt_column(prompts.rename_column("prompt", "text"))


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


# ----------------------------------------------------------------------------------------------------------------------
# Data sets: columns, emptiness, rows (one property-based test over random malformed data)
# ----------------------------------------------------------------------------------------------------------------------
def test_missing_prompt_column_names_the_split_the_columns_there_and_a_fix():
    data = DatasetDict(train=Dataset.from_dict({"question": ["a"], "answer": ["b"]}))
    with pytest.raises(DataValidationError, match=r"split 'train'.*has \['question', 'answer'\].*rename_column"):
        check_prompt_rows(data)


def test_a_single_dataset_is_not_called_split_dataset():
    with pytest.raises(DataValidationError) as info:
        require_prompt_column(Dataset.from_dict({"text": ["a"]}))
    assert "split" not in str(info.value)


GOOD_TEXT = st.text(min_size=1, max_size=12).filter(lambda t: t.strip())
BAD_TEXT = st.sampled_from(["", " ", "\n\t"]) | st.none()
GOOD_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": GOOD_TEXT}),
                         min_size=1, max_size=3)
BAD_MESSAGES = st.just([]) | st.lists(st.fixed_dictionaries({"role": st.none(), "content": GOOD_TEXT}), min_size=1,
                                      max_size=2)


@st.composite
def prompt_tables(draw):
    """(column name, rows, index of the first malformed row or None): plain-text or conversational prompts."""
    conversational = draw(st.booleans())
    good, bad = (GOOD_MESSAGES, BAD_MESSAGES) if conversational else (GOOD_TEXT, BAD_TEXT)
    tagged = draw(st.lists(st.tuples(st.just(True), good) | st.tuples(st.just(False), bad), max_size=8))
    column = draw(st.sampled_from(["prompt", "prompt", "prompt", "question", "Prompt"]))
    first_bad = next((i for i, (ok, _) in enumerate(tagged) if not ok), None)
    return column, [row for _, row in tagged], first_bad


@settings(max_examples=60, deadline=None)
@given(prompt_tables())
def test_prompt_validation_over_random_malformed_rows(table):
    column, rows, first_bad = table
    data = Dataset.from_dict({column: rows}) if rows else Dataset.from_dict({column: []})
    if column != "prompt":
        with pytest.raises(DataValidationError, match=rf"no column\(s\) \['prompt'\].*has \['{column}'\]"):
            check_prompt_rows(data, "train")
    elif not rows:
        with pytest.raises(DataValidationError, match="empty"):
            check_prompt_rows(data, "train")
    elif first_bad is not None:
        with pytest.raises(DataValidationError, match=rf"split 'train'\): row {first_bad}'s 'prompt'"):
            check_prompt_rows(data, "train")
    else:
        check_prompt_rows(data, "train")


@pytest.mark.parametrize("ext, text", [("json", '[{"prompt": "a"}, {"prompt": "b"}]'),
                                       ("jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n'), ("csv", "prompt\na\nb\n")])
def test_a_single_data_file_loads(tmp_path, ext, text):
    from hf_rlhf_ext.data import load_dataset_dict

    path = tmp_path / f"prompts.{ext}"
    path.write_text(text)
    data = load_dataset_dict(str(path))
    assert list(data) == ["train"] and data["train"]["prompt"] == ["a", "b"]


def test_prompts_longer_than_the_context_are_refused_with_the_row_and_the_lengths():
    from _ppo_helpers import build_tokenizer

    data = Dataset.from_dict({"prompt": ["good bad", "the kettle is broken please help my order"]})
    with pytest.raises(DataValidationError, match=r"1 prompt\(s\) do not fit the model's context of 10 tokens with "
                                                  r"max_completion_length=4 \(the longest, row 1, has 8 tokens\)"):
        check_prompt_lengths(data, build_tokenizer(), 10, 4, "train")
    check_prompt_lengths(data, build_tokenizer(), 12, 4, "train")  # 8 + 4 fits


# ----------------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/nonexistent", "./no/such/model", "data/prompts.jsonl", "a/b/c"])
def test_a_local_path_that_does_not_exist_is_named(name):
    with pytest.raises(InputError, match=f"--model_name_or_path '{name}': no such file or directory"):
        require_existing_path(name, "--model_name_or_path", "model directory")


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "trl-lib/tldr"])
def test_hub_ids_are_left_to_the_hub(name, tmp_path, monkeypatch):
    """A Hub id passes (the Hub says whether it exists); the same name written as a local path is checked."""
    monkeypatch.chdir(tmp_path)
    assert require_existing_path(name, "--model_name_or_path", "model directory") is None
    with pytest.raises(InputError, match="no such file or directory"):
        require_existing_path(f"./{name}", "--model_name_or_path", "model directory")


def test_a_lab_dir_in_a_folder_that_does_not_exist_is_refused_before_anything_is_written(tmp_path):
    from hf_rlhf_ext.run.build import load_lab
    from hf_rlhf_ext.run.spec import RLScriptArguments

    with pytest.raises(InputError, match=r"--lab_dir .*typo/lab.*its folder .*typo' does not exist"):
        load_lab(RLScriptArguments(lab_dir=str(tmp_path / "typo" / "lab")))
    assert not (tmp_path / "typo").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Training settings, for every trainer
# ----------------------------------------------------------------------------------------------------------------------
def _grpo(**kw):
    from trl import GRPOConfig

    kw = {"per_device_train_batch_size": 4, "num_generations": 2, **kw}
    return GRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", **kw)


def _ppo(**kw):
    from hf_rlhf_ext.trainers.ppo_config import PPOConfig

    kw = {"per_device_train_batch_size": 4, **kw}
    return PPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)


def _reinforce(**kw):
    from hf_rlhf_ext.trainers.reinforce import ReinforceConfig

    kw = {"per_device_train_batch_size": 4, "num_generations": 2, **kw}
    return ReinforceConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [(_grpo, dict(beta=-1.0), r"beta \(the KL coefficient β\) must be a finite number >= 0, got -1"),
     (_reinforce, dict(beta=-0.5), r"beta \(the KL coefficient β\) must be a finite number >= 0"),
     (_grpo, dict(max_completion_length=0), "max_completion_length must be >= 1"),
     (_ppo, dict(max_completion_length=0), "max_completion_length must be >= 1"),
     (_reinforce, dict(max_completion_length=-3), "max_completion_length must be >= 1"),
     (_grpo, dict(epsilon=0.0), r"epsilon \(the ratio clip ε\) must be > 0"),
     (_ppo, dict(cliprange=0.0), r"cliprange \(the ratio clip ε\) must be > 0"),
     (_grpo, dict(temperature=0.0), "temperature must be > 0")],
)
def test_settings_out_of_range_are_named(make, kwargs, message):
    with pytest.raises(ConfigValidationError, match=message):
        validate_grpo_args(make(**kwargs))


@pytest.mark.parametrize(
    "make, kwargs, message",
    [(_ppo, dict(kl_coef=-1.0), "kl_coef must be >= 0"), (_ppo, dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
     (_ppo, dict(lam=-0.1), r"lam must be in \[0, 1\]"),
     (_grpo, dict(per_device_train_batch_size=3), r"generation_batch_size \(3\) must be divisible by num_generations"),
     (_ppo, dict(nan_rewards="ignore"), "nan_rewards must be one of"),
     (_reinforce, dict(num_generations=1, baseline="group"), "'group' baseline needs num_generations >= 2")],
)
def test_configs_refuse_bad_settings_when_built(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_reinforce_running_mean_accepts_one_completion_per_prompt():
    args = _reinforce(num_generations=1, baseline="running_mean")
    assert args.num_generations == 1 and args.generation_batch_size == 4
    validate_grpo_args(args)


def test_reinforce_running_mean_trains_with_one_completion_per_prompt(tmp_path):
    from _reinforce_helpers import build_tiny_model, prompt_dataset, target_word_reward, tiny_args

    from hf_rlhf_ext.trainers.reinforce import ReinforceConfig, ReinforceTrainer

    args = tiny_args(str(tmp_path / "out"), ReinforceConfig, num_generations=1, per_device_train_batch_size=4,
                     max_steps=1, baseline="running_mean")
    trainer = ReinforceTrainer(build_tiny_model(str(tmp_path / "model")), reward_funcs=[target_word_reward()],
                               args=args, train_dataset=prompt_dataset(8))
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.running_baseline.num_updates == 1


def test_best_of_n_refuses_n_below_one():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "best_of_n.py"
    spec = importlib.util.spec_from_file_location("recipe_best_of_n_validation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="--n must be >= 1, got 0"):
        module.BestOfNScriptArguments(n=0)


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions and reward models
# ----------------------------------------------------------------------------------------------------------------------
def test_a_reward_module_that_cannot_be_imported_is_named():
    from hf_rlhf_ext.rewards import import_reward_func

    with pytest.raises(InputError, match="cannot import module 'no_such_rewards_module'"):
        import_reward_func("no_such_rewards_module.length")


def test_a_missing_reward_attribute_is_named_with_what_the_module_has():
    from hf_rlhf_ext.rewards import import_reward_func

    with pytest.raises(InputError, match=r"module '_ppo_helpers' .* has no attribute 'nope'.*'target_word'"):
        import_reward_func("_ppo_helpers.nope")


def test_reward_funcs_import_only_the_named_module_and_leave_the_path_as_it_was(tmp_path, monkeypatch):
    import sys

    from hf_rlhf_ext.rewards import import_reward_func

    (tmp_path / "my_cwd_rewards.py").write_text("def length(prompts, completions, **kw):\n"
                                                "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    func = import_reward_func("my_cwd_rewards.length")
    assert func(prompts=["p"], completions=["abc"]) == [3.0]
    assert sys.path == path_before  # the working directory was importable during that import only
    assert sys.modules["my_cwd_rewards"].__file__ == str(tmp_path / "my_cwd_rewards.py")


def test_a_reward_model_without_any_pad_token_is_refused_with_the_fix():
    from _ppo_helpers import build_tokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_rlhf_ext.rewards import RewardModelFunction

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1,
                                                     n_head=2, num_labels=1, pad_token_id=None))
    with pytest.raises(DataValidationError, match=r"'rm': neither its tokenizer nor its config has a pad token.*"
                                                  r"tokenizer.pad_token = tokenizer.eos_token"):
        RewardModelFunction(model, tokenizer=tokenizer, name="rm")


def test_a_reward_model_pads_with_the_id_its_config_uses():
    from _ppo_helpers import build_tokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_rlhf_ext.rewards import RewardModelFunction

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1,
                                                     n_head=2, num_labels=1, pad_token_id=2))
    rm = RewardModelFunction(model, tokenizer=tokenizer, name="rm")
    assert rm.pad_token_id == 2
    together = rm(prompts=["good", "the kettle is"], completions=["bad", "broken please"])
    alone = [rm(prompts=[p], completions=[c])[0] for p, c in (("good", "bad"), ("the kettle is", "broken please"))]
    assert together == pytest.approx(alone, abs=1e-5)  # padding does not change a row's score


# ----------------------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------------------
def test_nothing_of_ours_unpickles_a_file_or_trusts_remote_code_by_default():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offending = []
    for path in [*(root / "hf_rlhf_ext").rglob("*.py"), *(root / "recipes").glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            unsafe_load = "torch.load(" in code and "weights_only=True" not in code
            unpickles = re.search(r"import (pickle|dill|joblib)|pickle\.loads?\(", code)
            if unsafe_load or unpickles or re.search(r"trust_remote_code\s*=\s*True", code):
                offending.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offending == []


def test_recipes_leave_trust_remote_code_off_unless_asked():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "grpo.py"
    spec = importlib.util.spec_from_file_location("recipe_grpo_trust", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, args, _ = module.make_parser().parse_args_and_config(args=["--output_dir", "/tmp/unused"])
    assert args.trust_remote_code is False
    _, args, _ = module.make_parser().parse_args_and_config(args=["--output_dir", "/tmp/unused",
                                                                   "--trust_remote_code", "true"])
    assert args.trust_remote_code is True

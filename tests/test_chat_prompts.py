"""Plain-text prompts meet a chat model through its chat template (hf_rlhf_ext.sampling.as_chat_prompts), in the
recipes' prompt loading and in the mini loop; the lab's prompts, already in the lab template's format, stay as they
are."""

from __future__ import annotations

import json

import pytest
from _ppo_helpers import build_tiny_llama, build_tokenizer, prompts
from _recipe_helpers import load_recipe, record_sampled_prompt_ids

from hf_rlhf_ext.run.build import chat_prompt_dataset
from hf_rlhf_ext.sampling import as_chat_prompts, encode_prompts

PLAIN = "customer : my kettle is late agent :"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_plain_prompt_becomes_one_user_turn_under_a_chat_template():
    tokenizer = build_tokenizer()  # template: "user : ... assistant : "
    assert as_chat_prompts(tokenizer, [PLAIN, _user("hi")]) == [_user(PLAIN), _user("hi")]
    ids = encode_prompts(tokenizer, as_chat_prompts(tokenizer, [PLAIN]))[0]
    assert tokenizer.decode(ids) == f"user : {PLAIN} assistant :"  # rendered with the generation prompt


def test_prompts_stay_as_they_are_without_a_template_or_already_in_its_format():
    tokenizer = build_tokenizer()
    rendered = ["user : my order is late assistant :"]
    assert as_chat_prompts(tokenizer, rendered) == rendered
    tokenizer.chat_template = None
    assert as_chat_prompts(tokenizer, [PLAIN]) == [PLAIN]


def test_the_lab_prompts_are_already_in_the_lab_template_format(lab):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lab.policy_path)
    assert tokenizer.chat_template  # the lab has a template: its prompts must not be wrapped a second time
    lab_prompts = list(lab.load_prompts()["test"]["prompt"])
    assert as_chat_prompts(tokenizer, lab_prompts) == lab_prompts


def test_the_recipes_prompt_column_becomes_conversational():
    data = prompts(4)
    converted = chat_prompt_dataset(data, build_tokenizer())
    assert list(converted["prompt"]) == [_user(p) for p in data["prompt"]]
    split = data.train_test_split(test_size=1, seed=0)["train"]  # an indices mapping, a single column
    assert len(chat_prompt_dataset(split, build_tokenizer())["prompt"]) == 3
    plain = build_tokenizer()
    plain.chat_template = None
    assert chat_prompt_dataset(data, plain) is data


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_llama")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(8)["prompt"]))
    return {"model": build_tiny_llama(str(root / "llama")), "data": str(data)}


def test_mini_loop_renders_plain_prompts_through_the_chat_template(llama_world, tmp_path, monkeypatch):
    recipe = load_recipe("mini_loop")
    seen = record_sampled_prompt_ids(recipe, monkeypatch)
    metrics = recipe.main(recipe.MiniLoopArguments(
        model_name_or_path=llama_world["model"], dataset_name=llama_world["data"], output_dir=str(tmp_path), steps=1,
        batch_size=4, max_new_tokens=4, num_eval_prompts=2))
    assert metrics["on_lab"] is False
    tokenizer = recipe.load_tokenizer(llama_world["model"])
    texts = [t.replace(tokenizer.pad_token, "").strip() for t in tokenizer.batch_decode(seen[0])]
    assert texts and all(t.startswith("user : customer :") and t.endswith("agent : assistant :") for t in texts)
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert all(r["prompt"][0]["role"] == "user" for r in rows)


def test_mini_loop_is_on_the_lab_only_with_the_lab_policy_and_prompts():
    recipe = load_recipe("mini_loop")
    assert recipe.on_lab(recipe.MiniLoopArguments()) is True
    assert recipe.on_lab(recipe.MiniLoopArguments(model_name_or_path="my/model")) is False
    assert recipe.on_lab(recipe.MiniLoopArguments(dataset_name="prompts.jsonl")) is False

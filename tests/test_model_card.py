"""Model cards of the recipes' output folders (hf_rlhf_ext.model_card) and the push of such a folder to the Hub.

The recipes run in-process on tiny stand-in models; the Hub is never contacted: ``HfApi.create_repo`` and
``HfApi.upload_folder`` are replaced by fakes that record what would be sent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _recipe_helpers import load_recipe, recipe_world, run_recipe
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl

from hf_rlhf_ext.model_card import RunCard, hub_id_or_none, write_model_card
from hf_rlhf_ext.results import read_metrics

_run = run_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return recipe_world(tmp_path_factory.mktemp("card_world"))


def _argv(tiny, out, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
            "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_completion_length", "6", "--logging_steps", "1",
            "--num_eval_prompts", "4", "--disable_tqdm", "true", *extra]


def _usage_code(card_text: str) -> str:
    """The Python block of the card's Usage section."""
    usage = card_text.split("## Usage", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


def test_full_weight_ppo_folder_has_a_card_with_the_runs_numbers_and_reloads(tiny, tmp_path):
    from hf_rlhf_ext.trainers import ValueModel

    _run("ppo", _argv(tiny, tmp_path, "--kl_coef", "0.07"))
    card = ModelCard.load(tmp_path / "README.md")
    metrics = read_metrics(str(tmp_path))
    assert {"trl", "rlhf", "ppo", "hf-rlhf-ext"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None and card.data.datasets is None  # local model and data: no Hub ids
    assert "| kl_coef | 0.07 |" in card.text and "| lam | 0.95 |" in card.text
    after = metrics["eval_after"]
    assert f"| {after['target_word']:.4g} |" in card.text
    assert f"| {after['kl_k3_to_reference']:.4g} |" in card.text  # the headline KL is k3
    assert "--kl_coef 0.07" in card.text  # the command that made the folder
    assert "![" in card.text and "(training_curves.png)" in card.text
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    namespace: dict = {}
    exec(_usage_code(card.text), namespace)  # the card's own usage snippet loads the policy and the critic
    assert type(namespace["model"]).__name__ == "GPT2LMHeadModel" and isinstance(namespace["critic"], ValueModel)


def test_the_card_says_where_the_settings_came_from_and_the_lora_rule(tiny, tmp_path):
    _run("grpo", _argv(tiny, tmp_path, "--use_peft", "--lora_r", "4", "--num_generations", "2"))
    text = (tmp_path / "README.md").read_text()
    assert "off the lab: grpo_lab.yaml NOT applied (TRL's defaults)" in text
    assert "LoRA: learning_rate 1e-05 = 10 × 1e-06" in text and "| learning_rate | 1e-05 |" in text


def test_lora_card_is_ours_not_peft_template_and_the_adapter_reloads(tiny, tmp_path):
    from hf_rlhf_ext.trainers import ValueModel

    _run("ppo", _argv(tiny, tmp_path, "--use_peft", "--lora_r", "4", "--critic_shares_base", "true"))
    text = (tmp_path / "README.md").read_text()
    card = ModelCard.load(tmp_path / "README.md")
    assert "More Information Needed" not in text and tiny["policy"] not in card.data.to_yaml()
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "| lora_r | 4 |" in text
    namespace: dict = {}
    exec(_usage_code(card.text), namespace)
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"
    assert isinstance(namespace["critic"], ValueModel) and namespace["critic"].is_peft  # the LoRA critic


@pytest.mark.parametrize("recipe,tag,setting", [("grpo", "grpo", "| num_generations | 2 |"),
                                                ("reinforce", "reinforce", "| baseline | running_mean |")])
def test_grpo_and_reinforce_cards_name_their_method(tiny, tmp_path, recipe, tag, setting):
    _run(recipe, _argv(tiny, tmp_path, "--num_generations", "2"))
    card = ModelCard.load(tmp_path / "README.md")
    assert tag in card.data.tags and setting in card.text


@pytest.fixture
def fake_hub(monkeypatch):
    """Records create_repo / upload_folder calls, and the folder's files and card at upload time."""
    sent: dict = {"repos": [], "uploads": []}

    def create_repo(self, repo_id, **kwargs):
        sent["repos"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent["uploads"].append({"repo_id": repo_id, "files": files, "ignore_patterns": ignore_patterns,
                                "card": (Path(folder_path) / "README.md").read_text()})
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return sent


def test_push_to_hub_uploads_the_folder_once_with_our_card_the_critic_and_the_plots(tiny, tmp_path, fake_hub):
    _run("ppo", _argv(tiny, tmp_path, "--push_to_hub", "true", "--hub_model_id", "someone/ppo-tiny"))
    assert len(fake_hub["uploads"]) == 1  # save_model's own push (without the critic, with TRL's card) is not made
    upload = fake_hub["uploads"][0]
    assert upload["repo_id"] == "someone/ppo-tiny"
    assert {"README.md", "metrics.json", "training_curves.png", "model.safetensors",
            "value_model/value_head.safetensors"} <= set(upload["files"])
    card = ModelCard(upload["card"])
    assert "hf-rlhf-ext" in card.data.tags and card.data.model_name == "ppo-tiny"
    assert 'from_pretrained("someone/ppo-tiny")' in card.text  # the usage snippet points at the Hub repository
    assert 'ValueModel.from_pretrained(os.path.join(snapshot_download("someone/ppo-tiny"), "value_model"))' in card.text


def test_base_model_and_datasets_are_hub_ids_only(tmp_path):
    assert hub_id_or_none("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_id_or_none(str(tmp_path)) is None and hub_id_or_none("/not/there/either") is None
    card = write_model_card(str(tmp_path), RunCard(
        title="t", summary="s", recipe="recipes/grpo.py", command="c", tags=("grpo",),
        base_model=hub_id_or_none("Qwen/Qwen2.5-0.5B-Instruct"), datasets=["trl-lib/tldr"],
        metrics=[("held-out gold", 0.1, 0.25)], plots={"missing.png": "not drawn"}))
    loaded = ModelCard.load(os.path.join(tmp_path, "README.md"))
    assert loaded.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and loaded.data.datasets == ["trl-lib/tldr"]
    assert "| held-out gold | 0.1 | 0.25 |" in loaded.text
    assert "missing.png" not in card.text  # a plot that is not in the folder is not embedded


def test_reward_model_card_reports_held_out_accuracy_and_reloads(lab, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _run("reward", ["--output_dir", str(tmp_path), "--num_train_epochs", "1", "--disable_tqdm", "true"])
    card = ModelCard.load(tmp_path / "README.md")
    test = read_metrics(str(tmp_path))["test"]
    assert "reward-model" in card.data.tags and card.data.base_model is None
    assert f"| held-out pairwise accuracy (vs the labels) | {test['accuracy']:.4g} |" in card.text
    assert f"{test['gold_accuracy']:.4g}" in card.text and "| lr_scheduler_type | cosine |" in card.text
    assert (tmp_path / "training_curves.png").is_file()
    assert AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).config.num_labels == 1


def test_beta_sweep_folder_has_a_card_with_its_table_and_frontier(tmp_path, monkeypatch):
    from test_sweeps import fake_result

    from hf_rlhf_ext.experiments import sweeps

    monkeypatch.setattr(sweeps, "run_point", lambda argv, beta, seed: fake_result(beta, seed))
    load_recipe("beta_sweep").main(["--output_dir", str(tmp_path), "--betas", "0", "0.05", "0.2", "--seeds", "0"])
    card = ModelCard.load(tmp_path / "README.md")
    assert {"grpo", "beta-sweep", "hf-rlhf-ext"} <= set(card.data.tags) and card.data.library_name is None
    table = (tmp_path / "sweep.md").read_text().strip()
    assert table and table.splitlines()[0] in card.text  # the experiment's own table, as it is
    assert "(frontier.png)" in card.text and "--betas 0 0.05 0.2" in card.text
    assert "| betas | 0.0, 0.05, 0.2 |" in card.text


def test_flag_values_name_the_hub_base_model_of_an_experiment():
    from hf_rlhf_ext.model_card import flag_value

    argv = ["--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset_name=trl-lib/tldr", "--seeds", "0"]
    assert flag_value(argv, "--model_name_or_path") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert flag_value(argv, "--dataset_name") == "trl-lib/tldr" and flag_value(argv, "--use_peft") is None


def test_best_of_n_card_is_the_distilled_adapters_with_the_held_out_table(tiny, tmp_path):
    from peft import AutoPeftModelForCausalLM

    metrics = _run("best_of_n", ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
                                 "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(tmp_path),
                                 "--n", "2", "--pool_size", "2", "--rounds", "1", "--max_new_tokens", "6",
                                 "--num_eval_prompts", "4", "--per_device_train_batch_size", "4",
                                 "--num_train_epochs", "1", "--use_peft", "--lora_r", "4"])
    card = ModelCard.load(tmp_path / "README.md")
    assert {"best-of-n", "distillation"} <= set(card.data.tags) and card.data.library_name == "peft"
    best = metrics["best_of_n"]
    assert f"| best-of-2 (inference) | {best['target_word']:.4g} | {best['kl']:.4g} |" in card.text
    assert "(bon_curve.png)" in card.text and "(distillation.png)" in card.text and "| n | 2 |" in card.text
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))


def test_mini_loop_card_points_at_its_policy_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("mini_loop")
    (args,) = recipe.make_parser().parse_args_and_config(args=[
        "--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"], "--steps", "2", "--batch_size", "8",
        "--max_new_tokens", "6", "--num_eval_prompts", "4", "--output_dir", str(tmp_path)])
    metrics = recipe.main(args)
    card = ModelCard.load(tmp_path / "README.md")
    assert "mini-loop" in card.data.tags and "--steps 2" in card.text
    assert f"| {metrics['kl_k3_after']:.4g} |" in card.text
    assert f'from_pretrained("{tmp_path / "policy"}")' in card.text
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))


def test_best_of_n_push_uploads_the_distilled_folder_with_its_card(tiny, tmp_path, fake_hub):
    _run("best_of_n", ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["data"],
                       "--reward_funcs", "_ppo_helpers.target_word", "--output_dir", str(tmp_path), "--n", "2",
                       "--pool_size", "2", "--rounds", "1", "--max_new_tokens", "6", "--num_eval_prompts", "4",
                       "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
                       "--push_to_hub", "true", "--hub_model_id", "someone/bon-tiny"])
    uploads = fake_hub["uploads"]  # one upload: the SFT rounds push nothing of their own
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "someone/bon-tiny"
    assert {"README.md", "model.safetensors", "bon_curve.png", "distillation.png", "metrics.json"} <= set(
        uploads[0]["files"])
    assert "best-of-n" in ModelCard(uploads[0]["card"]).data.tags


def test_beta_sweep_push_uploads_its_folder_once_and_its_points_never_push(tmp_path, monkeypatch, fake_hub):
    from test_sweeps import fake_result

    from hf_rlhf_ext.experiments import sweeps

    point_args = []

    def prepare(script_args, training_args, model_args):  # run_point's first step: record and stop
        point_args.append(training_args)
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_rlhf_ext.run.build.prepare_rl_run", prepare)
    argv = ["--output_dir", str(tmp_path), "--betas", "0", "0.2", "--seeds", "0", "--push_to_hub", "true",
            "--hub_model_id", "someone/sweep"]
    with pytest.raises(KeyboardInterrupt):
        sweeps.run_point(argv, 0.2, 0)
    assert point_args[0].push_to_hub is False  # a point's Trainer would otherwise create and push a repository
    monkeypatch.setattr(sweeps, "run_point", lambda argv, beta, seed: fake_result(beta, seed))
    load_recipe("beta_sweep").main(argv)
    uploads = fake_hub["uploads"]
    assert fake_hub["repos"] == ["someone/sweep"] and len(uploads) == 1
    assert {"README.md", "sweep.md", "frontier.png", "results.jsonl"} <= set(uploads[0]["files"])
    assert "beta-sweep" in ModelCard(uploads[0]["card"]).data.tags


def test_compare_and_baselines_runs_never_push():
    from hf_rlhf_ext.experiments.baselines import parse_baselines_argv
    from hf_rlhf_ext.experiments.compare import parse_compare_argv

    push = ["--push_to_hub", "true", "--hub_model_id", "someone/x"]
    assert parse_compare_argv(push, "ppo")[1].push_to_hub is True  # the experiment itself pushes
    assert parse_compare_argv(push, "ppo", seed=0)[1].push_to_hub is False  # its runs do not
    assert parse_compare_argv(push, "grpo", seed=1)[1].push_to_hub is False
    assert parse_baselines_argv(push, "none", 0)[1].push_to_hub is False

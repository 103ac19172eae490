"""recipes/reward.py: on the lab by default, on a local "Hub-like" model and data set by flag; metrics.json holds
held-out pairwise accuracy; bad data fails with a clear error before training."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("reward_recipe", ROOT / "recipes" / "reward.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(argv):
    recipe = _recipe()
    return recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))


@pytest.fixture(scope="module")
def local_model_and_data(tmp_path_factory, lab):
    """A reward-model folder and a preference data set as a user would have them: saved by save_pretrained /
    save_to_disk, loaded by path (the same code path as a Hub id)."""
    from datasets import DatasetDict
    from transformers import GPT2Config, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("local")
    tok = lab.load_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    prefs = lab.load_preferences()
    text_only = DatasetDict({k: v.select(range(min(len(v), 200))).select_columns(["prompt", "chosen", "rejected"])
                             for k, v in prefs.items()})
    text_only.save_to_disk(str(root / "prefs"))
    return root


def test_lab_run_learns_and_reports_pairwise_accuracy(tmp_path, lab):
    out = tmp_path / "rm"
    metrics = _run(["--output_dir", str(out), "--lab_dir", lab.root])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    report = on_disk["test"]
    # it learns (chance is 0.5) and the label noise is real (perfect agreement with noisy labels is impossible)
    assert 0.6 <= report["accuracy"] <= 0.85, report
    assert report["gold_accuracy"] >= 0.7, report
    assert report["n_gold_pairs"] > 50
    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 1
    assert (out / "model.safetensors").exists()


def test_local_model_and_dataset_by_path(tmp_path, local_model_and_data):
    out = tmp_path / "rm"
    _run(["--model_name_or_path", str(local_model_and_data / "rm"), "--dataset_name",
          str(local_model_and_data / "prefs"), "--output_dir", str(out), "--num_train_epochs", "1",
          "--learning_rate", "1e-3"])
    report = json.loads((out / "metrics.json").read_text())["test"]
    assert report["n_pairs"] == 200 and report["accuracy"] > 0.55, report  # it learnt from the local pairs
    assert not report.get("gold_accuracy")  # text-only data has no gold columns
    assert json.loads((out / "metrics.json").read_text())["on_lab"] is False


def test_preferences_without_chosen_rejected_fail_clearly(tmp_path, local_model_and_data):
    from datasets import Dataset, DatasetDict

    bad = DatasetDict(train=Dataset.from_dict({"prompt": ["a"], "good": ["b"], "bad": ["c"]}),
                      test=Dataset.from_dict({"prompt": ["a"], "good": ["b"], "bad": ["c"]}))
    bad.save_to_disk(str(tmp_path / "bad"))
    from hf_rlhf_ext.validation import DataValidationError

    with pytest.raises(DataValidationError, match="chosen"):
        _run(["--model_name_or_path", str(local_model_and_data / "rm"), "--dataset_name", str(tmp_path / "bad"),
              "--output_dir", str(tmp_path / "out")])


def test_accelerate_launch_verbatim(tmp_path, lab):
    """The README's form of the command, in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rm"
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu.yaml"),
         str(ROOT / "recipes" / "reward.py"), "--output_dir", str(out), "--lab_dir", lab.root,
         "--num_train_epochs", "1"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out pairwise accuracy" in res.stdout
    assert (out / "metrics.json").exists()

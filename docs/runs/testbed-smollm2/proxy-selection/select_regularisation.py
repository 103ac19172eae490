"""Against the proxy's overfitting: how much dropout (or how few epochs) the SmolLM2 testbed's from-scratch proxy
trains with, chosen on validation pairs, never on the testbed's held-out pairs. As in select_proxy.py, a copy of a
built testbed has its training pairs split by prompt (a fifth of the prompts, drawn with seed 0, give the validation
pairs); each setting is trained on the rest as the build trains its proxy (``train_proxy_like_testbed``, the copy's
testbed.json edited) with 2 seeds and scored on the validation pairs (``pairwise_report``).

    cd docs/runs/testbed-smollm2 && python proxy-selection/select_regularisation.py /tmp/tb-sm-v3 /tmp/tb-val3

Output: proxy-selection/regularisation.json (validation accuracy per setting and seed, their mean, the best)."""

import json
import statistics
import sys
from pathlib import Path

from select_proxy import split_by_prompt

HERE = Path(__file__).resolve().parent
#: (dropout, epochs, learning rate); the first is the graded-v2 proxy's own schedule without dropout
GRID = [(d, 6, 3e-4) for d in (0.0, 0.1, 0.2, 0.4)] + [(0.0, e, 3e-4) for e in (1, 2, 3)]
SEEDS = (0, 1)


def set_regularisation(copy: str, dropout: float, epochs: float, lr: float) -> None:
    path = Path(copy) / "testbed.json"
    saved = json.loads(path.read_text())
    saved["config"] |= {"rm_dropout": dropout, "rm_epochs": epochs, "rm_lr": lr}
    path.write_text(json.dumps(saved, indent=2))


def validation_accuracy(copy: str, seed: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_rlhf_ext.lab.testbed import testbed_config, train_proxy_like_testbed
    from hf_rlhf_ext.reward_modeling import pairwise_report

    prefs = Path(copy) / "preferences"
    train, val = (Dataset.from_list([json.loads(line) for line in (prefs / f"{s}.jsonl").read_text().splitlines()])
                  for s in ("train", "test"))
    out = Path(copy) / "rm_runs" / f"seed{seed}"
    train_proxy_like_testbed(copy, train.select_columns(["chosen_ids", "rejected_ids"]), str(out / "work"), str(out),
                             seed)
    rm, tok = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    return pairwise_report(rm, tok, val, gold_margin=testbed_config(copy).gold_margin)["accuracy"]


def main(testbed: str, copy: str) -> None:
    n_train, n_val = split_by_prompt(testbed, copy)
    rows = []
    for dropout, epochs, lr in GRID:
        set_regularisation(copy, dropout, epochs, lr)
        accs = [validation_accuracy(copy, s) for s in SEEDS]
        rows.append({"rm_dropout": dropout, "rm_epochs": epochs, "rm_lr": lr, "per_seed": accs,
                     "mean": statistics.mean(accs)})
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["mean"])
    out = {"testbed": testbed, "n_train_pairs": n_train, "n_validation_pairs": n_val, "seeds": list(SEEDS),
           "grid": rows, "best": best}
    (HERE / "regularisation.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""How the SmolLM2 testbed's proxy settings were chosen without looking at its held-out pairs: a copy of a built
testbed whose training pairs are split by prompt (a fifth of the prompts, drawn with seed 0, become the validation
pairs and replace its test pairs), then ``recipes/reward.py --lab_dir <copy>`` trains the testbed's proxy
architecture on the rest for each setting and seed and scores it on the validation pairs. The held-out pairs of the
testbed itself are never read.

    cd docs/runs/testbed-smollm2 && python proxy-selection/select_proxy.py /tmp/tb-sm-big /tmp/tb-val

Output: proxy-selection/selection.json (validation accuracy per setting and seed, and their mean)."""

import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REWARD = HERE.parents[3] / "recipes" / "reward.py"
#: (width, layers, epochs, learning rate) of the from-scratch GPT-2 proxy
GRID = [(64, 2, e, lr) for e in (1, 3, 6) for lr in (1e-3, 3e-4)] + \
       [(w, n, e, lr) for w, n in ((128, 2), (32, 1), (64, 1)) for e, lr in ((6, 3e-4), (3, 1e-3))]
SEEDS = (0, 1, 2)


def split_by_prompt(testbed: str, copy: str) -> tuple[int, int]:
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(testbed, copy)
    prefs = Path(copy) / "preferences"
    rows = [json.loads(line) for line in (prefs / "train.jsonl").read_text().splitlines()]
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(0).shuffle(prompts)
    held = set(prompts[: len(prompts) // 5])
    train = [r for r in rows if r["prompt"] not in held]
    val = [r for r in rows if r["prompt"] in held]
    (prefs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (prefs / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    return len(train), len(val)


def set_architecture(copy: str, width: int, layers: int) -> None:
    path = Path(copy) / "testbed.json"
    saved = json.loads(path.read_text())
    saved["config"] |= {"rm_n_embd": width, "rm_n_layer": layers}
    path.write_text(json.dumps(saved))


def validation_accuracy(copy: str, epochs: int, lr: float, seed: int) -> float:
    out = Path(copy) / "rm_runs" / f"{epochs}_{lr}_{seed}"
    subprocess.run([sys.executable, str(REWARD), "--lab_dir", copy, "--output_dir", str(out), "--num_train_epochs",
                    str(epochs), "--learning_rate", str(lr), "--seed", str(seed)], check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


def main(testbed: str, copy: str) -> None:
    n_train, n_val = split_by_prompt(testbed, copy)
    rows = []
    for width, layers, epochs, lr in GRID:
        set_architecture(copy, width, layers)
        accs = [validation_accuracy(copy, epochs, lr, s) for s in SEEDS]
        rows.append({"rm_n_embd": width, "rm_n_layer": layers, "epochs": epochs, "learning_rate": lr,
                     "per_seed": accs, "mean": statistics.mean(accs)})
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["mean"])
    out = {"testbed": testbed, "n_train_pairs": n_train, "n_validation_pairs": n_val, "seeds": list(SEEDS),
           "grid": rows, "best": best}
    (HERE / "selection.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

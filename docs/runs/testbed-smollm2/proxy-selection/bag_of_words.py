"""Whether the testbed's pairs carry more than its proxy learns: a proxy of another kind, a logistic regression on
word-count differences (chosen − rejected, plus length, words shared with the prompt, and whether the reply ends a
sentence) fitted to the training labels, its L2 strength chosen by 5-fold cross-validation on the training pairs
alone, then scored once on the held-out pairs. Beside it the ceiling: gold itself as the proxy (a gold tie counts
half). Not a proxy the testbed offers; numpy only.

    python bag_of_words.py /tmp/tb-sm-v2                          # writes bag_of_words.json here
    python bag_of_words.py /tmp/tb-sm-v3 bag_of_words_v3.json     # another testbed, another file"""

import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STRENGTHS = (0.3, 0.1, 0.03, 0.01, 0.003)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _features(row: dict, side: str, vocab: dict[str, int]) -> np.ndarray:
    v = np.zeros(len(vocab) + 3)
    words, prompt = _words(row[side]), set(_words(row["prompt"]))
    for w in words:
        if w in vocab:
            v[vocab[w]] += 1
    v[-3:] = len(words) / 20, sum(w in prompt for w in words) / 5, row[side].rstrip().endswith((".", "!", "?"))
    return v


def _fit(x: np.ndarray, strength: float, iters: int = 500, lr: float = 0.5) -> np.ndarray:
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ w))
        w -= lr * (-x.T @ (1 - p) / len(x) + strength * w)
    return w


def _pairs(testbed: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (Path(testbed) / "preferences" / f"{split}.jsonl").open()]


def _differences(rows: list[dict], vocab: dict[str, int]) -> np.ndarray:
    return np.array([_features(r, "chosen", vocab) - _features(r, "rejected", vocab) for r in rows])


def main(testbed: str, name: str = "bag_of_words.json") -> None:
    train, test = _pairs(testbed, "train"), _pairs(testbed, "test")
    vocab: dict[str, int] = {}
    for row in train:
        for w in _words(row["chosen"]) + _words(row["rejected"]):
            vocab.setdefault(w, len(vocab))
    x_train, x_test = _differences(train, vocab), _differences(test, vocab)
    fold = np.arange(len(x_train)) % 5
    cv = {s: float(np.mean([((x_train[fold == k] @ _fit(x_train[fold != k], s)) > 0).mean() for k in range(5)]))
          for s in STRENGTHS}
    best = max(cv, key=cv.get)
    test_accuracy = float(((x_test @ _fit(x_train, best)) > 0).mean())
    gold = float(np.mean([(r["chosen_gold"] > r["rejected_gold"]) + 0.5 * (r["chosen_gold"] == r["rejected_gold"])
                          for r in test]))
    out = {"testbed": testbed, "n_train_pairs": len(train), "n_test_pairs": len(test), "cv_accuracy": cv,
           "chosen_strength": best, "test_accuracy": test_accuracy, "gold_as_proxy_test_accuracy": gold}
    (HERE / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])

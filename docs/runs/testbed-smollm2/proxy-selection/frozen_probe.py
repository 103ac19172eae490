"""Whether SmolLM2's own representation, frozen, makes a better proxy than the small RM trained from scratch: the
policy body's final hidden state of each reply (its last token, where a sequence classifier reads; and the mean over
tokens), a logistic regression on the chosen − rejected difference, its L2 strength chosen by 5-fold cross-validation
on the first 640 training pairs, scored once on the held-out pairs. Only forward passes: minutes on 2 cores.

    python frozen_probe.py /tmp/tb-sm-v3        # writes frozen_probe.json here"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

HERE = Path(__file__).resolve().parent
STRENGTHS = (1, 0.3, 0.1, 0.03, 0.01, 0.003)
N_TRAIN = 640


def _rows(root: str, split: str) -> list[dict]:
    return [json.loads(line) for line in Path(root, "preferences", f"{split}.jsonl").read_text().splitlines()]


def _features(model, seqs: list[list[int]], batch: int = 32) -> dict[str, np.ndarray]:
    last, mean = [], []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last.append(h[torch.arange(len(chunk)), mask.sum(1) - 1].numpy())
        mean.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
    return {"last_token": np.concatenate(last), "mean": np.concatenate(mean)}


def _differences(model, rows: list[dict]) -> dict[str, np.ndarray]:
    chosen, rejected = (_features(model, [r[f"{side}_ids"] for r in rows]) for side in ("chosen", "rejected"))
    return {k: chosen[k] - rejected[k] for k in chosen}


def _fit(x: np.ndarray, strength: float, iters: int = 2000, lr: float = 0.5) -> np.ndarray:
    w = np.zeros(x.shape[1])
    for _ in range(iters):  # every difference is labelled "chosen wins": logistic loss on x @ w
        p = 1 / (1 + np.exp(-(x @ w)))
        w -= lr * (-(x * (1 - p)[:, None]).mean(0) + strength * w)
    return w


def main(root: str, name: str = "frozen_probe.json") -> None:
    model = AutoModel.from_pretrained(Path(root, "policy")).eval()
    train, test = _differences(model, _rows(root, "train")[:N_TRAIN]), _differences(model, _rows(root, "test"))
    out = {"testbed": root, "n_train_pairs": N_TRAIN, "n_test_pairs": len(test["mean"])}
    for kind in ("last_token", "mean"):
        scale = train[kind].std(0) + 1e-6
        x, xt = train[kind] / scale, test[kind] / scale
        fold = np.arange(len(x)) % 5
        cv = {s: float(np.mean([((x[fold == k] @ _fit(x[fold != k], s)) > 0).mean() for k in range(5)]))
              for s in STRENGTHS}
        best = max(cv, key=cv.get)
        out[kind] = {"cv_accuracy": {str(s): a for s, a in cv.items()}, "chosen_strength": best,
                     "test_accuracy": float(((xt @ _fit(x, best)) > 0).mean())}
        print(kind, out[kind], flush=True)
    (HERE / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:3])

"""k1 and k3 against the exact KL (``kl_ref/exact_seq``: the full-vocabulary sum over SmolLM2's 49,152 tokens) at
every measurement of the committed run's ``log_history.jsonl``: per step, and the mean and standard deviation of each
estimator's error. Output: kl_estimators.json."""

import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def summarize(log_path: str) -> dict:
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    points = [{"step": r["step"], "exact": float(r["kl_ref/exact_seq"]), "k1": float(r["kl_ref/k1_seq"]),
               "k3": float(r["kl_ref/k3_seq"])} for r in rows if "kl_ref/exact_seq" in r]
    out = {"points": points, "n": len(points)}
    for name in ("k1", "k3"):
        errors = [p[name] - p["exact"] for p in points]
        out[f"{name}_error_mean"], out[f"{name}_error_sd"] = statistics.fmean(errors), statistics.stdev(errors)
    out["exact_mean"] = statistics.fmean(p["exact"] for p in points)
    return out


if __name__ == "__main__":
    with open(os.path.join(HERE, "kl_estimators.json"), "w") as f:
        json.dump(summarize(os.path.join(HERE, "log_history.jsonl")), f, indent=2)

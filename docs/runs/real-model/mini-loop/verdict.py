"""Decides the mini loop's claim on SmolLM2 from the two committed runs, with the rule the chapter's pipeline applies
(``claim_mini_loop``): the run with the KL penalty (kl-penalty/) against the same loop, seed and steps without it
(no-penalty/), and the control the same rule with the roles swapped. The held-out polite shares are shares of n
prompts, so their binomial standard errors are written beside them. Output: verdict.json."""

import dataclasses
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "recipes"))
from pipeline_stages import MINI_KEEP, claim_mini_loop  # noqa: E402


def _kept(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in MINI_KEEP}


def _share_se(share: float, n: int) -> float:
    return math.sqrt(share * (1 - share) / n)


def main() -> None:
    runs = {name: json.loads((HERE / name / "metrics.json").read_text()) for name in ("kl-penalty", "no-penalty")}
    result = _kept(runs["kl-penalty"]) | {"no_kl_penalty": _kept(runs["no-penalty"])}
    decided = claim_mini_loop({"mini_loop": result})
    claim = dataclasses.asdict(decided) | {"verdict": decided.verdict()}
    n = runs["kl-penalty"]["config"]["num_eval_prompts"]
    noise = {name: {f"{when}_se": _share_se(m[f"polite_share_{when}"], n) for when in ("before", "after")}
             for name, m in runs.items()}
    out = {"claim": claim, "eval_prompts": n, "share_standard_errors": noise,
           "seconds": {name: m["seconds"] for name, m in runs.items()}}
    (HERE / "verdict.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

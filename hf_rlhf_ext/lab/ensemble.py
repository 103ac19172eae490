"""k proxy reward models for the lab — the raw material of reward-model ensembles (Coste et al. 2023, arXiv 2310.02743).

Each member is the lab's proxy RM recipe (same architecture, same ``trl.RewardTrainer`` schedule; on a testbed, the
proxy recipe of its build) with its own seed and its own bootstrap resample of the lab's training pairs, so members
agree where the data is dense and disagree off it — the disagreement an ensemble objective (mean, worst case,
mean − λ·std) uses. Built once per (lab, k, split) and cached
under ``<lab root>/ensemble/k<k>-<split>/`` next to the rest of the lab; a build is written to a temporary directory and
moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from typing import Any

from .build import BUILD_THREADS, Lab, _train_rm

__all__ = ["ENSEMBLE_SPLITS", "build_reward_ensemble", "ensemble_dir"]

ENSEMBLE_SPLITS = ("bootstrap", "disjoint", "same")
_MARKER = "ENSEMBLE_COMPLETE"


def ensemble_dir(lab: Lab, k: int, split: str) -> str:
    return os.path.join(lab.root, "ensemble", f"k{k}-{split}")


def _member_pairs(pairs: Any, index: int, k: int, split: str, seed: int) -> Any:
    """The training pairs of member ``index``: a bootstrap resample (same size, with replacement), one of k disjoint
    shards, or all pairs ("same": members differ by seed only)."""
    n = len(pairs)
    if split == "same":
        return pairs
    if split == "disjoint":
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return pairs.select(sorted(order[index::k]))
    rng = random.Random(seed + index)
    return pairs.select([rng.randrange(n) for _ in range(n)])


def build_reward_ensemble(lab: Lab, k: int = 3, split: str = "bootstrap", force: bool = False) -> list[str]:
    """Paths of ``k`` proxy reward models for ``lab`` (built on first use, a few seconds each on a CPU).

    Member i uses seed ``seed + 1000·(i + 1)`` (the lab's or the testbed's seed) for its initial weights and data
    order, and its own slice of the lab's training pairs (``split``). Their held-out pairwise accuracies are in
    ``ensemble_metrics.json``.
    """
    if k < 2:
        raise ValueError(f"An ensemble needs k >= 2 members, got {k}.")
    if split not in ENSEMBLE_SPLITS:
        raise ValueError(f"split must be one of {ENSEMBLE_SPLITS}, got {split!r}.")
    root = ensemble_dir(lab, k, split)
    paths = [os.path.join(root, f"rm_{i}") for i in range(k)]
    if not force and os.path.isfile(os.path.join(root, _MARKER)):
        return paths
    os.makedirs(os.path.dirname(root), exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(root) + ".building-", dir=os.path.dirname(root))
    try:
        metrics = _train_members(lab, k, split, work)
        with open(os.path.join(work, "ensemble_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        open(os.path.join(work, _MARKER), "w").close()
        if force and os.path.isdir(root):
            shutil.rmtree(root)
        try:
            os.replace(work, root)
        except OSError:  # a concurrent build finished first
            if not os.path.isfile(os.path.join(root, _MARKER)):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def _train_members(lab: Lab, k: int, split: str, work: str) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..reward_modeling import pairwise_report

    if lab.is_testbed:
        return _train_testbed_members(lab, k, split, work)
    tokenizer = lab.load_tokenizer()
    pairs = lab.load_preferences()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)  # one thread: the same members on every machine, as for the lab itself
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    metrics: dict[str, Any] = {"k": k, "split": split, "members": []}
    try:
        for i in range(k):
            config = dataclasses.replace(lab.config, seed=lab.config.seed + 1000 * (i + 1))
            train = _member_pairs(pairs["train"], i, k, split, config.seed)
            out = os.path.join(work, f"rm_{i}")
            _train_rm(config, tokenizer, {"train": train}, os.path.join(work, f"run_{i}"), lab.policy_path, out)
            shutil.rmtree(os.path.join(work, f"run_{i}"), ignore_errors=True)
            rm = AutoModelForSequenceClassification.from_pretrained(out)
            report = pairwise_report(rm, tokenizer, pairs["test"], gold_margin=lab.config.gold_margin)
            metrics["members"].append({"seed": config.seed, "train_pairs": len(train), **report})
    finally:
        torch.set_num_threads(threads)
        if bars_were_on:
            datasets.enable_progress_bars()
    return metrics


def _train_testbed_members(lab: Lab, k: int, split: str, work: str) -> dict[str, Any]:
    """The members of a testbed's ensemble: each trained as the testbed's build trained its proxy
    (``train_proxy_like_testbed``: same architecture, embedding start and schedule), scored on its held-out pairs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..reward_modeling import pairwise_report
    from .testbed import _quiet_progress_bars, testbed_config, train_proxy_like_testbed

    config = testbed_config(lab.root)
    pairs = lab.load_preferences()
    metrics: dict[str, Any] = {"k": k, "split": split, "members": []}
    for i in range(k):
        seed = config.seed + 1000 * (i + 1)
        train = _member_pairs(pairs["train"], i, k, split, seed)
        out = os.path.join(work, f"rm_{i}")
        with _quiet_progress_bars():
            train_proxy_like_testbed(lab.root, train, os.path.join(work, f"run_{i}"), out, seed)
        shutil.rmtree(os.path.join(work, f"run_{i}"), ignore_errors=True)
        rm = AutoModelForSequenceClassification.from_pretrained(out)
        report = pairwise_report(rm, AutoTokenizer.from_pretrained(out), pairs["test"], gold_margin=config.gold_margin)
        metrics["members"].append({"seed": seed, "train_pairs": len(train), **report})
    return metrics

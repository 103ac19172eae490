"""Evaluation helpers. Metric modules live in sub-folders and load offline by path with ``evaluate.load``."""

from __future__ import annotations

import os

#: directory of the ``pairwise_accuracy`` evaluate metric (``evaluate.load(PAIRWISE_ACCURACY_PATH)``)
PAIRWISE_ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pairwise_accuracy")


def load_pairwise_accuracy(**kwargs):
    """``evaluate.load`` of the shipped pairwise-accuracy metric (no Hub access needed)."""
    import evaluate

    return evaluate.load(PAIRWISE_ACCURACY_PATH, **kwargs)


__all__ = ["PAIRWISE_ACCURACY_PATH", "load_pairwise_accuracy"]

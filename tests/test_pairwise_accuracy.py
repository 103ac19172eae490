"""The shipped `evaluate` metric for pairwise accuracy: hand-computed values, ties, offline loading by path."""

import os

import pytest

from hf_rlhf_ext.evaluation import PAIRWISE_ACCURACY_PATH, load_pairwise_accuracy


@pytest.fixture(scope="module")
def metric():
    return load_pairwise_accuracy()


def test_metric_module_is_shipped_in_the_package():
    assert os.path.isfile(os.path.join(PAIRWISE_ACCURACY_PATH, "pairwise_accuracy.py"))
    assert os.path.isfile(os.path.join(PAIRWISE_ACCURACY_PATH, "README.md"))


def test_hand_computed_accuracy_and_margin(metric):
    chosen = [2.0, 0.5, -1.0, 3.0]
    rejected = [1.0, 1.5, -2.0, 0.0]
    out = metric.compute(chosen_scores=chosen, rejected_scores=rejected)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["mean_margin"] == pytest.approx((1.0 - 1.0 + 1.0 + 3.0) / 4)


def test_ties_count_half(metric):
    out = metric.compute(chosen_scores=[1.0, 1.0, 0.0], rejected_scores=[1.0, 0.0, 1.0])
    assert out["accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    constant = metric.compute(chosen_scores=[0.3] * 5, rejected_scores=[0.3] * 5)
    assert constant["accuracy"] == pytest.approx(0.5)


def test_loads_with_evaluate_load_by_path_and_accumulates_batches():
    import evaluate

    metric = evaluate.load(PAIRWISE_ACCURACY_PATH)
    metric.add_batch(chosen_scores=[1.0, 0.0], rejected_scores=[0.0, 1.0])
    metric.add_batch(chosen_scores=[5.0], rejected_scores=[4.0])
    out = metric.compute()
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["mean_margin"] == pytest.approx(1 / 3)


def test_empty_input_raises(metric):
    with pytest.raises(ValueError):
        metric.compute(chosen_scores=[], rejected_scores=[])

"""Pairwise accuracy of a reward model: how often it scores the chosen reply above the rejected one.

An `evaluate` metric module, shipped inside the package so that it loads offline by path
(``evaluate.load(hf_rlhf_ext.evaluation.PAIRWISE_ACCURACY_PATH)``); ``evaluate.load("accuracy")`` would need the Hub.
"""

import datasets
import evaluate

_DESCRIPTION = """
Pairwise (preference) accuracy: the fraction of pairs where the reward model scores the chosen reply above the
rejected one. A tie counts as half a correct pair (a constant model scores 0.5, not 0 or 1). Also returns the mean
margin, mean(chosen_score - rejected_score).
"""

_KWARGS_DESCRIPTION = """
Args:
    chosen_scores (`list` of `float`): reward of the preferred reply of each pair.
    rejected_scores (`list` of `float`): reward of the other reply of the same pair.
Returns:
    accuracy (`float`): (#{chosen > rejected} + 0.5 * #{chosen == rejected}) / #pairs, in [0, 1].
    mean_margin (`float`): mean of chosen_scores - rejected_scores.
Examples:
    >>> metric = evaluate.load("path/to/pairwise_accuracy")
    >>> metric.compute(chosen_scores=[1.0, 0.0, 2.0], rejected_scores=[0.0, 1.0, 2.0])
    {'accuracy': 0.5, 'mean_margin': 0.0}
"""

_CITATION = """
@article{ouyang2022training,
  title={Training language models to follow instructions with human feedback},
  author={Ouyang, Long and others},
  journal={arXiv preprint arXiv:2203.02155},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairwiseAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"chosen_scores": datasets.Value("float64"), "rejected_scores": datasets.Value("float64")}
            ),
        )

    def _compute(self, chosen_scores, rejected_scores):
        if len(chosen_scores) == 0:
            raise ValueError("pairwise_accuracy needs at least one pair.")
        wins = 0.0
        margin = 0.0
        for c, r in zip(chosen_scores, rejected_scores):
            c, r = float(c), float(r)
            wins += 1.0 if c > r else (0.5 if c == r else 0.0)
            margin += c - r
        n = len(chosen_scores)
        return {"accuracy": wins / n, "mean_margin": margin / n}

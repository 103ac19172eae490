"""A quiet default run: a model load that only drops a task head (PPO's critic on a reward model's body) reports
nothing, while any other load report still shows."""

from __future__ import annotations

import logging

import pytest
from _ppo_helpers import build_world

from hf_rlhf_ext.run.build import expected_head_drops_unreported


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def reports():
    """Load reports as transformers' loader logs them (its loggers do not propagate to pytest's caplog)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a Trainer built with log_level="error" earlier in the session lowers it
    handler, loader = _Records(), logging.getLogger("transformers.modeling_utils")
    loader.addHandler(handler)
    yield lambda: [m for m in handler.messages if "LOAD REPORT" in m]
    loader.removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def test_a_body_loaded_from_a_reward_model_reports_nothing_inside_the_context(tmp_path, reports):
    from transformers import AutoModel

    world = build_world(str(tmp_path))  # its reward model: GPT2ForSequenceClassification with a score head
    AutoModel.from_pretrained(world["reward"])
    assert any("score.weight" in m and "UNEXPECTED" in m for m in reports())  # without the context: the report
    with expected_head_drops_unreported():
        AutoModel.from_pretrained(world["reward"])
    assert len(reports()) == 1


def test_other_load_reports_still_show_inside_the_context(tmp_path, reports):
    from transformers import AutoModelForSequenceClassification

    world = build_world(str(tmp_path))
    with expected_head_drops_unreported():  # a new score head on the policy: MISSING, not an expected drop
        AutoModelForSequenceClassification.from_pretrained(world["policy"], num_labels=1)
    assert any("score.weight" in m and "MISSING" in m for m in reports())


def test_the_command_line_drops_only_the_deprecation_trl_triggers():
    """TRL 1.16 reads a transformers property renamed in 5.x on every step; the user cannot act on that warning."""
    import warnings

    from hf_rlhf_ext.run.errors import cli_main

    def entry():
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something the user can fix", FutureWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(entry)
    assert [str(w.message) for w in caught] == ["something the user can fix"]

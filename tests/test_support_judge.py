"""The SmolLM2 testbed's graded judge (docs/runs/testbed-smollm2/support_judge.py): its rubric, on hand-written
replies, and that it separates replies the 0/1 judge scores alike (a gold tie makes a pair's label a coin flip)."""

import importlib.util
from pathlib import Path

import pytest

JUDGE = Path(__file__).resolve().parents[1] / "docs" / "runs" / "testbed-smollm2" / "support_judge.py"


@pytest.fixture(scope="module")
def judge():
    spec = importlib.util.spec_from_file_location("support_judge", JUDGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(judge, replies, item="lamp"):
    return judge.graded_reply(["p"] * len(replies), replies, item=[item] * len(replies))


def test_more_of_what_helps_scores_higher(judge):
    none, once, twice = _scores(judge, ["We can help.", "We can help with the lamp.", "The lamp: we fix any lamp."])
    assert none < once < twice
    one, two = _scores(judge, ["We will refund it.", "We will refund or replace it."])
    assert one < two
    plain, courteous = _scores(judge, ["We will refund it.", "Sorry! We will refund it, thank you."])
    assert plain < courteous


def test_rude_unfinished_and_rambling_score_lower(judge):
    fine, rude, cut = _scores(judge, ["We will refund it.", "We will refund it, whatever.", "We will refund it and"])
    assert rude < fine and cut < fine
    short, rambling = _scores(judge, ["We will refund it.", "We will refund it " + "really " * 60 + "soon."])
    assert rambling < short


def test_the_graded_judge_ties_less_often_than_the_binary_one(judge):
    replies = ["Sorry about the lamp, we will replace it.", "Sorry about your lamp, we will replace or refund it.",
               "We will replace the lamp. Thank you!", "Thank you, please send the lamp back and we will refund it.",
               "I am sorry, we will replace your lamp, you will get it soon."]
    binary = judge.helpful_reply(["p"] * len(replies), replies, item=["lamp"] * len(replies))
    graded = _scores(judge, replies)
    assert len(set(binary)) < len(set(graded))

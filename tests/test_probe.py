"""The retention probe's questions and its lenient scorer (no model: plain Python)."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import pytest

from lmtuner_core.report.probe import load_probe, normalise, probe_correct


def test_probe_file_loads_with_enough_unique_questions():
    probe = load_probe()
    assert len(probe) >= 180
    ids = [q.id for q in probe]
    assert len(set(ids)) == len(ids), [i for i, n in Counter(ids).items() if n > 1]
    questions = [normalise(q.question) for q in probe]
    assert len({tuple(q) for q in questions}) == len(questions)


def test_probe_spreads_over_ten_topics():
    topics = Counter(q.topic for q in load_probe())
    assert len(topics) == 10, topics
    assert min(topics.values()) >= 15, topics


def test_every_question_has_short_answers_that_it_does_not_give_away():
    for q in load_probe():
        assert q.answers, q.id
        assert q.id.split("-")[0] and q.question.endswith("?"), q.id
        for answer in q.answers:
            assert 1 <= len(answer.split()) <= 4, (q.id, answer)
            # an answer that is in its own question would score a model that merely repeats the question
            assert not probe_correct(q.question, [answer]), (q.id, answer)


def test_probe_is_not_yes_no():
    for q in load_probe():
        assert not any(normalise(a) in (["yes"], ["no"]) for a in q.answers), q.id


@pytest.mark.parametrize(
    ("answer", "accepted", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),  # a sentence
        ("Paris", ["Paris"], True),  # one word
        ("paris!", ["Paris"], True),
        ("It was painted by da Vinci.", ["Leonardo da Vinci", "da Vinci", "Leonardo"], True),  # an alias
        ("A spider has 8 legs.", ["8", "eight"], True),
        ("A spider has eight legs.", ["8"], True),  # words equal digits
        ("Seven.", ["7"], True),
        ("There are twenty-six letters.", ["26"], True),
        ("1,000 grams make a kilogram.", ["1000"], True),
        ("There are one thousand metres in a kilometre.", ["1000"], True),
        ("The capital of Colombia is Bogotá.", ["Bogota"], True),  # accents
        ("Bogota", ["Bogotá"], True),
        ("The answer is Cinderella", ["the Cinderella"], True),  # articles dropped
        ("Water is H2O.", ["H2O"], True),
        ("The Parisian district of Montmartre.", ["Paris"], False),  # a longer word is not the answer
        ("Sydney is in Austria.", ["Australia"], False),
        ("Sydney is in Australia.", ["Austria"], False),
        ("A spider has 18 legs.", ["8"], False),
        ("A spider has six legs.", ["8", "eight"], False),
        ("The capital of France is Lyon.", ["Paris"], False),
        ("", ["Paris"], False),
        ("3.14 is pi", ["3"], False),  # a decimal is one number
    ],
)
def test_probe_correct(answer, accepted, expected):
    assert probe_correct(answer, accepted) is expected


@pytest.mark.parametrize(
    ("answer", "accepted", "question", "expected"),
    [
        ("The answer is 1. A square has four sides.", ["4", "four"], "How many sides does a square have?", False),
        ("A square has 4 sides, not 3.", ["4", "four"], "How many sides does a square have?", True),
        ("12 divided by 4 equals 3.", ["3"], "What is 12 divided by 4?", True),  # the question's numbers do not count
        ("2 plus 2 is 4", ["4", "four"], "What is 2 plus 2?", True),
    ],
)
def test_a_number_answer_must_be_the_first_new_number(answer, accepted, question, expected):
    assert probe_correct(answer, accepted, question) is expected


def test_a_year_is_not_confused_with_the_day_before_it():
    assert probe_correct("The Berlin Wall fell on January 20, 1989.", ["1989"], "In which year did the Wall fall?")
    assert not probe_correct("It ended in 1944, not 1945.", ["1945"], "In which year did World War II end?")


def test_only_the_opening_of_an_answer_counts():
    late = "I think so. " * 20 + "Maybe Lyon or Paris."
    assert not probe_correct(late, ["Paris"])
    # a first sentence longer than 30 words is still read to its end
    long_sentence = "Well " + " ".join(["so"] * 35) + " it is Paris. Then more."
    assert probe_correct(long_sentence, ["Paris"])
    # within the first 30 words, a second sentence counts too (a base model may open with "Sure!")
    assert probe_correct("Sure! The capital of France is Paris.", ["Paris"])


def test_the_probe_file_is_shipped_as_package_data():
    # without this entry a wheel leaves probe.jsonl out (checked by building one) and load_probe fails once installed
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert "probe.jsonl" in pyproject["tool"]["setuptools"]["package-data"]["lmtuner_core.report"]

"""The self-distillation replay prompts (general requests and short questions): well formed, evenly mixed, and apart
from the retention probe's facts."""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

REPLAY_FILE = "replay_prompts.jsonl"
QUESTIONS_FILE = "replay_questions.jsonl"
QUESTION_TOPICS = frozenset(
    {"geography", "science", "maths", "history", "language", "nature", "body", "everyday", "arts", "units"}
)
KINDS = frozenset(
    {
        "explain",  # explain a concept simply
        "advice",  # advice / how-to
        "describe",  # describe something
        "compare",  # compare two things
        "define",  # define a word
        "write",  # write one or two sentences on a topic
        "reasoning",  # everyday reasoning
        "list",  # a short list request ("Name three ...")
        "conversation",  # polite conversation ("Can you help me plan a picnic?")
        "factual",  # a general factual question answered in a full sentence
    }
)
# A probe question shares its fact with a replay prompt when this share of its content words is in that prompt.
OVERLAP_SHARE = 0.6

QUESTION_WORDS = frozenset({"what", "which", "who", "whom", "whose", "where", "when", "why", "how", "many", "much"})
_STOP_TEXT = """
a an the and or but if of to in on at by for from with without into onto over under about after before as
is are was were be been being am do does did done have has had having can could will would shall should may
might must it its this that these those there here their they them you your we our us i me my he him his she
her not no so than then too very just also some any all each every one s
called name named known
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())
_WORD = re.compile(r"[a-z0-9]+")


def _load(name: str = REPLAY_FILE) -> list[dict]:
    text = files("lmtuner_core.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _content_words(text: str) -> set[str]:
    return _words(text) - STOP_WORDS - QUESTION_WORDS


def _probe_questions() -> list[tuple[str, str]]:
    text = files("lmtuner_core.report").joinpath("probe.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(row["id"], row["question"]) for row in rows]


def test_the_file_has_160_rows_with_unique_ids_and_prompts():
    rows = _load()
    assert len(rows) == 160
    for row in rows:
        assert set(row) == {"id", "kind", "prompt"}, row
        assert re.fullmatch(r"rp-\d{3}", row["id"]), row
    ids = [row["id"] for row in rows]
    assert ids == [f"rp-{n:03d}" for n in range(1, 161)]
    prompts = [" ".join(row["prompt"].lower().split()) for row in rows]
    assert len(set(prompts)) == len(prompts), [p for p, n in Counter(prompts).items() if n > 1]


def test_each_prompt_is_3_to_40_words():
    for row in _load():
        assert 3 <= len(row["prompt"].split()) <= 40, row


def test_kinds_come_from_the_fixed_set_and_are_evenly_mixed():
    kinds = Counter(row["kind"] for row in _load())
    assert set(kinds) == KINDS, kinds
    assert max(kinds.values()) - min(kinds.values()) <= 2, kinds


def test_the_questions_file_has_short_distinct_questions_on_every_topic():
    rows = _load(QUESTIONS_FILE)
    assert len(rows) >= 100
    assert [row["id"] for row in rows] == [f"rq-{n:03d}" for n in range(1, len(rows) + 1)]
    for row in rows:
        assert set(row) == {"id", "topic", "prompt"}, row
        assert 3 <= len(row["prompt"].split()) <= 16 and row["prompt"].endswith("?"), row
    assert {row["topic"] for row in rows} == QUESTION_TOPICS
    prompts = [" ".join(row["prompt"].lower().split()) for row in rows]
    assert len(set(prompts)) == len(prompts), [p for p, n in Counter(prompts).items() if n > 1]


def test_mixed_replay_alternates_questions_and_requests_in_the_seed_order():
    from lmtuner_core.data.replay_prompts import load_replay_prompts

    questions, requests = load_replay_prompts(7, "questions"), load_replay_prompts(7, "requests")
    mixed = load_replay_prompts(7, "mixed")
    assert mixed[:4] == [questions[0], requests[0], questions[1], requests[1]]
    assert sorted(mixed) == sorted(questions + requests)
    assert load_replay_prompts(8, "questions") != questions  # the seed draws the order


@pytest.mark.parametrize("name", [REPLAY_FILE, QUESTIONS_FILE])
def test_no_prompt_mentions_capitals(name):
    for row in _load(name):
        assert "capital" not in row["prompt"].lower(), row


@pytest.mark.parametrize("name", [REPLAY_FILE, QUESTIONS_FILE])
@pytest.mark.parametrize(("probe_id", "question"), _probe_questions())
def test_no_prompt_shares_a_probe_questions_content_words(probe_id, question, name):
    content = _content_words(question)
    assert content, probe_id
    for row in _load(name):
        shared = content & _words(row["prompt"])
        assert len(shared) / len(content) < OVERLAP_SHARE, (probe_id, question, row["id"], row["prompt"], shared)


def test_the_replay_files_are_shipped_as_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = pyproject["tool"]["setuptools"]["package-data"]["lmtuner_core.data"]
    assert REPLAY_FILE in shipped and QUESTIONS_FILE in shipped

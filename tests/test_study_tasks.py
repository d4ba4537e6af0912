"""The recipe study's task suite (lmtuner_core/data/study_tasks.py): deterministic rows, held-out test sets that
share no underlying item with any training size, valid messages rows, and answers of the promised form."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from lmtuner_core.data import study_tasks
from lmtuner_core.data.study_tasks import CLASSIFY_LABELS, TASKS, capital_named, json_answer, write_task
from lmtuner_core.errors import LmtunerError

WRITTEN_TASKS = [name for name in TASKS if name != "medical"]  # our own content: no shared data needed


@pytest.fixture(params=list(TASKS))
def task(request):
    if request.param == "medical":  # only the medical task needs the shared data; the others are written here
        folder = request.getfixturevalue("shared_data") / "lmtuner-medical"
        if not folder.is_dir():
            pytest.skip(f"LMTuner's medical example not found at {folder}")
        if folder != study_tasks.MEDICAL_DATA:
            pytest.skip(f"LMTUNER_MEDICAL_DATA points elsewhere ({study_tasks.MEDICAL_DATA})")
    return TASKS[request.param]


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_the_suite_covers_the_six_kinds_of_issue_23():
    assert {t.kind for t in TASKS.values()} == {
        "short answers over known facts", "extraction to JSON", "format conversion", "classification into labels",
        "style or persona", "long-form answers",
    }  # fmt: skip
    for t in TASKS.values():
        assert t.metric in {"exact_match", "json", "rouge_l"}
        assert t.sizes[0] < t.sizes[1] < t.sizes[2]
        assert t.goal and len(t.about) > 80, t.name  # each task says what it measures and what the base does


def test_same_seed_same_rows_and_another_seed_other_training_rows(task):
    assert task.rows(task.sizes[2], seed=0) == task.rows(task.sizes[2], seed=0)
    train_0, test_0 = task.rows(task.sizes[1], seed=0)
    train_1, test_1 = task.rows(task.sizes[1], seed=1)
    assert train_0 != train_1
    assert test_0 == test_1  # the test set does not move with the seed


def test_sizes_are_honoured_nested_and_share_one_test_set(task):
    tests = []
    previous: list[dict] = []
    for size in task.sizes:
        train, test = task.rows(size)
        assert len(train) == size
        assert train[: len(previous)] == previous  # a larger size adds rows to the smaller one
        previous = train
        tests.append(test)
    assert tests[0] == tests[1] == tests[2]
    expected = 61 if task.name == "medical" else None
    assert len(tests[0]) == expected if expected else 24 <= len(tests[0]) <= 32


def test_no_underlying_item_is_in_both_train_and_test(task):
    for seed in (0, 1, 2):
        train, test = task.items(task.sizes[2], seed)
        assert not {key for key, _ in train} & {key for key, _ in test}
        prompts = {row["messages"][0]["content"] for _, row in train}
        assert not prompts & {row["messages"][0]["content"] for _, row in test}


def test_items_are_what_the_rows_are_about():
    """The keys the overlap test compares are the real items: read back from each row's text, not trusted."""
    for name in ("capitals", "extract_json", "dates_iso"):
        train, test = TASKS[name].items(TASKS[name].sizes[2])
        for key, row in train + test:
            if name == "capitals":
                assert key in row["messages"][0]["content"]
            elif name == "extract_json":
                assert json.loads(answer(row))["name"] == key
            else:
                assert answer(row) == key
    # held-out pools: no test capital, person's name part, city or date appears in any training row
    capitals_train, capitals_test = TASKS["capitals"].rows(128)
    assert not {answer(r) for r in capitals_train} & {answer(r) for r in capitals_test}
    people_train, people_test = TASKS["extract_json"].rows(128)
    seen = [json.loads(answer(r)) for r in people_train]
    for row in people_test:
        person = json.loads(answer(row))
        assert all(set(person["name"].split()).isdisjoint(p["name"].split()) for p in seen)
        assert person["city"] not in {p["city"] for p in seen}
    classify_train, classify_test = TASKS["classify"].items(160)
    assert not {t for t, _ in classify_train} & {t for t, _ in classify_test}


def test_every_row_is_a_messages_row(task):
    train, test = task.rows(task.sizes[2])
    for row in train + test:
        assert set(row) == {"messages"}
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        assert all(set(m) == {"role", "content"} for m in row["messages"])


def test_json_answers_parse_with_the_fixed_keys_and_one_serialisation():
    train, test = TASKS["extract_json"].rows(128)
    for row in train + test:
        value = json.loads(answer(row))
        assert list(value) == ["name", "age", "city", "year"]
        assert isinstance(value["age"], int) and isinstance(value["year"], int)
        assert answer(row) == json_answer(value)
        assert str(value["age"]) in row["messages"][0]["content"] and value["city"] in row["messages"][0]["content"]
    assert json_answer({"a": 1, "b": "x"}) == '{"a": 1, "b": "x"}'


def test_dates_are_valid_iso_and_match_what_is_written():
    train, test = TASKS["dates_iso"].rows(128)
    for row in train + test:
        date = datetime.date.fromisoformat(answer(row))
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer(row))
        written = row["messages"][0]["content"].split(": ", 1)[1]
        assert str(date.year) in written
        assert any(study_tasks.written_date(date, form) == written for form in range(len(study_tasks._DATE_FORMS)))
    assert study_tasks.written_date(datetime.date(2021, 3, 4), 0) == "the fourth of March, 2021"
    assert study_tasks.written_date(datetime.date(2021, 3, 4), 1) == "March 4th 2021"
    assert study_tasks.written_date(datetime.date(2021, 3, 4), 2) == "4 Mar 2021"
    assert study_tasks.written_date(datetime.date(2021, 3, 4), 6) == "Thursday, March 4, 2021"
    assert study_tasks.written_date(datetime.date(2012, 5, 12), 1) == "May 12th 2012"


def test_labels_are_in_the_set_listed_by_the_prompt_and_balanced():
    train, test = TASKS["classify"].rows(160)
    for row in train + test:
        assert answer(row) in CLASSIFY_LABELS
        assert ", ".join(CLASSIFY_LABELS) in row["messages"][0]["content"]
    for rows in (train, test, TASKS["classify"].rows(40)[0]):
        counts = [sum(answer(r) == label for r in rows) for label in CLASSIFY_LABELS]
        assert len(set(counts)) == 1, counts


def test_capitals_phrasings_and_lenient_check():
    train, test = TASKS["capitals"].items(128)
    asked: dict[str, list[str]] = {}
    for country, row in train:
        asked.setdefault(country, []).append(row["messages"][0]["content"])
    assert all(len(set(questions)) == len(questions) for questions in asked.values())  # never the same phrasing twice
    assert len(asked) == 40 and max(map(len, asked.values())) == 4  # 128 rows: 40 countries, 3-4 phrasings each
    assert len({row["messages"][0]["content"].replace(country, "X") for country, row in test}) >= 3
    assert capital_named("The capital of Ukraine is Kiev.", "Kyiv")
    assert capital_named("It's PARIS, of course", "Paris")
    assert not capital_named("Parisian cafés are nice", "Paris")
    assert not capital_named("Sydney", "Canberra")


def test_persona_answers_are_one_short_sentence_starting_aye():
    train, test = TASKS["persona"].rows(96)
    for row in train + test:
        text = answer(row)
        assert text.startswith("Aye, ") and text.endswith((".", "!"))
        assert len(text.split()) <= 20 and text.count(". ") == 0


def test_medical_reads_the_shared_reference_rows_as_shipped(shared_data):
    folder = shared_data / "lmtuner-medical"
    if not folder.is_dir() or folder != study_tasks.MEDICAL_DATA:
        pytest.skip(f"LMTuner's medical example not found at {folder}")
    source = [json.loads(line) for line in (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    train, test = TASKS["medical"].rows(482)
    assert [(r["messages"][0]["content"], answer(r)) for r in test] == [(s["input"], s["output"]) for s in source]
    source_train = [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(answer(r) for r in train) == sorted(s["output"] for s in source_train)


def test_write_task_writes_jsonl_that_lmtuner_reads(tmp_path):
    from lmtuner_core.data.datasets import detect_format, iter_rows, messages_to_example

    train_path, test_path = write_task("dates_iso", 32, tmp_path / "dates", seed=3)
    assert [json.loads(line) for line in train_path.read_text().splitlines()] == TASKS["dates_iso"].rows(32, 3)[0]
    assert len(test_path.read_text().splitlines()) == 32
    read = [row for _, row in iter_rows(train_path)]  # the reader start_training uses
    assert len(read) == 32 and {detect_format(row, {}) for row in read} == {"messages"}
    assert all(len(messages_to_example(row, {})["messages"]) == 2 for row in read)


@pytest.mark.parametrize(
    ("call", "field", "words"),
    [
        (lambda: write_task("poetry", 10, "/nonexistent"), "name", "capitals"),
        (lambda: TASKS["capitals"].rows(0), "size", "1 to 160"),
        (lambda: TASKS["capitals"].rows(1000), "size", "1 to 160"),
        (lambda: TASKS["capitals"].rows("32"), "size", "whole number"),
        (lambda: TASKS["capitals"].rows(32, seed=1.5), "seed", "whole number"),
    ],
)
def test_bad_arguments_name_the_field_and_what_is_accepted(call, field, words):
    with pytest.raises(LmtunerError) as caught:
        call()
    assert caught.value.field == field and words in str(caught.value)


def test_medical_without_the_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(study_tasks, "MEDICAL_DATA", tmp_path / "missing")
    with pytest.raises(LmtunerError, match="LMTUNER_MEDICAL_DATA"):
        TASKS["medical"].rows(64)


@pytest.mark.parametrize("name", WRITTEN_TASKS)
def test_training_rows_are_distinct(name):
    train, _ = TASKS[name].rows(TASKS[name].sizes[2])
    assert len({json.dumps(r) for r in train}) == len(train)

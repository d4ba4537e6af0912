"""Graders: each type scores what it says, the weighted mean is the row's score, and every bad declaration is refused
with a message naming the grader's place and field (graders[i].field) and what is accepted."""

from __future__ import annotations

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.errors import LmtunerError
from lmtuner_core.graders.scoring import GraderSet
from lmtuner_core.paths import AllowedRoots


def graders(*declared: dict, roots=None, trust: bool = False) -> GraderSet:
    config = parse_train_config(
        {"model": "m", "dataset": "d.jsonl", "stage": "grpo", "graders": list(declared), "trust_remote_code": trust}
    )
    return GraderSet(config.graders, AllowedRoots(roots), trust_remote_code=trust)


def score(grader: dict, answer, row: dict | None = None) -> float:
    return graders(grader).score(answer, row or {}).score


ROW = {"prompt": "2+3?", "answer": "5", "data": '{"a": 1}'}


@pytest.mark.parametrize(
    ("grader", "answer", "expected"),
    [
        ({"type": "string_check", "reference": "answer", "operation": "eq"}, " 5\n", 1.0),
        ({"type": "string_check", "reference": "answer", "operation": "eq"}, "It is 5", 0.0),
        ({"type": "string_check", "reference": "answer", "operation": "contains"}, "It is 5", 1.0),
        ({"type": "string_check", "reference": "prompt", "operation": "icontains"}, "you asked 2+3?", 1.0),
        ({"type": "regex", "pattern": r"^Answer: \d+$"}, "Answer: 12", 1.0),
        ({"type": "regex", "pattern": r"^Answer: \d+$"}, "The answer is 12", 0.0),
        ({"type": "json"}, '```json\n{"a": 1}\n```', 1.0),
        ({"type": "json"}, "not json", 0.0),
        ({"type": "json", "schema": {"type": "object", "required": ["a"]}, "reference": "data"}, '{"a": 1}', 1.0),
        ({"type": "json", "schema": {"type": "object", "required": ["b"]}, "reference": "data"}, '{"a": 1}', 2 / 3),
        ({"type": "text_similarity", "reference": "answer", "metric": "rouge_l"}, "5", 1.0),
        ({"type": "text_similarity", "reference": "prompt", "metric": "bleu"}, "something else entirely", 0.0),
        ({"type": "length", "min_chars": 1, "max_chars": 4}, "five", 1.0),
        ({"type": "length", "max_chars": 4}, "eight ch", 0.5),
        ({"type": "length", "min_chars": 10}, "five!", 0.5),
    ],
)
def test_each_grader_scores_what_it_declares(grader, answer, expected):
    assert score(grader, answer, ROW) == pytest.approx(expected, abs=1e-6)


def test_a_rows_score_is_the_weighted_mean_and_conversational_answers_are_read():
    combined = graders(
        {"type": "string_check", "reference": "answer", "operation": "eq", "weight": 3},
        {"type": "length", "max_chars": 1},
    )
    result = combined.score([{"role": "assistant", "content": "55"}], ROW)  # wrong (0 × 3) and too long (0.5 × 1)
    assert result.score == pytest.approx(0.5 / 4)
    assert [(p.type, p.score) for p in result.graders] == [("string_check", 0.0), ("length", 0.5)]


def test_a_backtracking_pattern_is_stopped_and_scored_zero():
    result = graders({"type": "regex", "pattern": r"^(a|a)*$"}).score("a" * 40 + "b", {})
    assert result.score == 0.0 and "ran past" in result.graders[0].note


def test_the_reward_function_rebuilds_each_rows_columns():
    reward = graders({"type": "string_check", "reference": "answer", "operation": "eq"}).reward_function()
    scores = reward(prompts=["a", "b"], completions=["5", "7"], answer=["5", "8"], trainer_state=object())
    assert scores == [1.0, 0.0]


def test_a_missing_reference_column_is_named_with_the_rows_columns():
    with pytest.raises(LmtunerError, match=r"graders\[0\]\.reference: the row has no column 'solution'; its columns"):
        score({"type": "string_check", "reference": "solution", "operation": "eq"}, "5", ROW)


def test_a_python_grader_needs_the_opt_in_and_a_file_inside_the_roots(tmp_path):
    code = tmp_path / "score.py"
    code.write_text("def score(answer, row):\n    return 1.0 if answer == row['answer'] else 0.25\n")
    declared = {"type": "python", "file": str(code), "function": "score"}
    with pytest.raises(LmtunerError, match=r"graders\[0\]: a python grader runs the code .* trust_remote_code: true"):
        graders(declared, roots=[tmp_path])
    assert graders(declared, roots=[tmp_path], trust=True).score("4", ROW).score == 0.25
    with pytest.raises(LmtunerError, match=r"graders\[0\]\.file"):
        graders(declared, roots=[tmp_path / "elsewhere"], trust=True)
    with pytest.raises(LmtunerError, match=r"graders\[0\]\.function: score\.py has no function 'nope'; its functions"):
        graders({**declared, "function": "nope"}, roots=[tmp_path], trust=True)
    code.write_text("def score(answer, row):\n    return 7\n")
    with pytest.raises(LmtunerError, match=r"graders\[0\] \(score\.py:score\) returned 7; a grader returns a number"):
        graders(declared, roots=[tmp_path], trust=True).score("4", ROW)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            {"type": "string_check", "reference": "answer", "operation": "equals"},
            "graders[1].operation: Input should be 'eq', 'contains' or 'icontains'",
        ),
        ({"type": "string_check", "operation": "eq"}, "graders[1].reference: Field required"),
        ({"type": "regex", "pattern": "(unclosed"}, "graders[1].pattern: not a valid regular expression"),
        ({"type": "regex"}, "graders[1].pattern: Field required"),
        ({"type": "json", "schema": {"type": "integer-ish"}}, "graders[1].schema: not a valid JSON Schema"),
        ({"type": "json", "schemas": {}}, "graders[1]: unknown key 'schemas' (did you mean 'schema'?)"),
        (
            {"type": "text_similarity", "reference": "answer", "metric": "meteor"},
            "graders[1].metric: Input should be 'rouge_l' or 'bleu'",
        ),
        ({"type": "length"}, "graders[1]: give min_chars, max_chars or both"),
        ({"type": "length", "min_chars": 9, "max_chars": 3}, "graders[1]: min_chars (9) is above max_chars (3)"),
        ({"type": "length", "max_chars": 0}, "graders[1].max_chars: Input should be greater than or equal to 1"),
        ({"type": "python", "file": "g.py", "function": "not a name"}, "graders[1].function: String should match"),
        ({"type": "python", "file": "g.py", "function": "f"}, "graders[1]: a python grader runs the code"),
        ({"type": "regex", "pattern": "x", "weight": 0}, "graders[1].weight: Input should be greater than 0"),
        ({"type": "similarity"}, "graders[1].type: unknown grader type 'similarity'; accepted: string_check, regex"),
        ({"pattern": "x"}, "graders[1].type: missing; every grader names its type"),
        ("regex", "graders[1]: must be an object"),
    ],
)
def test_every_bad_grader_is_refused_naming_its_place_and_field(declared, message):
    with pytest.raises(LmtunerError) as refused:
        graders({"type": "length", "max_chars": 9}, declared)
    assert message in str(refused.value), str(refused.value)


def test_an_empty_grader_list_is_refused():
    with pytest.raises(LmtunerError, match="graders: give at least one grader"):
        graders()


def test_graders_belong_to_stage_grpo_and_grpo_needs_them():
    with pytest.raises(LmtunerError, match="graders: only stage 'grpo' trains with graders"):
        parse_train_config({"model": "m", "dataset": "d.jsonl", "graders": [{"type": "length", "max_chars": 3}]})
    with pytest.raises(LmtunerError, match="graders: stage 'grpo' rewards sampled answers with graders"):
        parse_train_config({"model": "m", "dataset": "d.jsonl", "stage": "grpo"})
    with pytest.raises(LmtunerError, match="eval_dataset: stage grpo measures nothing on held-out rows"):
        parse_train_config({"model": "m", "dataset": "d.jsonl", "stage": "grpo", "eval_dataset": "e.jsonl",
                            "graders": [{"type": "length", "max_chars": 3}]})  # fmt: skip

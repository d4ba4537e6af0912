"""Scores answers with declared graders: each grader gives 0-1, a row's score is their weighted mean.

Written here: TRL takes reward functions but has no declarative graders (OpenAI's reinforcement fine-tuning has
them as a service). The checks themselves come from libraries: `regex` (searches with a timeout, so a pattern that
backtracks catastrophically is stopped, not hung on), `jsonschema`, and the ROUGE/BLEU of `models.metrics`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.graders.specs import (
    REGEX_SECONDS,
    JsonGrader,
    LengthGrader,
    PythonGrader,
    RegexGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from lmtuner_core.paths import AllowedRoots

MAX_ANSWER_CHARS = 100_000  # an answer longer than this is scored on its first 100,000 characters
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass
class GraderScore:
    index: int
    type: str
    weight: float
    score: float
    note: str | None = None  # why a check failed or was stopped (e.g. "does not parse as JSON")


@dataclass
class AnswerScore:
    score: float  # the weighted mean, 0-1
    graders: list[GraderScore]


def answer_text(completion: Any) -> str:
    """The text of an answer: a string, or (TRL's conversational completions) the content of its messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, list):
        return "".join(answer_text(m) for m in completion)
    return str(completion)


def _reference(grader: Any, index: int, row: dict, column: str) -> Any:
    if column not in row:
        columns = ", ".join(sorted(map(str, row))) or "none"
        raise LmtunerError(
            f"graders[{index}].reference: the row has no column {shown(column)}; its columns: {columns}",
            field=f"graders[{index}].reference",
        )
    return row[column]


def _string_check(grader: StringCheckGrader, index: int, answer: str, row: dict) -> tuple[float, str | None]:
    expected = str(_reference(grader, index, row, grader.reference))
    if grader.operation == "eq":
        passed = answer.strip() == expected.strip()
    elif grader.operation == "contains":
        passed = expected in answer
    else:
        passed = expected.casefold() in answer.casefold()
    return float(passed), None


def _regex(grader: RegexGrader, index: int, answer: str, row: dict) -> tuple[float, str | None]:
    import regex

    try:
        found = regex.search(grader.pattern, answer, timeout=REGEX_SECONDS)
    except TimeoutError:
        return 0.0, f"the pattern ran past {REGEX_SECONDS} s on this answer (catastrophic backtracking?): scored 0"
    return float(found is not None), None


def parse_json_answer(answer: str) -> Any:
    """The answer as JSON: the whole text, or the inside of a ``` / ```json fence around it. Raises ValueError."""
    text = answer.strip()
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


def _json(grader: JsonGrader, index: int, answer: str, row: dict) -> tuple[float, str | None]:
    checks = 1 + (grader.json_schema is not None) + (grader.reference is not None)
    try:
        value = parse_json_answer(answer)
    except (ValueError, RecursionError):
        return 0.0, "does not parse as JSON"
    passed, notes = 1, []
    if grader.json_schema is not None:
        import jsonschema

        error = jsonschema.validators.validator_for(grader.json_schema)(grader.json_schema).iter_errors(value)
        first = next(error, None)
        if first is None:
            passed += 1
        else:
            notes.append(f"does not match the schema ({first.message[:200]})")
    if grader.reference is not None:
        expected = _reference(grader, index, row, grader.reference)
        candidates = [expected]
        if isinstance(expected, str):
            with contextlib.suppress(ValueError):
                candidates.append(json.loads(expected))
        if any(value == c for c in candidates):
            passed += 1
        else:
            notes.append(f"differs from column {grader.reference!r}")
    return passed / checks, "; ".join(notes) or None


def _text_similarity(grader: TextSimilarityGrader, index: int, answer: str, row: dict) -> tuple[float, str | None]:
    from lmtuner_core.models.metrics import similarity

    expected = str(_reference(grader, index, row, grader.reference))
    return similarity(answer, expected, grader.metric), None


def _length(grader: LengthGrader, index: int, answer: str, row: dict) -> tuple[float, str | None]:
    size = len(answer.strip())
    if grader.min_chars is not None and size < grader.min_chars:
        return size / grader.min_chars, f"{size} characters, fewer than min_chars {grader.min_chars}"
    if grader.max_chars is not None and size > grader.max_chars:
        return grader.max_chars / size, f"{size} characters, more than max_chars {grader.max_chars}"
    return 1.0, None


CHECKS: dict[type, Callable[..., tuple[float, str | None]]] = {
    StringCheckGrader: _string_check,
    RegexGrader: _regex,
    JsonGrader: _json,
    TextSimilarityGrader: _text_similarity,
    LengthGrader: _length,
}


def load_python_grader(grader: PythonGrader, index: int, roots: AllowedRoots, trust_remote_code: bool) -> Callable:
    """The user's function, imported from a file inside the roots: only with trust_remote_code (it runs their code)."""
    field = f"graders[{index}].file"
    if not trust_remote_code:
        raise LmtunerError(
            f"graders[{index}]: a python grader runs the code in {shown(grader.file)}; set trust_remote_code: true "
            "if you trust it, or use the declared graders (string_check, regex, json, text_similarity, length)",
            field="trust_remote_code",
        )
    path = roots.resolve(grader.file, field)
    if path.suffix != ".py" or not path.is_file():
        raise LmtunerError(f"{field}: {shown(grader.file)} is not a .py file", field=field)
    spec = importlib.util.spec_from_file_location(f"lmtuner_grader_{index}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise LmtunerError(
            f"{field}: importing {path.name} failed ({type(exc).__name__}: {exc})", field=field
        ) from None
    function = getattr(module, grader.function, None)
    if not callable(function):
        names = sorted(n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_"))
        raise LmtunerError(
            f"graders[{index}].function: {path.name} has no function {shown(grader.function)}; its functions: "
            f"{', '.join(names) or 'none'}",
            field=f"graders[{index}].function",
        )
    return function


def resolved_graders(graders: Sequence[Any] | None, roots: AllowedRoots, trust_remote_code: bool) -> list | None:
    """The graders with each python grader's file resolved inside the roots (absolute, as the training child reads
    it) and present; the file is not imported here (that runs the user's code, in the training process only)."""
    if graders is None:
        return None
    resolved = []
    for i, grader in enumerate(graders):
        if isinstance(grader, PythonGrader):
            if not trust_remote_code:
                load_python_grader(grader, i, roots, trust_remote_code)  # raises: the opt-in is missing
            path = roots.resolve(grader.file, f"graders[{i}].file")
            if path.suffix != ".py" or not path.is_file():
                raise LmtunerError(f"graders[{i}].file: {shown(grader.file)} is not a .py file",
                                   field=f"graders[{i}].file")  # fmt: skip
            grader = grader.model_copy(update={"file": str(path)})
        resolved.append(grader)
    return resolved


class GraderSet:
    """Declared graders made ready to score: python graders imported (with the opt-in), references checked per row."""

    def __init__(self, graders: Sequence[Any], roots: AllowedRoots, trust_remote_code: bool = False):
        if not graders:
            raise LmtunerError("graders: give at least one grader", field="graders")
        self.graders = list(graders)
        self.functions: dict[int, Callable] = {
            i: load_python_grader(g, i, roots, trust_remote_code)
            for i, g in enumerate(self.graders)
            if isinstance(g, PythonGrader)
        }
        self.total_weight = sum(g.weight for g in self.graders)

    def _python(self, index: int, answer: str, row: dict) -> tuple[float, str | None]:
        grader = self.graders[index]
        try:
            value = self.functions[index](answer, dict(row))
        except Exception as exc:
            raise LmtunerError(
                f"graders[{index}] ({Path(grader.file).name}:{grader.function}) raised {type(exc).__name__}: {exc}",
                field=f"graders[{index}]",
            ) from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
            raise LmtunerError(
                f"graders[{index}] ({Path(grader.file).name}:{grader.function}) returned {shown(value)}; a grader "
                "returns a number from 0 to 1",
                field=f"graders[{index}]",
            )
        return float(value), None

    def score(self, completion: Any, row: dict) -> AnswerScore:
        """The answer's weighted mean score over the graders, with each grader's part."""
        answer = answer_text(completion)[:MAX_ANSWER_CHARS]
        parts = []
        for i, grader in enumerate(self.graders):
            check = self._python if isinstance(grader, PythonGrader) else None
            value, note = check(i, answer, row) if check else CHECKS[type(grader)](grader, i, answer, row)
            parts.append(GraderScore(i, grader.type, grader.weight, round(value, 6), note))
        total = sum(p.score * p.weight for p in parts) / self.total_weight
        return AnswerScore(round(total, 6), parts)

    def reward_function(self) -> Callable[..., list[float]]:
        """A TRL reward function: (prompts, completions, **columns) -> one score per completion. Each completion's
        row is rebuilt from the columns TRL passes for it (the dataset's own, reference columns included)."""

        def graders(prompts: list, completions: list, **columns: Any) -> list[float]:
            data = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            return [
                self.score(completion, {k: v[i] for k, v in data.items()}).score
                for i, completion in enumerate(completions)
            ]

        return graders

"""The graders a TrainConfig (or test_grader) declares: what each checks in an answer, as pydantic models.

Import-light (pydantic, and `regex` / `jsonschema` only to check a pattern or schema when one is given): the config
schema and the server read these. Scoring is in `scoring`. A row's score is the weighted mean of its graders' scores,
each in [0, 1].
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator, model_validator

from lmtuner_core.errors import shown

REGEX_SECONDS = 0.25  # one answer against one pattern; a sane pattern takes microseconds
MAX_PATTERN_CHARS = 2000


class _Grader(BaseModel):
    # As config.StrictModel (which this module cannot import: config imports it): unknown keys are named.
    model_config = ConfigDict(
        extra="forbid", hide_input_in_errors=True, allow_inf_nan=False, validate_by_name=True, serialize_by_alias=True
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = [field.alias or name for name, field in cls.model_fields.items()]
            for key in data:
                if key not in accepted and key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), accepted, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown key {shown(key)}{hint}; accepted keys: {', '.join(accepted)}")
        return data

    weight: float = Field(
        1.0, gt=0.0, le=1000.0, description="Share of this grader in the row's weighted mean. Example: 1."
    )


class StringCheckGrader(_Grader):
    """1 when the answer relates to the row's reference as `operation` says, else 0."""

    type: Literal["string_check"] = Field(description="'string_check'.")
    reference: str = Field(
        min_length=1, max_length=200, description="The row's column holding the expected text. Example: 'answer'."
    )
    operation: Literal["eq", "contains", "icontains"] = Field(
        description="eq: the answer (trimmed) equals the reference (trimmed); contains: the answer contains it; "
        "icontains: the same ignoring case. Example: 'eq'."
    )


class RegexGrader(_Grader):
    """1 when the pattern matches somewhere in the answer (anchor with ^…$ for the whole answer), else 0."""

    type: Literal["regex"] = Field(description="'regex'.")
    pattern: str = Field(
        min_length=1,
        max_length=MAX_PATTERN_CHARS,
        description="A regular expression (Python syntax), searched in the answer; each search is stopped after "
        f"{REGEX_SECONDS} s (scored 0). Example: '^Answer: \\\\d+$'.",
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import regex  # the `regex` engine: same syntax as `re`, and a search can be given a timeout

        try:
            regex.compile(value)
        except regex.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}); Python `re` syntax is accepted") from None
        return value


class JsonGrader(_Grader):
    """The share of its checks the answer passes: it parses as JSON, matches `schema` (when given), equals the row's
    `reference` column (when given). An answer that does not parse scores 0."""

    type: Literal["json"] = Field(description="'json'.")
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON Schema the parsed answer must match. Example: {'type': 'object', 'required': ['name']}.",
    )
    reference: str | None = Field(
        None, min_length=1, max_length=200, description="A column whose value (JSON text or a value) the parsed "
        "answer must equal. Example: 'expected'.",
    )  # fmt: skip

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        try:
            import jsonschema
        except ImportError:
            raise ValueError("checking a JSON Schema needs the `jsonschema` package (pip install jsonschema)") from None
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema ({exc.message})") from None
        return value


class TextSimilarityGrader(_Grader):
    """ROUGE-L F1 or sentence BLEU (0-1) of the answer against the row's reference column, on words as `evaluate`
    counts them."""

    type: Literal["text_similarity"] = Field(description="'text_similarity'.")
    reference: str = Field(
        min_length=1, max_length=200, description="The row's column holding the reference text. Example: 'answer'."
    )
    metric: Literal["rouge_l", "bleu"] = Field(description="rouge_l (ROUGE-L F1) or bleu (sentence BLEU / 100).")


class LengthGrader(_Grader):
    """1 when the answer's length (characters, trimmed) is within the bounds; below min_chars it scores
    length / min_chars, above max_chars max_chars / length (a slope a policy can climb, not a cliff)."""

    type: Literal["length"] = Field(description="'length'.")
    min_chars: int | None = Field(None, ge=0, le=10_000_000, description="Shortest answer scored 1. Example: 1.")
    max_chars: int | None = Field(None, ge=1, le=10_000_000, description="Longest answer scored 1. Example: 40.")

    @model_validator(mode="after")
    def _bounds(self) -> LengthGrader:
        if self.min_chars is None and self.max_chars is None:
            raise ValueError("give min_chars, max_chars or both")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self


class PythonGrader(_Grader):
    """`function(answer: str, row: dict) -> float` in [0, 1] from a Python file inside the allowed folders. It runs
    your code, so it needs `trust_remote_code: true`; the file is loaded only then."""

    type: Literal["python"] = Field(description="'python'.")
    file: str = Field(min_length=1, max_length=4096, description="A .py file inside the allowed folders. "
                      "Example: 'graders/score.py'.")  # fmt: skip
    function: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The function's name in that file. Example: 'score'.",
    )  # fmt: skip


GRADER_CLASSES = (StringCheckGrader, RegexGrader, JsonGrader, TextSimilarityGrader, LengthGrader, PythonGrader)
GRADER_TYPES = tuple(cls.model_fields["type"].annotation.__args__[0] for cls in GRADER_CLASSES)
Grader = Annotated[
    StringCheckGrader | RegexGrader | JsonGrader | TextSimilarityGrader | LengthGrader | PythonGrader,
    Field(discriminator="type"),
]


def _grader_message(error: dict) -> str:
    """`graders[1].operation: …` — the list index in brackets and pydantic's union tag left out of the path."""
    loc = list(error["loc"])
    index = loc.pop(0) if loc and isinstance(loc[0], int) else None
    if loc and loc[0] in GRADER_TYPES:
        loc.pop(0)
    where = "graders" + (f"[{index}]" if index is not None else "") + "".join(f".{part}" for part in loc)
    kind = error["type"]
    if kind == "union_tag_invalid":
        return f"{where}.type: unknown grader type {error['ctx']['tag']!r}; accepted: {', '.join(GRADER_TYPES)}"
    if kind == "union_tag_not_found":
        return f"{where}.type: missing; every grader names its type, one of {', '.join(GRADER_TYPES)}"
    if kind == "model_attributes_type" or kind == "model_type":
        return f"{where}: must be an object such as {{'type': 'regex', 'pattern': '^\\\\d+$'}}"
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def _graders_named(value: Any, handler: Any) -> Any:
    try:
        graders = handler(value)
    except ValidationError as exc:
        lines = [_grader_message(e) for e in exc.errors(include_url=False, include_input=False)]
        raise ValueError("; ".join(lines)) from None
    if not graders:
        raise ValueError("give at least one grader, e.g. [{'type': 'length', 'max_chars': 40}]")
    return graders


GraderList = Annotated[list[Grader], WrapValidator(_graders_named)]


def check_python_opt_in(graders: list | None, trust_remote_code: bool) -> None:
    """A python grader runs the user's file: refused unless trust_remote_code is on."""
    for i, grader in enumerate(graders or []):
        if isinstance(grader, PythonGrader) and not trust_remote_code:
            raise ValueError(
                f"graders[{i}]: a python grader runs the code in {grader.file!r}; set trust_remote_code: true if you "
                "trust it, or use the declared graders (string_check, regex, json, text_similarity, length)"
            )

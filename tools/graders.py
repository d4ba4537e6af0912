"""test_grader: score sample answers with graders before training with them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from lmtuner_core.config import DatasetSpec, dataset_spec
from lmtuner_core.errors import LmtunerError
from lmtuner_core.graders.specs import GraderList
from tools.context import ToolContext

MAX_ANSWERS = 1000


class GraderPart(BaseModel):
    index: int = Field(description="The grader's place in `graders` (0-based).")
    type: str = Field(description="The grader's type. Example: 'regex'.")
    weight: float = Field(description="Its weight in the answer's mean.")
    score: float = Field(description="What it gave this answer, 0-1.")
    note: str | None = Field(None, description="Why it gave less than 1, where it can say (e.g. 'does not parse').")


class GradedAnswer(BaseModel):
    answer: str = Field(description="The answer scored.")
    score: float = Field(description="The weighted mean of the graders' scores, 0-1: the reward GRPO would give.")
    graders: list[GraderPart] = Field(description="Each grader's score of this answer.")


class TestGraderResult(BaseModel):
    results: list[GradedAnswer] = Field(description="One per answer, in order.")
    mean_score: float = Field(description="Mean of the answers' scores, 0-1.")
    rows_from: str = Field(description="Where each answer's row (its reference columns) came from.")


def test_grader(
    ctx: ToolContext,
    graders: Annotated[
        GraderList,
        Field(
            description="Graders as in TrainConfig.graders. Example: [{'type': 'string_check', 'reference': "
            "'answer', 'operation': 'eq'}, {'type': 'length', 'max_chars': 12, 'weight': 0.5}]."
        ),
    ],
    answers: Annotated[
        list[str],
        Field(min_length=1, max_length=MAX_ANSWERS, description="Sample answers to score. Example: ['2021-03-04']."),
    ],
    row: Annotated[
        dict[str, Any] | None,
        Field(
            description="The row every answer is scored against (its reference columns). Example: {'prompt': "
            "'Write 4 March 2021 as YYYY-MM-DD', 'answer': '2021-03-04'}."
        ),
    ] = None,
    dataset: Annotated[
        str | DatasetSpec | None,
        Field(
            description="Instead of `row`: a prompts file (GRPO rows); answer i is scored against row i. "
            "Example: 'data/prompts.jsonl'."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, Field(description="Allow python graders to run (their file must be inside the allowed folders).")
    ] = False,
) -> TestGraderResult:
    """Score sample answers with graders, as GRPO would reward them, before spending a training run on them: each
    answer's weighted score and every grader's part (with why it gave less). Give `row` (one row for all answers)
    or `dataset` (answer i against row i); graders with a `reference` read that column of the row. Changes
    nothing."""
    from lmtuner_core.data.prompt_rows import load_prompt_rows
    from lmtuner_core.graders.scoring import GraderSet

    if row is not None and dataset is not None:
        raise LmtunerError("row: give `row` or `dataset`, not both", field="row")
    if dataset is not None:
        spec = dataset_spec(dataset)
        loaded = load_prompt_rows(spec.model_copy(update={"max_rows": len(answers)}), ctx.roots, graders)
        if len(loaded.rows) < len(answers):
            raise LmtunerError(
                f"answers: {len(answers)} answers for {len(loaded.rows)} rows of {loaded.label}; answer i is scored "
                "against row i, so give at most as many answers as rows",
                field="answers",
            )
        rows, source = loaded.rows, f"rows 1-{len(answers)} of {loaded.label}"
    else:
        rows, source = [row or {}] * len(answers), "the given row" if row is not None else "no row (empty)"
    grader_set = GraderSet(graders, ctx.roots, trust_remote_code)
    results = []
    for answer, answer_row in zip(answers, rows, strict=False):
        scored = grader_set.score(answer, answer_row)
        parts = [GraderPart(**vars(part)) for part in scored.graders]
        results.append(GradedAnswer(answer=answer, score=scored.score, graders=parts))
    mean = round(sum(r.score for r in results) / len(results), 6)
    return TestGraderResult(results=results, mean_score=mean, rows_from=source)

"""How a result report scores an answer against its reference: one metric per held-out set, chosen from the
references themselves and stated with its reason, so the user knows what "better" meant."""

from __future__ import annotations

import json
import re
import statistics
from typing import Literal

Metric = Literal["exact_match", "json", "rouge_l"]
# Answers this short are right or wrong as a whole (a city, a label, a date); longer ones are compared by overlap.
SHORT_ANSWER_WORDS = 8
_TRAILING = re.compile(r"[\s.!。]+$")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def _json_value(text: str) -> object | None:
    """The JSON object or array a text holds (a Markdown code fence around it is allowed), else None."""
    try:
        value = json.loads(_FENCE.sub("", text.strip()))
    except ValueError:
        return None
    return value if isinstance(value, dict | list) else None


def choose_metric(references: list[str]) -> tuple[Metric, str]:
    """(metric, why) for a set of reference answers."""
    if references and all(_json_value(r) is not None for r in references):
        return "json", "every reference answer is JSON: an answer counts when it parses and equals the reference"
    lengths = [len(r.split()) for r in references] or [0]
    median = statistics.median(lengths)
    if median <= SHORT_ANSWER_WORDS:
        return "exact_match", (
            f"short reference answers (median {median:g} words): an answer counts when it equals the reference, "
            "ignoring case, surrounding spaces and a final period"
        )
    return "rouge_l", (
        f"long reference answers (median {median:g} words): ROUGE-L F1 on words (rouge-score), 0 to 1 per answer"
    )


def normalized(text: str) -> str:
    """Case, surrounding white space and a closing period do not make a short answer wrong."""
    return _TRAILING.sub("", text.strip()).casefold()


def score_answer(metric: Metric, prediction: str, reference: str) -> float:
    """The answer's score, 0 to 1."""
    if metric == "exact_match":
        return float(normalized(prediction) == normalized(reference))
    if metric == "json":
        value = _json_value(prediction)
        return float(value is not None and value == _json_value(reference))
    from rouge_score import rouge_scorer  # imported where used: only long answers need it

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def is_right(metric: Metric, value: float) -> bool:
    """Whether a score counts as a right answer (for regressions): a match, or half the reference's words."""
    return value >= (0.5 if metric == "rouge_l" else 1.0)

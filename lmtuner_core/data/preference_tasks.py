"""Preference pairs made from the recipe study's tasks (`study_tasks`), for the preference stages' tests and bench:
the chosen answer is the task's correct, concise answer; the rejected one is what the base model gets wrong.

- `dates_iso`: "Write this date in ISO 8601 form: the eleventh of July, 1984" — chosen "1984-07-11", rejected the
  date copied back as written ("the eleventh of July, 1984"), which is what SmolLM2-135M-Instruct mostly does and
  what it prefers by log-probability on 26 of the 32 held-out pairs.
- `classify`: a customer message — chosen its label, rejected another label (drawn with the seed).

Held-out pairs come from the task's test rows (dates and message templates never used in training). Stdlib only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmtuner_core.data.study_tasks import CLASSIFY_LABELS, TASKS
from lmtuner_core.errors import LmtunerError


def _echo(prompt: str, answer: str, rng: random.Random) -> str:
    return prompt.split(": ", 1)[1]  # the written date, as given


def _other_label(prompt: str, answer: str, rng: random.Random) -> str:
    return rng.choice([label for label in CLASSIFY_LABELS if label != answer])


REJECTED = {"dates_iso": _echo, "classify": _other_label}


def preference_pairs(task: str, size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs in TRL's conversational form: `size` training pairs of `task`, and its test pairs."""
    if task not in REJECTED:
        raise LmtunerError(f"task: no preference pairs for {task!r}; choose one of {', '.join(REJECTED)}", field="task")
    train, test = TASKS[task].rows(size, seed)
    rng = random.Random(f"{task}-pairs-{seed}")

    def pair(row: dict) -> dict:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        return {
            "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": REJECTED[task](user, answer, rng)}],
        }

    return [pair(row) for row in train], [pair(row) for row in test]


def write_preference_task(task: str, size: int, folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes folder/train.jsonl and folder/test.jsonl (one pair a line); returns the two paths."""
    train, test = preference_pairs(task, size, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return paths

"""What the base model is asked for self-distillation replay (TrainConfig `replay`): lmtuner's own prompts, written
to share no fact with the retention probe, so replay cannot teach the probe's answers.

Two sets: `replay_prompts.jsonl`, general requests answered at length (explain, describe, advise, ...), and
`replay_questions.jsonl`, short general-knowledge questions (a river, a plural, a sum) that the base model answers
in a sentence. A short-answer task teaches the model to answer tersely; the questions keep it answering other
short questions as it did (docs/TUNING.md measures both).
"""

from __future__ import annotations

import json
import random
from functools import cache
from importlib import resources
from typing import Literal

ReplayPrompts = Literal["requests", "questions", "mixed"]
FILES = {"requests": "replay_prompts.jsonl", "questions": "replay_questions.jsonl"}


@cache
def _prompts(name: str) -> tuple[str, ...]:
    text = resources.files("lmtuner_core.data").joinpath(FILES[name]).read_text(encoding="utf-8")
    return tuple(json.loads(line)["prompt"] for line in text.splitlines() if line.strip())


def load_replay_prompts(seed: int, kind: ReplayPrompts = "requests") -> list[str]:
    """Every prompt of a set, in an order drawn with the job's seed (a job takes the first ones it needs);
    'mixed' alternates a request and a question."""
    if kind == "mixed":
        requests, questions = load_replay_prompts(seed, "requests"), load_replay_prompts(seed, "questions")
        alternated = [p for pair in zip(questions, requests, strict=False) for p in pair]
        longer = requests if len(requests) > len(questions) else questions
        return alternated + longer[min(len(requests), len(questions)) :]
    prompts = list(_prompts(kind))
    random.Random(seed).shuffle(prompts)
    return prompts

"""General requests whose base-model answers are mixed into training rows (TrainConfig `replay`): lmtuner's own,
written to share no fact with the retention probe, so replay cannot teach the probe's answers."""

from __future__ import annotations

import json
import random
from functools import cache
from importlib import resources


@cache
def _prompts() -> tuple[str, ...]:
    text = resources.files("lmtuner_core.data").joinpath("replay_prompts.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line)["prompt"] for line in text.splitlines() if line.strip())


def load_replay_prompts(seed: int) -> list[str]:
    """Every replay prompt, in an order drawn with the job's seed (a job takes the first ones it needs)."""
    prompts = list(_prompts())
    random.Random(seed).shuffle(prompts)
    return prompts

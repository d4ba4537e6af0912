"""Preference stages end to end on the tiny model: every stage trains through the tool functions, reports its
reward metrics to job_status, and writes a report of preference accuracy; bad rows are named."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.stages import STAGES
from tests.helpers import quick_config
from tools import training
from tools.context import ToolContext

WORDS = ["cat", "dog", "house", "bread", "tree", "car", "book", "water", "sun", "moon", "fish", "bird"]


def pair_rows(n: int = 48, conversational: bool = True) -> list[dict]:
    """Pairs over a toy task: the chosen answer repeats the word, the rejected one names another."""
    rows = []
    for i in range(n):
        word, other = WORDS[i % len(WORDS)], WORDS[(i + 5) % len(WORDS)]
        prompt, good, bad = f"Repeat the word {word}.", f"{word}", f"{other} {other}"
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})  # fmt: skip
        else:
            rows.append({"prompt": prompt + " ", "chosen": good, "rejected": bad})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_job(ctx: ToolContext, config: dict, timeout: float = 300):
    started = training.start_training(ctx, parse_train_config(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = training.job_status(ctx, started.job_id, wait_seconds=10, log_lines=40)
        if status.status in ("completed", "failed", "cancelled"):
            return status
    raise AssertionError(f"job did not finish: {status}")


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto", "reward"])
def test_each_preference_stage_trains_and_reports(stage, tiny_model, lmtuner_home, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    config = quick_config(tiny_model, {"path": str(data), "eval_fraction": 0.25}, stage=stage, max_steps=6,
                          eval_steps=3)  # fmt: skip
    final = run_job(ctx, config)
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    records = [json.loads(line) for line in Path(final.run_dir, "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 6
    for key in STAGES[stage].progress_keys:  # TRL's reward metrics, under lmtuner's names, on every logged step
        assert all(key in r for r in trained), (key, trained[0])
    assert any("eval_rewards_margin" in r for r in records if "eval_loss" in r)
    report = json.loads(Path(final.run_dir, "report.json").read_text())
    assert report["metric"] == "preference_accuracy" and report["held_out_rows"] == 12
    assert 0.0 <= report["base"] <= 1.0 and 0.0 <= report["tuned"] <= 1.0
    marker = json.loads(Path(final.output_dir, "lmtuner_artifact.json").read_text())
    assert marker["stage"] == stage

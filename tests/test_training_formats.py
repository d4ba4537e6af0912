"""One real training run per data format, through the same tool functions the server registers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.paths import AllowedRoots
from tests.helpers import quick_config, read_losses
from tools import training
from tools.context import ToolContext


def run_job(ctx: ToolContext, config: dict, timeout: float = 240):
    started = training.start_training(ctx, parse_train_config(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = training.job_status(ctx, started.job_id, wait_seconds=10, log_lines=30)
        if status.status in ("completed", "failed", "cancelled"):
            return status
    raise AssertionError(f"job did not finish: {status}")


def alpaca_with_input_and_system(folder: Path) -> Path:
    rows = [
        {
            "system": "You translate short phrases.",
            "instruction": "Translate to French.",
            "input": word,
            "output": french,
            "history": [["Say hello.", "Bonjour."]],
        }
        for word, french in [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("bread", "pain")] * 8
    ]
    path = folder / "alpaca_input_system.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


FORMATS = {
    # name: (dataset spec builder, expected detected format)
    "alpaca": (lambda d, t: {"path": str(d / "llamafactory/alpaca_en_demo.json"), "max_rows": 32}, "alpaca"),
    "alpaca-input-system": (lambda d, t: str(alpaca_with_input_and_system(t)), "alpaca"),
    "sharegpt-tools": (
        lambda d, t: {"path": str(d / "llamafactory/glaive_toolcall_en_demo.json"), "max_rows": 32},
        "sharegpt",
    ),
    "messages": (None, "messages"),
    "text": (lambda d, t: {"path": str(d / "llamafactory/c4_demo.jsonl"), "max_rows": 32}, "text"),
    "dataset-info-entry": (
        lambda d, t: {"name": "identity", "dataset_dir": str(d / "llamafactory"), "max_rows": 32},
        "alpaca",
    ),
    "lmtuner-medical": (lambda d, t: {"path": str(d / "lmtuner-medical/train.jsonl"), "max_rows": 32}, "alpaca"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_trains(name, tiny_model, shared_data, lmtuner_home, tmp_path):
    build, expected_format = FORMATS[name]
    if build is None:
        from lmtuner_core.data.sample_data import write_demo_dataset

        dataset = str(write_demo_dataset(tmp_path / "demo.jsonl", n=32))
    else:
        dataset = build(shared_data, tmp_path)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, shared_data, tiny_model]))
    final = run_job(ctx, quick_config(tiny_model, dataset, max_steps=6))
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    state = json.loads(Path(final.run_dir, "state.json").read_text())
    assert state["data_format"] == expected_format
    assert state["train_rows"] == 32 and state["skipped_rows"] == 0
    losses = read_losses(final.run_dir)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert Path(final.output_dir, "adapter_model.safetensors").is_file()

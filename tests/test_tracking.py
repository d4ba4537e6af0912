"""report_to: TensorBoard event files land in the run folder; a tracker whose package is missing is refused."""

from __future__ import annotations

import importlib.util
import time

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.sample_data import write_demo_dataset
from tests.helpers import quick_config
from tools import training
from tools.context import ToolContext


def test_tensorboard_events_are_written_into_the_run_folder(tiny_model, tmp_path, lmtuner_home):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    job = training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, max_steps=4,
                                                                        report_to="tensorboard")))  # fmt: skip
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        time.sleep(0.1)
    assert status.status == "completed", status.error
    event_files = list((lmtuner_home / "runs" / job.job_id / "tensorboard").rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 4


def test_a_tracker_that_is_not_installed_is_refused(tiny_model, tmp_path, lmtuner_home):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=4)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    with pytest.raises(LmtunerError, match=r"report_to: 'wandb' needs the wandb package \(pip install wandb\)"):
        training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, report_to=["wandb"])))

"""report_to: TensorBoard event files and offline wandb runs land in the run folder, each tracker gets settings only
when asked for, the wandb key never reaches a file or tool output, and a missing tracker package is refused."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.service import tracker_environment
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.run import RunDir
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


PLANTED_KEY = "planted-wandb-secret-0123456789"
WANDB_PLACES = {"WANDB_DIR", "WANDB_NAME", "WANDB_PROJECT", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"}


@pytest.mark.parametrize(
    ("report_to", "env", "expected"),
    [
        ([], {}, set()),
        (["tensorboard"], {}, {"TENSORBOARD_LOGGING_DIR"}),
        (["wandb"], {}, {*WANDB_PLACES, "WANDB_MODE"}),
        (["wandb"], {"WANDB_API_KEY": PLANTED_KEY}, WANDB_PLACES),
    ],
)
def test_each_tracker_is_configured_only_when_asked_for(tmp_path, report_to, env, expected):
    run = RunDir(tmp_path / "20261129-000000-abcd")
    run.root.mkdir()
    run.config.write_text(json.dumps({"report_to": report_to}))
    extra = tracker_environment(run, env)
    assert set(extra) == expected
    assert all(value.startswith(str(run.root)) for key, value in extra.items() if key.endswith("DIR"))
    assert extra.get("WANDB_MODE") == ("offline" if "wandb" in report_to and not env else None)
    assert PLANTED_KEY not in json.dumps(extra)


def test_wandb_offline_run_lands_in_the_run_folder_and_the_key_goes_nowhere(
    tiny_model, tmp_path, lmtuner_home, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", PLANTED_KEY)  # the server's environment, inherited by the job
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here; with a key and no mode it would sync online
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    job = training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, max_steps=3,
                                                                        report_to=["wandb"])))  # fmt: skip
    outputs = [job.model_dump_json()]
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        outputs.append(status.model_dump_json())
    outputs.append(status.model_dump_json())
    assert status.status == "completed", status.error

    run_dir = lmtuner_home / "runs" / job.job_id
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, sorted(p.name for p in run_dir.rglob("*"))
    assert list(offline_runs[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`
    checked = [run_dir / "config.json", run_dir / "train.log", run_dir / "metrics.jsonl"]
    checked += [path for path in (run_dir / "wandb").rglob("*") if path.is_file()]
    for path in checked:
        assert PLANTED_KEY.encode() not in path.read_bytes(), path
    assert all(PLANTED_KEY not in output for output in outputs)

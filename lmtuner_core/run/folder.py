"""A job's run folder, every file in it named once with its reader and writer. The server, the supervisor, the
training processes and any backend's entry point (a Ray driver, a Slurm task) all read and write it, so this
module uses the standard library only (the supervisor imports nothing else)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# In a trained artifact's folder (not the run folder): base model, method, adapter or not, RoPE and xPos settings.
ARTIFACT_MARKER = "lmtuner_artifact.json"
DEEPSPEED_FILE = "deepspeed.json"  # in the run folder: the DeepSpeed JSON a DeepSpeed job trains with
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint: the checkpoint is complete


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Replaces `path` in one step, so a reader sees the old file or the new one, never half of one. The temporary
    name carries the pid: two processes (a supervisor and its child) may write the same file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The file's JSON, or None when it is missing or unreadable (not written yet, or caught mid-replace on a
    filesystem without atomic rename)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunDir:
    """The files of one job: written by the training child and its supervisor, read by the server."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved TrainConfig the job runs."""
        return self.root / "config.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        """One JSON line per logged step."""
        return self.root / "metrics.jsonl"

    @property
    def estimate(self) -> Path:
        """The time estimate made when the job was submitted (JobCost of lmtuner_core.planning.throughput)."""
        return self.root / "estimate.json"

    @property
    def state(self) -> Path:
        """Status, phase and step, written by the training process (see StateFile)."""
        return self.root / "state.json"

    @property
    def exit(self) -> Path:
        """How the training process ended (exit code or signal), written by its supervisor."""
        return self.root / "exit.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def default_output(self) -> Path:
        return self.root / "final"

    def checkpoint_folders(self) -> list[Path]:
        """The Trainer's checkpoint folders (checkpoint-STEP), complete or not, oldest step first."""
        return sorted(
            (p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir()),
            key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else 0,
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one the Trainer finished writing: it has trainer_state.json)."""
        return newest_checkpoint(self.checkpoints.glob("checkpoint-*"))

    def read_state(self) -> dict:
        state = read_json(self.state)
        return state if isinstance(state, dict) else {}

    def write_state(self, state: dict) -> None:
        write_json_atomic(self.state, state)

    def read_exit_code(self) -> int | None:
        """The training process's exit code (negative: killed by that signal), once its supervisor wrote it."""
        ended = read_json(self.exit)
        try:
            return int(ended["returncode"])
        except (TypeError, KeyError, ValueError):
            return None

    def write_exit(self, returncode: int, signal_name: str | None) -> None:
        write_json_atomic(self.exit, {"returncode": returncode, "signal": signal_name, "ended_at": time.time()})

    def record_failure(self, rank: int, error: str) -> None:
        """A process other than the one writing state.json leaves its reason for the supervisor to report."""
        with contextlib.suppress(OSError):
            write_json_atomic(self.root / f"failure-rank-{rank}.json", {"rank": rank, "error": error})

    def failures(self) -> list[str]:
        """'rank N: reason' for each process that recorded a failure, by rank."""
        reasons = []
        for path in sorted(self.root.glob("failure-rank-*.json")):
            failure = read_json(path)
            if isinstance(failure, dict) and "rank" in failure and "error" in failure:
                reasons.append(f"rank {failure['rank']}: {failure['error']}")
        return reasons


def checkpoint_step(path: Path) -> int | None:
    """The training step of a complete Hugging Face checkpoint folder (its trainer_state.json's global_step, else
    the STEP of its checkpoint-STEP name); None when the Trainer has not finished writing it."""
    if not (path / TRAINER_STATE).is_file():
        return None
    step = path.name.removeprefix("checkpoint-")
    if step.isdigit():
        return int(step)
    state = read_json(path / TRAINER_STATE)
    try:
        return int(state.get("global_step", 0))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None  # not finished


def newest_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The complete checkpoint of the highest step among `folders` (the Trainer's checkpoint-STEP folders, or the
    checkpoint folders a cluster backend kept), or None. Every reader of checkpoints finds them here."""
    found = [(step, str(path)) for path in folders if (step := checkpoint_step(path)) is not None]
    return Path(max(found)[1]) if found else None


def run_dir_argument(argv: list[str], module: str) -> RunDir | None:
    """The run folder named by the one argument of a job's entry point (`python -m MODULE RUN_DIR`), or None
    after printing the usage."""
    if len(argv) != 1:
        print(f"usage: python -m {module} RUN_DIR", file=sys.stderr)
        return None
    return RunDir(Path(argv[0]).resolve())


class StateFile:
    """The training process's view of state.json: kept in memory, written atomically. With several processes only
    the first process of each node writes it (enabled=False elsewhere: the values are kept, not written)."""

    def __init__(self, run: RunDir, enabled: bool = True):
        self.run = run
        self.enabled = enabled
        self.data: dict = {"status": "running", "phase": "starting", "step": 0, "pid": os.getpid()}
        self._last_write = 0.0

    def update(self, *, force: bool = True, **values) -> None:
        self.data.update(values)
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        self.data["updated_at"] = time.time()
        self.run.write_state(self.data)

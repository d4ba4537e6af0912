"""Jobs: check a config, start its training child, and read back what the child wrote.

The server never trains. `submit` spawns `python -m lmtuner_core.train RUN_DIR` in its own session (process
group) and returns; the child writes `state.json` and `metrics.jsonl`; `refresh` reconciles the SQLite
record with the child's files and the process table whenever someone asks.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

from lmtuner_core.config import TrainConfig
from lmtuner_core.data import load_examples, resolve_dataset
from lmtuner_core.errors import LmtunerError, NotFoundError
from lmtuner_core.methods import METHODS
from lmtuner_core.paths import AllowedRoots, RunDir, check_job_id
from lmtuner_core.store import STATUSES, TERMINAL, JobRecord, JobStore

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Popen handles of children this process started, so their exit codes are collected (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobProgress(BaseModel):
    """What a job is doing, as read from the job store and its run folder."""

    job_id: str = Field(description="The job's id. Example: '20261128-215012-a3f9'.")
    status: str = Field(description="queued | running | completed | failed | cancelled.")
    phase: str | None = Field(None, description="What a running job is doing: loading, tokenizing, training, saving.")
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Passes over the data so far (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    learning_rate: float | None = Field(None, description="Latest learning rate.")
    tokens_per_second: float | None = Field(None, description="Non-padding tokens trained per second, recently.")
    elapsed_seconds: float | None = Field(None, description="Seconds since the job started running.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to finish, from the step rate so far.")
    eval_loss: float | None = Field(None, description="Latest loss on the held-out rows, if any.")
    output_dir: str = Field(description="Where the final adapter or model is (or will be) written.")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint folders kept so far.")
    error: str | None = Field(None, description="Why the job failed, with what to change.")
    log_tail: list[str] | None = Field(None, description="Last lines of train.log.")
    run_dir: str = Field(description="The job's folder: config.json, train.log, metrics.jsonl, checkpoints/.")
    model: str = Field(description="Base model of the job.")
    method: str = Field(description="Training method of the job.")
    created_at: float = Field(description="When the job was submitted (Unix time).")


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# ---------------------------------------------------------------------------------------------- checking


def resolve_model(value: str, roots: AllowedRoots, field: str = "model") -> str:
    """A local model folder (absolute path returned) or a hub id (returned as is)."""
    local = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
    if not local:
        if HUB_ID.match(value) and ".." not in value:
            return value
        raise LmtunerError(
            f"{field}: {value!r} is neither an existing folder nor a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'",
            field=field,
        )
    path = roots.resolve(value, field)
    if not path.is_dir():
        raise LmtunerError(f"{field}: folder {value!r} not found (resolved to {path})", field=field)
    if not (path / "config.json").is_file():
        raise LmtunerError(
            f"{field}: folder {path} has no config.json, so it is not a Hugging Face model folder; point to the "
            "folder that save_pretrained wrote (config.json + weights), e.g. one made by `lmtuner make-tiny-model DIR`",
            field=field,
        )
    return str(path)


def check_config(config: TrainConfig, roots: AllowedRoots, run_dir: RunDir) -> tuple[TrainConfig, list[str]]:
    """Resolves every path (inside the allowed roots) and reads the data once, so a bad job is refused before
    a process is spent on it. Returns the config as the child will see it, and warnings."""
    method = METHODS[config.method]
    if method.not_yet:
        raise LmtunerError(
            f"method: {config.method!r} is not available in this version: {method.not_yet}", field="method"
        )
    for key in ("deepspeed", "rope_scaling"):
        if getattr(config, key) is not None:
            raise LmtunerError(f"{key}: not available in this version yet; remove it from the config", field=key)
    warnings: list[str] = []
    updates: dict = {"model": resolve_model(config.model, roots)}
    if config.model == updates["model"] and not config.model.startswith("/"):
        warnings.append(f"model {config.model!r} is a hub id: the training process downloads it unless it is cached")
    source = resolve_dataset(config.dataset, roots)
    loaded = load_examples(config.dataset, roots, source)
    if loaded.skipped:
        warnings.append(f"{len(loaded.skipped)} malformed rows will be skipped; first: {loaded.skipped[0]}")
    spec = config.dataset
    if source.registry_dir is not None:  # a dataset_info.json entry: the child looks it up the same way
        dataset = spec.model_copy(
            update={"name": spec.name or spec.path, "path": None, "dataset_dir": str(source.registry_dir)}
        )
    else:
        dataset = spec.model_copy(update={"path": str(roots.resolve(spec.path or "", "dataset.path"))})
    updates["dataset"] = dataset
    output = roots.resolve(config.output_dir, "output_dir") if config.output_dir else run_dir.default_output
    if output.exists() and any(output.iterdir()):
        raise LmtunerError(
            f"output_dir: {output} already holds files; choose an empty or new folder (nothing is overwritten)",
            field="output_dir",
        )
    updates["output_dir"] = str(output)
    if config.resume_from:
        resume = roots.resolve(config.resume_from, "resume_from")
        if not resume.is_dir():
            raise LmtunerError(f"resume_from: checkpoint folder {resume} not found", field="resume_from")
        updates["resume_from"] = str(resume)
    checked = config.model_copy(update=updates)
    return TrainConfig.model_validate(checked.model_dump()), warnings


# ---------------------------------------------------------------------------------------------- running


class JobService:
    """The job operations the tools and the CLI share."""

    def __init__(self, home: Path, roots: AllowedRoots):
        self.home = home
        self.roots = roots
        self.store = JobStore(home)
        (home / "runs").mkdir(exist_ok=True)

    def run_dir(self, job_id: str) -> RunDir:
        return RunDir(self.home / "runs" / job_id)

    def submit(self, config: TrainConfig, *, dry_run: bool = False) -> tuple[JobRecord | None, TrainConfig, list[str]]:
        """Checks the config and, unless dry_run, records the job and starts its child process."""
        job_id = new_job_id()
        run = self.run_dir(job_id)
        checked, warnings = check_config(config, self.roots, run)
        if dry_run:
            return None, checked, warnings
        run.root.mkdir(parents=True)
        run.config.write_text(checked.to_json(), encoding="utf-8")
        record = self.store.create(
            job_id=job_id, run_dir=run.root, model=checked.model, method=checked.method,
            output_dir=Path(checked.output_dir or run.default_output),
        )  # fmt: skip
        try:
            self._spawn(record, run)
        except OSError as exc:
            self.store.update(job_id, status="failed", finished_at=time.time(), error=f"could not start: {exc}")
        return self.store.get(job_id), checked, warnings

    def _spawn(self, record: JobRecord, run: RunDir) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "LMTUNER_HOME": str(self.home)}
        with run.log.open("ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "lmtuner_core.supervisor", str(run.root)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=run.root, env=env, start_new_session=True,
            )  # fmt: skip
        _CHILDREN[child.pid] = child
        self.store.update(
            record.job_id, status="running", started_at=time.time(), pid=child.pid,
            pid_started_at=_process_start_time(child.pid),
        )  # fmt: skip

    def get(self, job_id: str) -> JobRecord:
        check_job_id(job_id)
        record = self.store.get(job_id)
        if record is None:
            raise NotFoundError(f"job_id: no job {job_id!r}; list_jobs shows the jobs there are", field="job_id")
        return self.refresh(record)

    def refresh(self, record: JobRecord) -> JobRecord:
        """Brings a non-final record up to date with the child's state file and the process table."""
        if record.status in TERMINAL:
            return record
        run = RunDir(Path(record.run_dir))
        state = read_state(run)
        if state.get("status") in TERMINAL:
            _reap(record.pid)
            self._finish(record, state["status"], state.get("error"), read_exit_code(run))
        elif record.pid is not None and not _alive(record.pid, record.pid_started_at):
            _reap(record.pid)
            code = read_exit_code(run)
            state = read_state(run)  # it may have written its final state just before exiting
            if state.get("status") in TERMINAL:
                self._finish(record, state["status"], state.get("error"), code)
            elif record.cancel_requested:
                self._finish(record, "cancelled", None, code)
            else:
                self._finish(record, "failed", _exit_reason(code, run), code)
        return self.store.get(record.job_id) or record

    def _finish(self, record: JobRecord, status: str, error: str | None, code: int | None) -> None:
        self.store.update(
            record.job_id, only_if_status=("queued", "running"), status=status, error=error,
            exit_code=code, finished_at=time.time(),
        )  # fmt: skip

    def cancel(self, job_id: str, grace_seconds: float = 20.0) -> JobRecord:
        """Asks the child to stop (SIGTERM: it saves a checkpoint and exits), then kills its process group if
        it has not exited within grace_seconds."""
        record = self.get(job_id)
        if record.status in TERMINAL:
            return record
        self.store.update(job_id, cancel_requested=1)
        if record.pid is None or not _alive(record.pid, record.pid_started_at):
            self._finish(record, "cancelled", None, None)
            return self.get(job_id)
        _signal_group(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _alive(record.pid, record.pid_started_at):
            time.sleep(0.1)
        if _alive(record.pid, record.pid_started_at):
            _signal_group(record.pid, signal.SIGKILL)
            time.sleep(0.2)
        record = self.refresh(self.store.get(job_id))  # type: ignore[arg-type]
        if record.status == "failed":  # killed during cancel: that is what was asked for
            self.store.update(job_id, status="cancelled", error=None)
        return self.store.get(job_id)  # type: ignore[return-value]

    def list(self, status: str | None = None) -> list[JobRecord]:
        if status is not None and status not in STATUSES:
            raise LmtunerError(
                f"status: {status!r} is not a job status; accepted: {', '.join(STATUSES)}", field="status"
            )
        records = [self.refresh(r) for r in self.store.list()]
        return [r for r in records if status is None or r.status == status]

    def progress(self, record: JobRecord, log_lines: int | None = 20) -> JobProgress:
        return read_progress(record, log_lines)


# ---------------------------------------------------------------------------------------------- reading


def read_state(run: RunDir) -> dict:
    try:
        return json.loads(run.state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # not written yet, or caught mid-replace on a filesystem without atomic rename


def read_exit_code(run: RunDir) -> int | None:
    """The training process's exit code as its supervisor recorded it (negative: killed by that signal)."""
    try:
        return int(json.loads((run.root / "exit.json").read_text(encoding="utf-8"))["returncode"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tail_lines(path: Path, n: int, max_bytes: int = 65536) -> list[str]:
    """The last n lines of a file, reading at most max_bytes from its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is probably cut
    return lines[-n:] if n else []


def latest_metrics(run: RunDir) -> tuple[dict, dict]:
    """The newest training record and the newest eval record of metrics.jsonl."""
    train: dict = {}
    evaluation: dict = {}
    for line in reversed(tail_lines(run.metrics, 400)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not evaluation and "eval_loss" in record:
            evaluation = record
        if not train and "loss" in record:
            train = record
        if train and evaluation:
            break
    return train, evaluation


def read_progress(record: JobRecord, log_lines: int | None = 20) -> JobProgress:
    run = RunDir(Path(record.run_dir))
    state = read_state(run)
    train, evaluation = latest_metrics(run)
    step = int(state.get("step") or train.get("step") or 0)
    total = state.get("total_steps")
    elapsed = None
    if record.started_at:
        elapsed = round((record.finished_at or time.time()) - record.started_at, 1)
    eta = None
    train_elapsed = state.get("train_seconds")
    if record.status == "running" and total and step and train_elapsed:
        eta = round((total - step) * train_elapsed / step, 1)
    checkpoints = []
    if run.checkpoints.is_dir():
        checkpoints = sorted(
            (str(p) for p in run.checkpoints.glob("checkpoint-*") if p.is_dir()),
            key=lambda p: int(p.rsplit("-", 1)[1]) if p.rsplit("-", 1)[1].isdigit() else 0,
        )
    error = record.error
    if record.status == "failed" and not error:
        error = state.get("error")
    return JobProgress(
        job_id=record.job_id,
        status=record.status,
        phase=state.get("phase") if record.status == "running" else None,
        step=step,
        total_steps=total,
        epoch=state.get("epoch", train.get("epoch")),
        loss=train.get("loss"),
        learning_rate=train.get("learning_rate"),
        tokens_per_second=train.get("tokens_per_second"),
        elapsed_seconds=elapsed,
        eta_seconds=eta,
        eval_loss=evaluation.get("eval_loss"),
        output_dir=record.output_dir,
        checkpoints=checkpoints,
        error=error,
        log_tail=None if log_lines is None else tail_lines(run.log, log_lines),
        run_dir=record.run_dir,
        model=record.model,
        method=record.method,
        created_at=record.created_at,
    )


# ---------------------------------------------------------------------------------------------- processes


def _process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int, started_at: float | None) -> bool:
    """True while that very process runs: a recycled pid with another start time does not count."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(pid)
        if started_at is not None and abs(proc.create_time() - started_at) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pid: int | None) -> None:
    """Collects a finished child of this process so it does not linger as a zombie."""
    child = _CHILDREN.pop(pid, None) if pid is not None else None
    if child is None:
        return
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _CHILDREN[pid] = child  # type: ignore[index]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _exit_reason(code: int | None, run: RunDir) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        what = f"the training process was killed by {name}"
        if name == "SIGKILL":
            what += " (often the kernel's out-of-memory killer: try a smaller batch_size or max_seq_len, or LoRA)"
    elif code is not None:
        what = f"the training process exited with code {code} without reporting why"
    else:
        what = "the training process ended without writing its final state"
    tail = [line for line in tail_lines(run.log, 5) if line.strip()]
    return what + (f"; last log line: {tail[-1]}" if tail else "")

"""The training processes: start one under its supervisor, tell whether it still runs, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from lmtuner_core.jobs.progress import tail_lines
from lmtuner_core.jobs.run_folder import RunDir

# Popen handles of children this process started, so their exit codes are collected (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


def spawn_supervised(run: RunDir, env: dict[str, str]) -> tuple[int, float | None]:
    """Starts `python -m lmtuner_core.jobs.supervisor RUN_DIR` in a new session; returns (pid, start time)."""
    with run.log.open("ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "lmtuner_core.jobs.supervisor", str(run.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=run.root, env=env, start_new_session=True,
        )  # fmt: skip
    _CHILDREN[child.pid] = child
    return child.pid, process_start_time(child.pid)


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int, started_at: float | None, children: dict[int, subprocess.Popen] | None = None) -> bool:
    """True while that very process runs: a recycled pid with another start time does not count. `children`:
    the caller's Popen handles (default: the training supervisors started here), so an exited child of ours
    is seen as ended even before it is reaped."""
    child = (_CHILDREN if children is None else children).get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(pid)
        if started_at is not None and abs(proc.create_time() - started_at) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_finished() -> None:
    """Collects every child of this process that has exited (a job concluded by its own supervisor is
    never refreshed here as running, so nothing else would reap it)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)


def reap(pid: int | None, children: dict[int, subprocess.Popen] | None = None) -> None:
    """Collects a finished child of this process so it does not linger as a zombie. `children`: as in alive()."""
    registry = _CHILDREN if children is None else children
    child = registry.pop(pid, None) if pid is not None else None
    if child is None:
        return
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        registry[pid] = child  # type: ignore[index]


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def exit_reason(code: int | None, run: RunDir) -> str:
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

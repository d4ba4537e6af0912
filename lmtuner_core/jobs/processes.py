"""This machine's training processes: start one under its supervisor, tell whether it still runs, say how it ended.
(The generic process helpers are in lmtuner_core.system.processes, which serving shares.)"""

from __future__ import annotations

import signal
import subprocess
import sys

from lmtuner_core.run import RunDir
from lmtuner_core.system import processes
from lmtuner_core.system.files import tail_lines
from lmtuner_core.system.processes import process_start_time, signal_group  # noqa: F401 (used through here)

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


def alive(pid: int, started_at: float | None) -> bool:
    """True while that very training supervisor runs (an exited child of ours counts as ended before it is reaped)."""
    return processes.alive(pid, started_at, _CHILDREN)


def reap_finished() -> None:
    """Collects every child of this process that has exited (a job concluded by its own supervisor is
    never refreshed here as running, so nothing else would reap it)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)


def reap(pid: int | None) -> None:
    """Collects a finished training supervisor of this process so it does not linger as a zombie."""
    processes.reap(pid, _CHILDREN)


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

"""`python -m lmtuner_core.supervisor RUN_DIR`: runs the training child and records how it ended.

Only a parent learns a child's exit status, and the server that started a job may be gone (restarted, or a
CLI that exited). This small stdlib-only parent stays with the job and writes RUN_DIR/exit.json, so any
later reader can say "killed by SIGKILL" instead of "ended somehow".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

TRAINING_NICENESS = 5


def _lower_priority() -> None:
    os.nice(TRAINING_NICENESS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lmtuner_core.supervisor RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    # Slightly lower CPU priority for training: under contention the server's answers stay prompt, and with
    # the CPU otherwise idle (or the work on a GPU) training loses nothing.
    child = subprocess.Popen([sys.executable, "-m", "lmtuner_core.train", str(run_dir)], preexec_fn=_lower_priority)

    def forward(signum, _frame):
        # A signal sent to the whole process group reaches the trainer too; one sent to this pid alone is
        # passed on, so either way the trainer gets to save a checkpoint.
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    ended = {"returncode": code, "signal": signal.Signals(-code).name if code < 0 else None, "ended_at": time.time()}
    tmp = run_dir / "exit.json.tmp"
    tmp.write_text(json.dumps(ended), encoding="utf-8")
    os.replace(tmp, run_dir / "exit.json")
    conclude_and_start_next(run_dir)
    return code if code >= 0 else 128 - code


def conclude_and_start_next(run_dir: Path) -> None:
    """Records this job's end and starts whatever was queued for its devices, so a queue advances even when
    no server or CLI is running. Failures here only cost promptness: the next reader does the same."""
    try:
        from lmtuner_core.jobs import JobService
        from lmtuner_core.paths import AllowedRoots, lmtuner_home

        service = JobService(lmtuner_home(), AllowedRoots(None))
        record = service.store.get(run_dir.name)
        if record is not None and record.status == "running":
            service.conclude(record)
        service.schedule()
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())

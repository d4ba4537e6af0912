"""`python -m lmtuner_core.jobs.supervisor RUN_DIR`: runs the training child and records how it ended.

Only a parent learns a child's exit status, and the server that started a job may be gone (restarted, or a
CLI that exited). This small stdlib-only parent stays with the job and writes RUN_DIR/exit.json, so any
later reader can say "killed by SIGKILL" instead of "ended somehow".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from lmtuner_core.run import RunDir, read_json, run_dir_argument  # stdlib only, like this module
from lmtuner_core.system.processes import die_with_parent

TRAINING_NICENESS = 5


def _lower_priority() -> None:
    os.nice(TRAINING_NICENESS)


def _launcher_setup() -> None:
    """For torchrun, which runs in its own session (see main): lower priority, and die with this supervisor."""
    _lower_priority()
    die_with_parent()


def main(argv: list[str] | None = None) -> int:
    run = run_dir_argument(sys.argv[1:] if argv is None else argv, "lmtuner_core.jobs.supervisor")
    if run is None:
        return 2
    run_dir = run.root
    command, env = training_command(run_dir)
    # Slightly lower CPU priority for training: under contention the server's answers stay prompt, and with
    # the CPU otherwise idle (or the work on a GPU) training loses nothing.
    if command[2] == "torch.distributed.run":
        # torchrun in its own session: a cancel's SIGTERM to our process group then reaches it once, through
        # forward() (a second one would cut its graceful stop of the workers short); it passes it on to each
        # worker, which saves a checkpoint. A SIGKILL to our group kills us, then it, then its workers.
        child = subprocess.Popen(command, env=env, preexec_fn=_launcher_setup, start_new_session=True)
    else:
        child = subprocess.Popen(command, env=env, preexec_fn=_lower_priority)
    signalled = []

    def forward(signum, _frame):
        # A signal sent to the whole process group reaches the trainer too; one sent to this pid alone is
        # passed on, so either way the trainer gets to save a checkpoint. (torchrun passes it to its workers.)
        signalled.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code != 0 and not signalled:
        record_rank_failure(run, code)
    run.write_exit(code, signal.Signals(-code).name if code < 0 else None)
    conclude_and_start_next(run_dir)
    return code if code >= 0 else 128 - code


def training_command(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The training command (one process, or torchrun for several) and its environment, from config.json."""
    from lmtuner_core.jobs import distributed  # stdlib only at import time

    config = read_json(RunDir(run_dir).config) or {}  # the trainer itself reports an unreadable one in state.json
    devices = os.environ.get("LMTUNER_DEVICES", "cpu")
    home = Path(os.environ.get("LMTUNER_HOME") or "~/.lmtuner").expanduser()
    port = distributed.free_port()
    env = {**os.environ, **distributed.launch_environment(config, devices, home, port)}
    return distributed.launch_command(sys.executable, run_dir, config, devices, port), env


def record_rank_failure(run: RunDir, code: int) -> None:
    """With several processes, one failing makes torchrun stop the others: rank 0 then records 'cancelled'
    (or nothing). The job failed, with the failing rank's reason (the training child records it)."""
    state = run.read_state()
    if state.get("status") == "failed":
        return
    reasons = run.failures()
    if not reasons:
        if state.get("status") != "cancelled":
            return  # died without a word: the job is concluded from exit.json and the log's last line
        # Rank 0 saw a stop it was not asked for: torchrun stopping it because another process died.
        reasons.append(f"another training process died (launcher exit code {code}); see train.log")
    state.update(status="failed", phase=None, error="; ".join(reasons), updated_at=time.time())
    run.write_state(state)


def conclude_and_start_next(run_dir: Path) -> None:
    """Records this job's end and starts whatever was queued for its devices, so a queue advances even when
    no server or CLI is running. Failures here only cost promptness: the next reader does the same."""
    try:
        from lmtuner_core.jobs.launcher import LOCAL
        from lmtuner_core.jobs.service import JobService
        from lmtuner_core.paths import AllowedRoots, lmtuner_home

        service = JobService(lmtuner_home(), AllowedRoots(None))
        record = service.store.get(run_dir.name)
        if record is not None and record.status == "running":
            local = service.launchers[LOCAL]
            service.finish(record, local.ending(record))  # type: ignore[attr-defined]
        service.schedule()
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())

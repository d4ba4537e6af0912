"""Processes this server started (a training supervisor, an inference server): tell whether that very process
still runs, collect its exit, signal its group, tie a child's life to its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int, started_at: float | None, children: dict[int, subprocess.Popen] | None = None) -> bool:
    """True while that very process runs: a recycled pid with another start time does not count. `children`: the
    caller's Popen handles, so an exited child of ours is seen as ended even before it is reaped."""
    child = (children or {}).get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(pid)
        if started_at is not None and abs(proc.create_time() - started_at) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap(pid: int | None, children: dict[int, subprocess.Popen]) -> None:
    """Collects a finished child of this process (one of `children`, the caller's Popen handles) so it does not
    linger as a zombie."""
    child = children.pop(pid, None) if pid is not None else None
    if child is None:
        return
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        children[pid] = child  # type: ignore[index]


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies: for a process in a session of its own, which a
    SIGKILL to the job's process group does not reach. Hand-written with ctypes (prctl PR_SET_PDEATHSIG): no
    stdlib call or library we use exposes it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

"""Reading the end of a growing log file."""

from __future__ import annotations

import os
from pathlib import Path


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

"""Which process of a job this is: torchrun, Ray Train and a Slurm task (through the launcher's environment) all set
RANK / LOCAL_RANK / WORLD_SIZE for each training process. Stdlib only."""

from __future__ import annotations

import os


def process_rank() -> tuple[int, int, int]:
    """(global rank, local rank, world size) as the launcher set them; (0, 0, 1) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

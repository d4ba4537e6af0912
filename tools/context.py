"""What every tool call needs to know about the server it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lmtuner_core.jobs import JobService
from lmtuner_core.paths import AllowedRoots


@dataclass
class ToolContext:
    home: Path
    roots: AllowedRoots = field(default_factory=lambda: AllowedRoots(None))
    read_only: bool = False

    @cached_property
    def jobs(self) -> JobService:
        return JobService(self.home, self.roots)

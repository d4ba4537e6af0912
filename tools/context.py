"""What every tool call needs to know about the server it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots, check_outside_state, check_writable

if TYPE_CHECKING:  # imported where used: the server starts without the job and server services
    from lmtuner_core.jobs.ray_launcher import RayAddresses
    from lmtuner_core.jobs.service import JobService
    from lmtuner_core.models.serving import ServerService

TrustRemoteCode = Annotated[
    bool,
    Field(
        description="Run the Python code that ships with the model (in its folder or hub repository) when the model "
        "needs it to load. Off by default; turn it on only for a model whose code you trust. Example: true."
    ),
]


@dataclass
class ToolContext:
    home: Path
    roots: AllowedRoots = field(default_factory=lambda: AllowedRoots(None))
    read_only: bool = False
    # The Ray clusters callers may name (the owner's --ray-address list); None inside: unconfined, like the roots.
    ray_addresses: RayAddresses = field(default_factory=lambda: _unconfined_ray())
    # When start_training asks before spending (the owner's --confirm-over-minutes / --confirm-over-devices): a job
    # estimated to run longer, or holding more devices, waits for the user's yes. None: never asks (the CLI, where
    # the owner types the command).
    confirm_over_minutes: float | None = None
    confirm_over_devices: int | None = None

    @cached_property
    def jobs(self) -> JobService:
        from lmtuner_core.jobs.service import JobService

        return JobService(self.home, self.roots, self.ray_addresses)

    @cached_property
    def servers(self) -> ServerService:
        from lmtuner_core.models.serving import ServerService

        return ServerService(self.home, self.roots)

    def visible_folders(self) -> list[Path] | None:
        """The folders whose paths an error may show: the roots and $LMTUNER_HOME (None: unconfined, the CLI)."""
        return None if self.roots.roots is None else [*self.roots.roots, self.home.resolve()]

    def output_folder(self, value: str, field: str = "output_dir") -> Path:
        """A writing tool's output folder: inside the roots, not lmtuner's own state, and writable."""
        path = self.roots.resolve(value, field)
        check_outside_state(path, self.home, field)
        check_writable(path, field)
        return path

    def adapter_folder(self, value: str, trust_remote_code: bool = False) -> Path:
        """A tool's `adapter` argument: a folder inside the allowed roots that holds a PEFT adapter, refused when
        loading it would run code of its own (its tokenizer files are loaded too) unless trust_remote_code."""
        path = self.roots.resolve(value, "adapter")
        if not (path / "adapter_config.json").is_file():
            raise LmtunerError(
                f"adapter: {path} has no adapter_config.json; give the output_dir of a LoRA-family job (a full "
                "fine-tune's output_dir is a model: pass it as `model` instead)",
                field="adapter",
            )
        from lmtuner_core.models.model_code import check_model_code

        check_model_code(path, self.roots, trust_remote_code, "adapter")
        return path


def _unconfined_ray() -> RayAddresses:
    from lmtuner_core.jobs.ray_launcher import RayAddresses

    return RayAddresses(None)

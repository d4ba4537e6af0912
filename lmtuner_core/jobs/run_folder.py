"""Moved to `lmtuner_core.run` (the run contract, below jobs and training); these names stay importable here."""

from lmtuner_core.run.folder import (  # noqa: F401
    ARTIFACT_MARKER,
    RunDir,
    StateFile,
    read_json,
    run_dir_argument,
    write_json_atomic,
)

"""The run contract, the bottom layer every other part builds on: a job's run folder (config.json, state.json,
train.log, metrics.jsonl, exit.json, checkpoints), its atomic JSON writes, the training processes' ranks and
checkpoint discovery. Training writes it, every launcher and the server read it; it imports the standard library
only, and nothing of lmtuner_core."""

from lmtuner_core.run.folder import (
    ARTIFACT_MARKER,
    DEEPSPEED_FILE,
    TRAINER_STATE,
    RunDir,
    StateFile,
    checkpoint_step,
    newest_checkpoint,
    read_json,
    run_dir_argument,
    write_json_atomic,
)
from lmtuner_core.run.ranks import process_rank

__all__ = [
    "ARTIFACT_MARKER",
    "DEEPSPEED_FILE",
    "TRAINER_STATE",
    "RunDir",
    "StateFile",
    "checkpoint_step",
    "newest_checkpoint",
    "process_rank",
    "read_json",
    "run_dir_argument",
    "write_json_atomic",
]

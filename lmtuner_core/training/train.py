"""The training child: `python -m lmtuner_core.training.train RUN_DIR`, and the recipe's lifecycle (`run_recipe`)
that every backend's entry point calls.

It installs its stop handler before the slow imports, runs the recipe, and always leaves a final state in
RUN_DIR/state.json — completed, cancelled, or failed with a reason a person can act on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmtuner_core.errors import LmtunerError
from lmtuner_core.library_noise import quiet_library_noise
from lmtuner_core.run import StateFile, process_rank, run_dir_argument
from lmtuner_core.system.processes import die_with_parent

if TYPE_CHECKING:
    from lmtuner_core.config import TrainConfig
    from lmtuner_core.run import RunDir
    from lmtuner_core.training.recipe import SFTRecipe


def install_stop_handler() -> threading.Event:
    """SIGTERM/SIGINT set a flag the recipe checks between steps, so cancelling saves a checkpoint."""
    stop = threading.Event()

    def handler(signum, _frame):
        # Only set the flag: printing from a signal handler can re-enter a stdout write the main thread was in.
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def explain(exc: BaseException) -> str:
    """A failure message with the fix for causes we recognise."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "out of memory" in lowered:
        return text + " — lower batch_size or max_seq_len, turn on gradient_checkpointing, or use lora/qlora"
    if "no space left" in lowered or "disk quota" in lowered:
        return text + " — the disk is full: free space or set output_dir on a larger disk"
    if "read-only file system" in lowered or "permission denied" in lowered:
        return text + " — a folder the job writes to is not writable: choose another output_dir"
    if ("nccl" in lowered or "gloo" in lowered) and ("timeout" in lowered or "timed out" in lowered):
        return (
            text + " — processes stopped hearing from each other: check that every node/GPU is up, or raise "
            "the timeout (NCCL_TIMEOUT) for slow steps"
        )
    return text


def peak_rss_mib() -> int:
    """This process's peak resident memory: what the memory estimate is checked against (docs/MEMORY.md)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def die_with_launcher() -> None:
    """Under torchrun each worker is in its own session, so a SIGKILL to the job's process group (a cancel
    past its grace) reaches the launcher only: this worker dies with it."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def run_recipe(
    run: RunDir,
    state: StateFile,
    stop: threading.Event,
    *,
    config: TrainConfig | None = None,
    prepare: Callable[[SFTRecipe], None] | None = None,
    started: float | None = None,
) -> str:
    """The recipe's lifecycle, the one every backend's training entry point calls (this module's main for the local
    backend, training/ray_worker.py on a Ray cluster): reads config.json (unless `config` is given), sets the recipe
    up, lets the backend `prepare` it (Ray Train wraps the Trainer), trains, saves and writes the result report, and
    leaves the final state in state.json — completed (with the peak memory), cancelled when `stop` was set (the
    entry point's signal handler sets it), or failed with a reason a person can act on (with several processes,
    failure-rank-N.json too). Returns 'completed' or 'cancelled'; re-raises after recording a failure."""
    started = time.monotonic() if started is None else started
    rank, _, world_size = process_rank()
    try:
        from lmtuner_core.config import TrainConfig
        from lmtuner_core.stages import recipe_class

        if config is None:
            config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
        recipe = recipe_class(config.stage)(config, run, state, stop)  # the stage's recipe: SFT, DPO, ... (stages)
        recipe.setup()
        if prepare is not None:
            prepare(recipe)
        stopped = recipe.train()
        if stopped:
            state.update(status="cancelled", phase=None)
            print("[lmtuner] cancelled; checkpoint saved", flush=True)
            return "cancelled"
        recipe.save()
        recipe.report(time.monotonic() - started)
        recipe.write_card(time.monotonic() - started)
        if rank == 0:
            peak = peak_rss_mib()
            state.update(status="completed", phase=None, output_dir=config.output_dir, peak_rss_mib=peak)
            print(f"[lmtuner] completed; output in {config.output_dir}; peak RSS {peak} MiB", flush=True)
        else:  # another node's first process: the model and metrics are written by node 0's job
            state.update(status="completed", phase=None, note="the output is written by the job of node rank 0")
        return "completed"
    except LmtunerError as exc:
        print(f"[lmtuner] failed: {exc}", flush=True)
        state.update(status="failed", error=str(exc))
        if world_size > 1:
            run.record_failure(rank, str(exc))
        raise
    except BaseException as exc:
        if stop.is_set():
            state.update(status="cancelled", phase=None)
            return "cancelled"
        traceback.print_exc()
        state.update(status="failed", error=explain(exc))
        if world_size > 1:
            run.record_failure(rank, explain(exc))
        raise


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    run = run_dir_argument(sys.argv[1:] if argv is None else argv, "lmtuner_core.training.train")
    if run is None:
        return 2
    quiet_library_noise()
    stop = install_stop_handler()
    die_with_launcher()
    state = StateFile(run, enabled=process_rank()[1] == 0)
    state.update(phase="loading libraries")
    try:
        run_recipe(run, state, stop, started=started)
    except BaseException:
        return 1  # recorded in state.json by run_recipe
    return 0


if __name__ == "__main__":
    sys.exit(main())

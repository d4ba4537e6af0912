"""The cluster side of a Ray job: its entry point, `python -m lmtuner_core.training.ray_worker RUN_DIR RAY_JOB_ID`,
is the Ray job's driver. It runs a TorchTrainer whose `train_worker` runs the recipe's lifecycle
(`training.train.run_recipe`) on each of num_workers ranks with Ray Train's Transformers integration
(prepare_trainer, RayTrainReportCallback): checkpoints go to storage_path, and a restarted worker group
(FailureConfig.max_failures) continues from the newest one. The run folder, the data, the model and output_dir must
be on storage every node sees at the same path (docs/CLUSTER.md). Submitted by jobs/ray_launcher.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from lmtuner_core.config import TrainConfig
from lmtuner_core.run import RunDir, StateFile, newest_checkpoint

ATTEMPTS_FILE = "ray_attempts.jsonl"  # one line per start of the worker group: who ran where, resumed from what
RAY_STORAGE_DIR = "ray"  # the default storage_path, inside the run folder


def storage_path(config: TrainConfig, run: RunDir) -> str:
    """Where Ray Train keeps this job's checkpoints: ray.storage_path, else the run folder's ray/."""
    assert config.ray is not None
    return config.ray.storage_path or str(run.root / RAY_STORAGE_DIR)


def latest_ray_checkpoint(config: TrainConfig, run: RunDir) -> Path | None:
    """The newest Hugging Face checkpoint Ray Train kept for this job (storage_path/<job>/checkpoint_*/checkpoint),
    by training step; None when there is none. storage_path must be a folder here (not an object-store URI)."""
    return newest_checkpoint((Path(storage_path(config, run)) / run.root.name).glob("checkpoint_*/checkpoint"))


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker (a torch.distributed rank; Ray has set up the process group): the recipe's lifecycle,
    with Ray Train reporting each checkpoint to storage_path and resuming from the newest one after a restart."""
    import ray
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from lmtuner_core.training.train import run_recipe

    run = RunDir(Path(loop_config["run_dir"]))
    rank = ray.train.get_context().get_world_rank()
    state = StateFile(run, enabled=rank == 0)  # one state.json per job, on shared storage
    config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
    with contextlib.ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()  # set when the worker group restarts, or a resumed run restores
        if checkpoint is not None:
            folder = Path(stack.enter_context(checkpoint.as_directory())) / RayTrainReportCallback.CHECKPOINT_NAME
            config = config.model_copy(update={"resume_from": str(folder)})
        elif config.resume_from is None and (saved := run.latest_checkpoint()) is not None:
            # Ray registers a reported checkpoint when it next polls the workers (every 2 s): a group that died
            # in between restarts without one, though the Trainer's own complete checkpoint is in the run folder.
            config = config.model_copy(update={"resume_from": str(saved)})
        record_attempt(run, loop_config["ray_job_id"], rank, config.resume_from)

        def prepare(recipe) -> None:
            recipe.trainer.add_callback(rank_zero_report_callback())
            recipe.trainer = prepare_trainer(recipe.trainer)

        # A stop is Ray's (stop_job ends the driver, and with it the workers): the Event is never set here, since a
        # Ray Train worker runs this function off its main thread, where no signal handler can be installed.
        run_recipe(run, state, threading.Event(), config=config, prepare=prepare)


def rank_zero_report_callback():
    """Ray Train's RayTrainReportCallback, with the checkpoint reported by rank 0 only: the Trainer writes it
    there, and the Trainer calls on_save without a barrier, so another rank would copy a folder rank 0 may
    still be writing (into the same Ray checkpoint). The other ranks report the metrics alone."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class RankZeroReportCallback(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                return super().on_save(args, state, control, **kwargs)
            metrics: dict = {}
            for logged in state.log_history:
                metrics.update(logged)
            ray.train.report(metrics=metrics, checkpoint=None)
            return None

    return RankZeroReportCallback()


def record_attempt(run: RunDir, ray_job_id: str, rank: int, resumed_from: str | None) -> None:
    """Rank 0 appends who runs where to ray_attempts.jsonl (gathered from every rank), so job_status can show
    the workers, their nodes and how often the group restarted."""
    import ray
    import torch.distributed as dist

    me = {"rank": rank, "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    workers = [None] * dist.get_world_size() if dist.is_initialized() else [me]
    if dist.is_initialized():
        dist.all_gather_object(workers, me)
    if rank != 0:
        return
    line = {"ray_job_id": ray_job_id, "started_at": time.time(), "resumed_from": resumed_from, "workers": workers}
    with (run.root / ATTEMPTS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    where = ", ".join(f"rank {w['rank']} pid {w['pid']} on {w['node_ip']}" for w in workers)  # type: ignore[index]
    resuming = f"; resuming from {resumed_from}" if resumed_from else ""
    print(f"[lmtuner] ray: worker group started ({where}){resuming}", flush=True)


def tee_output(log: Path) -> threading.Thread:
    """Copies what this process writes to stdout/stderr (Ray prints its workers' lines here too) into train.log
    as well, so the log tail reads as for a local job while Ray's job log keeps its copy. Hand-written: a pipe
    on fds 1 and 2 and a thread; no library tees file descriptors."""
    read_fd, write_fd = os.pipe()
    console = os.dup(1)
    sink = log.open("ab")

    def pump() -> None:
        while chunk := os.read(read_fd, 65536):
            with contextlib.suppress(OSError):
                os.write(console, chunk)
            sink.write(chunk)
            sink.flush()
        sink.close()

    thread = threading.Thread(target=pump, name="tee-train-log", daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return thread


def end_tee(thread: threading.Thread) -> None:
    """Flushes and closes the tee so the last lines reach train.log before the process exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    thread.join(timeout=5)


def merge_state(run: RunDir, **values) -> None:
    """Sets final fields of state.json while keeping what rank 0 wrote (step, totals)."""
    state = run.read_state()
    state.update(values, updated_at=time.time())
    run.write_state(state)


def main(argv: list[str] | None = None) -> int:
    """The Ray job's driver: a TorchTrainer over train_worker; records how it ended in state.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lmtuner_core.training.ray_worker RUN_DIR RAY_JOB_ID", file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]).resolve())
    tee = tee_output(run.log)
    try:
        config = TrainConfig.model_validate_json(run.config.read_text(encoding="utf-8"))
        assert config.ray is not None, "config.json has no `ray` settings"
        merge_state(run, status="running", phase="starting Ray workers")
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from lmtuner_core.planning.ray_cluster import describe_resources

        settings = config.ray
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"run_dir": str(run.root), "ray_job_id": argv[1]},
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                resources_per_worker=settings.worker_resources(),
                # CPU workers are spread over the nodes (each brings its cores); GPU workers packed (fast NCCL).
                placement_strategy="PACK" if settings.use_gpu else "SPREAD",
            ),
            run_config=RunConfig(
                name=run.root.name, storage_path=storage_path(config, run),
                failure_config=FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
            ),
        )  # fmt: skip
        print(
            f"[lmtuner] ray: {settings.num_workers} workers of {describe_resources(settings.worker_resources())}, "
            f"checkpoints in {storage_path(config, run)}/{run.root.name}",
            flush=True,
        )
        trainer.fit()
        merge_state(run, status="completed", phase=None, output_dir=config.output_dir)
        return 0
    except BaseException as exc:
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError, ValueError):
            worker_error = json.loads(run.state.read_text(encoding="utf-8")).get("error")
            error = worker_error or error
        merge_state(run, status="failed", phase=None, error=error)
        print(f"[lmtuner] failed: {error}", flush=True)
        return 1
    finally:
        end_tee(tee)


if __name__ == "__main__":
    sys.exit(main())

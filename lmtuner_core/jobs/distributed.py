"""DeepSpeed and several processes: the DeepSpeed JSON, the launch command and the launch environment.

Stdlib only at import time: the supervisor (which must stay light) builds the command and the environment
from RUN_DIR/config.json read as plain JSON, so every function here takes the config as a dict (the
`TrainConfig.model_dump()` shape) and never imports torch.

One process runs `python -m lmtuner_core.training.train RUN_DIR`; several processes on a node, or several nodes, run
the same module under `python -m torch.distributed.run` (torchrun), which starts one worker per process and
sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# Moved to the run contract and the system helpers; importable here as before.
from lmtuner_core.run.folder import DEEPSPEED_FILE
from lmtuner_core.run.ranks import process_rank  # noqa: F401
from lmtuner_core.system.ports import free_port  # noqa: F401
from lmtuner_core.system.processes import die_with_parent  # noqa: F401

TRAIN_MODULE = "lmtuner_core.training.train"


# ---------------------------------------------------------------------------------------------- DeepSpeed JSON


def deepspeed_config(settings: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for a job's `deepspeed` settings. Values the Hugging Face integration fills from the
    TrainingArguments are left "auto" (batch sizes, gradient clipping, bf16/fp16 from the precision), so
    the file never disagrees with the job's own settings. The Trainer's schedule is used, and its optimizer too
    unless states are offloaded (then DeepSpeed's CPU AdamW, with the job's hyperparameters)."""
    stage = int(settings.get("stage", 2))
    zero: dict[str, Any] = {"stage": stage}
    pin = on_gpu  # pinned host memory only helps copies to a GPU; on a CPU-only machine it is wasted
    if settings.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if settings.get("offload_params"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size="auto")
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Gather the partitioned weights into one ordinary state dict when saving, so the saved model (or
            # adapter) loads with from_pretrained like any other.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # our progress lines are in train.log; DeepSpeed's would repeat them
        "wall_clock_breakdown": False,
    }
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        # Offloaded optimizer states are updated by DeepSpeed's own CPU Adam (a compiled op, far faster than
        # torch's AdamW on CPU tensors); its hyperparameters still come from the job ("auto").
        generated["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return generated


def read_user_deepspeed_config(path: Path) -> dict[str, Any]:
    """A user's own DeepSpeed JSON, checked to be a JSON object; raises ValueError saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold a JSON object such as {{"zero_optimization": {{"stage": 2}}}}')
    return data


def write_deepspeed_config(config: dict[str, Any], run_root: Path, on_gpu: bool) -> Path | None:
    """Writes RUN_DIR/deepspeed.json for a DeepSpeed job (a copy of the user's file, or the generated one);
    returns its path, or None for a job without DeepSpeed."""
    settings = config.get("deepspeed")
    if not settings:
        return None
    target = run_root / DEEPSPEED_FILE
    if settings.get("config_file"):
        shutil.copyfile(settings["config_file"], target)
    else:
        target.write_text(json.dumps(deepspeed_config(settings, on_gpu), indent=2), encoding="utf-8")
    return target


# ---------------------------------------------------------------------------------------------- processes


def count_devices(devices: str) -> int:
    """GPUs in a store-style devices string ('0,1' -> 2); 'cpu' -> 0."""
    return 0 if devices == "cpu" else len([d for d in devices.split(",") if d.strip()])


def processes_per_node(config: dict[str, Any], devices: str) -> int:
    """`processes_per_node` as a number: 'auto' = one per GPU the job holds, 1 on the CPU."""
    wanted = config.get("processes_per_node", "auto")
    if wanted == "auto":
        return max(1, count_devices(devices))
    return int(wanted)


def node_settings(config: dict[str, Any]) -> dict[str, Any]:
    nodes = config.get("nodes") or {}
    return {
        "count": int(nodes.get("count", 1)),
        "rank": int(nodes.get("rank", 0)),
        "master_addr": str(nodes.get("master_addr", "127.0.0.1")),
        "master_port": nodes.get("master_port"),
    }


def is_multiprocess(config: dict[str, Any], devices: str) -> bool:
    return processes_per_node(config, devices) > 1 or node_settings(config)["count"] > 1


def launch_command(python: str, run_dir: Path, config: dict[str, Any], devices: str, port: int) -> list[str]:
    """The training command as an argument list (never a shell line). `port` is the rendezvous port used when
    the config names none (a single node picks a free one)."""
    if not is_multiprocess(config, devices):
        return [python, "-m", TRAIN_MODULE, str(run_dir)]
    nodes = node_settings(config)
    return [
        python, "-m", "torch.distributed.run",
        "--nproc_per_node", str(processes_per_node(config, devices)),
        "--nnodes", str(nodes["count"]),
        "--node_rank", str(nodes["rank"]),
        "--master_addr", nodes["master_addr"],
        "--master_port", str(nodes["master_port"] or port),
        "-m", TRAIN_MODULE, str(run_dir),
    ]  # fmt: skip


def launch_environment(config: dict[str, Any], devices: str, home: Path, port: int) -> dict[str, str]:
    """Variables the training processes need beyond the job's usual environment."""
    env: dict[str, str] = {}
    if config.get("deepspeed"):
        # JIT-built DeepSpeed ops (cpu_adam ≈70 s, shm_comm ≈45 s on 2 cores) are compiled once and reused.
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(home / "torch_extensions")
        if devices == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        if not is_multiprocess(config, devices):
            # Without these DeepSpeed looks for an MPI launcher (mpi4py) to learn its rank.
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if is_multiprocess(config, devices) and devices == "cpu":
        # Each of N processes on the CPU gets its share of the cores rather than all of them (oversubscribed).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes_per_node(config, devices))))
    return env

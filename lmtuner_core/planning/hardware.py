"""What this machine can train with: GPUs (through NVML, no torch import), CPU, memory, disk, key packages."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

from lmtuner_core.planning.ray_cluster import RayClusterReport
from lmtuner_core.planning.slurm_cluster import SlurmClusterReport

KEY_PACKAGES = (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed",
    "liger-kernel", "lomo-optim", "vllm", "flash-attn", "gguf", "mcp", "ray", "submitit", "lmtuner",
)  # fmt: skip


class GpuInfo(BaseModel):
    index: int = Field(description="Device index as CUDA numbers it. Example: 0.")
    name: str = Field(description="Marketing name. Example: 'NVIDIA H100 80GB HBM3'.")
    memory_total_mib: int = Field(description="Total device memory in MiB.")
    memory_free_mib: int = Field(description="Free device memory in MiB right now.")
    compute_capability: str = Field(description="CUDA compute capability. Example: '9.0'.")
    bf16_supported: bool = Field(description="bfloat16 math in hardware (compute capability ≥ 8.0).")
    driver: str | None = Field(None, description="NVIDIA driver version.")
    processes: list[str] = Field(default_factory=list, description="Processes using the GPU, where readable.")


class CpuInfo(BaseModel):
    model: str = Field(description="CPU model name.")
    cores: int = Field(description="Logical cores available to this process.")


class HardwareReport(BaseModel):
    gpus: list[GpuInfo] = Field(description="NVIDIA GPUs; empty when there are none (not an error).")
    cuda_available: bool = Field(description="True when at least one CUDA GPU can be used.")
    cpu: CpuInfo
    memory_total_mib: int = Field(description="System RAM in MiB.")
    memory_available_mib: int = Field(description="RAM available to new processes, in MiB.")
    disk_free_gib: float = Field(description="Free disk where $LMTUNER_HOME lives, in GiB.")
    software: dict[str, str] = Field(description="Installed versions of the packages that matter for training.")
    notes: list[str] = Field(default_factory=list, description="Why a GPU might be missing, and similar remarks.")
    cluster: RayClusterReport | None = Field(
        None, description="With ray_address: the Ray cluster's nodes and resources (what ray.num_workers can use)."
    )
    slurm: SlurmClusterReport | None = Field(
        None, description="With slurm: the Slurm cluster's partitions and nodes (what a `slurm` section can ask for)."
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvml_gpus(notes: list[str]) -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        notes.append("nvidia-ml-py is not installed; GPUs cannot be listed")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        notes.append(f"no NVIDIA driver reachable ({exc}); training runs on CPU")
        return []
    try:
        driver = _decode(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_decode(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mib=mem.total // 2**20,
                    memory_free_mib=mem.free // 2**20,
                    compute_capability=f"{major}.{minor}",
                    bf16_supported=major >= 8,
                    driver=driver,
                    processes=_gpu_processes(pynvml, handle),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _gpu_processes(pynvml, handle) -> list[str]:
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return []
    out = []
    for proc in procs:
        try:
            name = psutil.Process(proc.pid).name()
        except psutil.Error:
            name = "?"
        used = (proc.usedGpuMemory or 0) // 2**20
        out.append(f"pid {proc.pid} ({name}) {used} MiB")
    return out


def _decode(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _versions() -> dict[str, str]:
    found = {}
    for name in KEY_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def list_gpus(notes: list[str] | None = None) -> list[GpuInfo]:
    """The NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES respected); empty without a driver."""
    notes = [] if notes is None else notes
    gpus = _nvml_gpus(notes)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus and visible is not None:
        allowed = {v.strip() for v in visible.split(",") if v.strip()}
        gpus = [g for g in gpus if str(g.index) in allowed]
        notes.append(f"CUDA_VISIBLE_DEVICES={visible!r} limits the GPUs listed")
    return gpus


def inspect_hardware(home: Path) -> HardwareReport:
    """Reads the machine without importing torch, so it is cheap enough to call before every plan."""
    notes: list[str] = []
    gpus = list_gpus(notes)
    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(home)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HardwareReport(
        gpus=gpus,
        cuda_available=bool(gpus),
        cpu=CpuInfo(model=_cpu_model(), cores=cores),
        memory_total_mib=mem.total // 2**20,
        memory_available_mib=mem.available // 2**20,
        disk_free_gib=round(disk.free / 2**30, 1),
        software=_versions(),
        notes=notes,
    )

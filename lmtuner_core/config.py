"""TrainConfig: the one schema behind the MCP tool input, the CLI config file and a run's saved config.json.

Every model rejects unknown keys and names the accepted ones, so a typo never becomes a silent default.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmtuner_core.errors import LmtunerError, format_validation_error, shown
from lmtuner_core.graders.specs import GraderList, check_python_opt_in
from lmtuner_core.methods import METHOD_NAMES, METHODS, default_learning_rate, method_description
from lmtuner_core.stages import STAGE_NAMES, STAGES, stage_refusal

Method = Literal[METHOD_NAMES]  # the schema lists exactly the registry's methods
Stage = Literal[STAGE_NAMES]  # and exactly the registry's stages
Precision = Literal["auto", "bf16", "fp16", "fp32"]
DatasetFormat = Literal[
    "auto", "alpaca", "sharegpt", "messages", "text", "preference", "alpaca-ranking", "sharegpt-ranking", "kto"
]
RopeType = Literal["linear", "dynamic", "ntk", "yarn", "llama3", "xpos"]
Tracker = Literal["wandb", "tensorboard"]


class StrictModel(BaseModel):
    """Rejects unknown keys with the list of accepted ones (pydantic alone only says 'extra inputs')."""

    # allow_inf_nan=False: NaN and ±Infinity (which JSON parsers accept) are "not a finite number", not "should be ≤ N".
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), accepted, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown key {shown(key)}{hint}; accepted keys: {', '.join(accepted)}")
        return data


class LoraSettings(StrictModel):
    """Adapter shape for the LoRA family (lora, dora, qlora, lora-8bit)."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices. Example: 16. Larger = more capacity.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator (update scaled by alpha/r). Example: 32.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input. Example: 0.05.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, e.g. ['q_proj', 'v_proj'], or 'all-linear' (every linear layer but the "
        "output head; usually best).",
    )


class DeepSpeedSettings(StrictModel):
    """ZeRO partitioning for several GPUs or for offloading to CPU memory."""

    stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3. Example: 2 (optimizer + gradients sharded).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")
    config_file: str | None = Field(None, description="Your own DeepSpeed JSON, used instead of the generated one.")

    @model_validator(mode="after")
    def _params_offload_needs_stage3(self) -> DeepSpeedSettings:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3; set stage: 3 or offload_params: false")
        return self


HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")


class NodeSettings(StrictModel):
    """Several machines training as one job: start the same config on every node, each with its own rank."""

    count: int = Field(1, ge=1, le=1024, description="How many nodes (machines) take part. Example: 2.")
    rank: int = Field(0, ge=0, le=1023, description="This node's rank, 0 to count-1; node 0 hosts the rendezvous.")
    master_addr: str = Field(
        "127.0.0.1",
        max_length=253,
        description="Hostname or IP address of node 0, reachable from every node. Example: '10.0.0.5'.",
    )
    master_port: int = Field(
        29500, ge=1024, le=65535, description="Free TCP port on node 0 for the rendezvous. Example: 29500."
    )

    @field_validator("master_addr")
    @classmethod
    def _host(cls, value: str) -> str:
        if value.startswith("-") or not HOSTNAME.match(value):
            raise ValueError(f"{shown(value)} is not a hostname or IP address (e.g. 'node0', '10.0.0.5', '::1')")
        return value

    @model_validator(mode="after")
    def _rank_below_count(self) -> NodeSettings:
        if self.rank >= self.count:
            raise ValueError(f"rank {self.rank} must be below count {self.count} (ranks are 0 to {self.count - 1})")
        return self


# Ray rounds resource amounts to 4 decimals: a smaller amount is not one.
RAY_RESOURCE_STEP = 0.0001
# What one Ray Train worker (a training process) takes at least: a tenth of a core, or a hundredth of a GPU.
MIN_WORKER_CPU = 0.1
MIN_WORKER_GPU = 0.01
RAY_ADDRESS = re.compile(r"^(auto|(https?|ray)://[A-Za-z0-9.\[\]:_-]+(:[0-9]{1,5})?/?)$")


class RaySettings(StrictModel):
    """Run the job on a Ray cluster (Ray Train's TorchTrainer, submitted through Ray's Jobs API)."""

    address: str = Field(
        max_length=300,
        description="The cluster: its dashboard (Jobs API) 'http://head:8265', a Ray Client address "
        "'ray://head:10001' (its dashboard on port 8265 is used), or 'auto' (the cluster this machine is part of). "
        "Other than 'auto', one the server's owner listed (lmtuner-mcp --ray-address). Example: 'http://10.0.0.5:8265'.",
    )
    num_workers: int = Field(
        2, ge=1, le=4096, description="Training processes (torch.distributed ranks); one GPU each with use_gpu. E.g. 4."
    )
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false trains on CPUs (gloo).")
    resources_per_worker: dict[str, float] | None = Field(
        None,
        description="Ray resources each worker reserves: each amount 0 or at least 0.0001, and at least 0.1 'CPU' or "
        "0.01 'GPU'. Default {'CPU': 1} (plus 'GPU': 1 with use_gpu). Example: {'CPU': 8, 'GPU': 1}.",
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints: a folder every node sees at the same path (NFS, Lustre) or "
        "an object-store URI Ray supports ('s3://bucket/prefix', 'gs://…'). Default: the job's run folder "
        "(ray/), which then must be on shared storage too. Example: '/shared/lmtuner-checkpoints'.",
    )
    max_failures: int = Field(
        1, ge=0, le=100, description="Worker-group restarts (from the last checkpoint) before the job fails. E.g. 1."
    )
    python: str | None = Field(
        None,
        max_length=4096,
        description="Python interpreter on the cluster that has lmtuner[train] installed. Default: the path of "
        "this server's interpreter. Example: '/opt/venv/bin/python'.",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not RAY_ADDRESS.match(value):
            raise ValueError(
                f"{value!r} is not a Ray cluster address; accepted: 'http://HOST:8265' (the dashboard's Jobs API), "
                "'ray://HOST:10001' or 'auto'"
            )
        return value.rstrip("/")

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} is not an absolute interpreter path such as '/opt/venv/bin/python'")
        return value

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Every amount is 0 (none) or at least RAY_RESOURCE_STEP, Ray's own resource granularity (it rounds to
        4 decimals); and a worker takes at least MIN_WORKER_CPU CPUs or MIN_WORKER_GPU GPUs, so that the fit check
        counts real room: with CPU 0 or 1e-300, any number of workers would "fit" one node."""
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one resource, e.g. {'CPU': 1}, or omit it for the default")
        for name, amount in value.items():
            if not name:
                raise ValueError("a resource needs a name, e.g. {'CPU': 2, 'GPU': 1}")
            if not math.isfinite(amount) or amount < 0 or 0 < amount < RAY_RESOURCE_STEP:
                raise ValueError(
                    f"resource {shown(name)}: {amount:g} is not an amount; give 0 (none) or at least "
                    f"{RAY_RESOURCE_STEP:g} (Ray's resource granularity), e.g. {{'CPU': 2, 'GPU': 1}}"
                )
        cpus, gpus = value.get("CPU", 0), value.get("GPU", 0)
        if "CPU" in value and 0 < cpus < MIN_WORKER_CPU:
            raise ValueError(f"resource 'CPU': {cpus:g} is below {MIN_WORKER_CPU:g} CPU per worker (a training "
                             "process needs a real share of a core); e.g. {'CPU': 1}")  # fmt: skip
        if "GPU" in value and 0 < gpus < MIN_WORKER_GPU:
            raise ValueError(f"resource 'GPU': {gpus:g} is below {MIN_WORKER_GPU:g} GPU per worker; e.g. {{'GPU': 1}}")
        if cpus < MIN_WORKER_CPU and gpus < MIN_WORKER_GPU:
            raise ValueError(
                f"each worker must take at least {MIN_WORKER_CPU:g} 'CPU' or {MIN_WORKER_GPU:g} 'GPU' (it is a "
                "training process; with neither, any number of workers would seem to fit); e.g. {'CPU': 1}"
            )
        return value

    @model_validator(mode="after")
    def _gpu_resources_agree(self) -> RaySettings:
        gpus = (self.resources_per_worker or {}).get("GPU", 0)
        if self.use_gpu and self.resources_per_worker is not None and gpus <= 0:
            raise ValueError("use_gpu is true but resources_per_worker asks for no 'GPU'; add 'GPU': 1 or omit it")
        if not self.use_gpu and gpus > 0:
            raise ValueError("resources_per_worker asks for a GPU but use_gpu is false; set use_gpu: true")
        return self

    def worker_resources(self) -> dict[str, float]:
        """What each worker reserves: the given resources, else one CPU (and one GPU with use_gpu)."""
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        return {"CPU": 1.0, "GPU": 1.0} if self.use_gpu else {"CPU": 1.0}


SLURM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # partition, account and QOS names


class SlurmSettings(StrictModel):
    """Run the job on a Slurm cluster: submitted with submitit (sbatch), one task per GPU (or one per node on CPU
    nodes), torch.distributed set up from Slurm's environment; requeued after a node failure, from the newest
    checkpoint. The run folder, data, model and output_dir must be on storage every node sees (docs/CLUSTER.md)."""

    partition: str | None = Field(
        None, max_length=64, description="The partition (queue). Default: the cluster's default one. Example: 'gpu'."
    )
    nodes: int = Field(1, ge=1, le=1024, description="Nodes (machines) the job takes. Example: 2.")
    gpus_per_node: int = Field(
        0,
        ge=0,
        le=64,
        description="GPUs used on each node, one training process (task) each; 0 trains on CPU nodes, one process "
        "per node. World size = nodes x max(1, gpus_per_node). Example: 4.",
    )
    cpus_per_task: int | None = Field(
        None, ge=1, le=1024, description="CPU cores for each training process. Default: Slurm's (1). Example: 8."
    )
    mem_gb: float | None = Field(
        None, gt=0, le=65536, description="Memory per node in GB (sbatch --mem). Default: the partition's. E.g. 64."
    )
    time_minutes: int | None = Field(
        None,
        ge=1,
        le=525_600,
        description="Time limit of the job in minutes; a job that reaches it saves nothing more, and is requeued to "
        "continue from its newest checkpoint. Default: the partition's default limit. Example: 240.",
    )
    account: str | None = Field(None, max_length=64, description="Account charged (sbatch --account). E.g. 'lab-nlp'.")
    qos: str | None = Field(None, max_length=64, description="Quality of service (sbatch --qos). Example: 'normal'.")
    python: str | None = Field(
        None,
        max_length=4096,
        description="Python interpreter on the nodes that has lmtuner[train] and submitit installed. Default: the "
        "path of this server's interpreter (which then must exist on every node). Example: '/opt/venv/bin/python'.",
    )
    folder: str | None = Field(
        None,
        max_length=4096,
        description="Where submitit keeps the job's batch script, pickles and per-task logs: a folder every node "
        "sees. Default: the run folder's slurm/. Example: '/shared/lmtuner-slurm'.",
    )

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_NAME.match(value):
            raise ValueError(f"{shown(value)} is not a Slurm name (letters, digits, '_', '.', '+', '-'; e.g. 'gpu')")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} is not an absolute interpreter path such as '/opt/venv/bin/python'")
        return value

    def tasks_per_node(self) -> int:
        """Training processes on each node: one per GPU, or one on a CPU node."""
        return max(1, self.gpus_per_node)


class RopeScaling(StrictModel):
    """Extend the context window beyond what the model was trained on."""

    type: RopeType = Field(description="Scaling method. Example: 'yarn'.")
    factor: float = Field(gt=1.0, le=64.0, description="New context / trained context. Example: 4.0.")


class DatasetSpec(StrictModel):
    """Where the training data is and how to read it."""

    path: str | None = Field(
        None,
        description="A .json/.jsonl/.csv/.parquet file or a folder of them. Example: 'data/train.jsonl'.",
    )
    name: str | None = Field(
        None,
        description="Name of an entry in a LLaMA-Factory dataset_info.json (instead of path). Example: "
        "'alpaca_en_demo'.",
    )
    dataset_dir: str | None = Field(
        None, description="Folder holding dataset_info.json, with `name`. Default: ./data, then the working dir."
    )
    format: DatasetFormat = Field(
        "auto",
        description="alpaca (instruction/input/output), sharegpt (conversations with from/value), messages "
        "(OpenAI role/content), text (plain text, loss on every token); preference pairs: preference (TRL's prompt/"
        "chosen/rejected, text or role/content turns), alpaca-ranking and sharegpt-ranking (LLaMA-Factory's chosen/"
        "rejected); kto (prompt/completion/label); or auto (detected from the rows).",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Column mapping as in LLaMA-Factory: {'prompt': 'question', 'response': 'answer'}; keys: "
        "prompt, query, response, system, history, messages, tools, text, chosen, rejected.",
    )
    eval_fraction: Annotated[float, Field(ge=0.0, le=0.5)] | Literal["auto"] = Field(
        "auto",
        description="Share of rows held out (never trained on) for the held-out loss, the best checkpoint, early "
        "stopping and the result report. 'auto' = 10%, at least 8 rows and at most 20% of them (none under 18 "
        "rows), at most 200; 0 = hold nothing out. Ignored when the config names an eval_dataset. Example: 0.1.",
    )
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows (for quick trials).")
    skip_bad_rows: bool = Field(
        False, description="Skip and count malformed rows instead of failing. Default: fail, naming the row."
    )

    @model_validator(mode="after")
    def _path_or_name(self) -> DatasetSpec:
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of `path` (a data file) or `name` (a dataset_info.json entry)")
        return self


class ReplaySettings(StrictModel):
    """Self-distillation replay: the base model's own answers to general requests, mixed into the training rows so
    the tuned model keeps its general way of answering while it learns the task (less forgetting)."""

    share: float = Field(
        0.2, gt=0.0, le=0.5, description="Share of the training rows that are replay rows. Example: 0.2."
    )
    max_new_tokens: int = Field(
        96, ge=8, le=1024, description="Longest base answer kept as a replay row (tokens). Example: 96."
    )
    prompts: Literal["requests", "questions", "mixed"] = Field(
        "requests",
        description="What the base model is asked: 'requests' (lmtuner's general requests, answered at length), "
        "'questions' (short general-knowledge questions, none of the retention probe's facts) or 'mixed' (half "
        "each). Example: 'mixed'.",
    )


class ReportSettings(StrictModel):
    """The result report a completed job writes: base vs tuned on the held-out rows, and what the model kept."""

    enabled: bool = Field(True, description="Write the report when the job completes. Example: true.")
    retention: bool = Field(
        True,
        description="Also ask lmtuner's general-knowledge probe of the base and the tuned model and report the share "
        "of what the base knew that the tuned model lost (forgetting). Example: true.",
    )
    max_rows: int = Field(
        48, ge=1, le=2000, description="Held-out rows answered by both models for the report (the first N). E.g. 48."
    )
    samples: int = Field(5, ge=0, le=50, description="Answers shown side by side in the report. Example: 5.")


class GRPOSettings(StrictModel):
    """How GRPO samples and weighs answers (TRL GRPOConfig's names)."""

    num_generations: int = Field(
        4, ge=2, le=256, description="Answers sampled per prompt; each is scored against the others of its group. "
        "batch_size × gradient_accumulation_steps must be a multiple of it. Example: 4.",
    )  # fmt: skip
    max_completion_length: int = Field(
        64, ge=1, le=131_072, description="Longest sampled answer, in tokens (keep it short on CPU). Example: 64."
    )
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature of the answers. Example: 1.0.")
    beta: float = Field(
        0.0, ge=0.0, le=10.0, description="KL penalty towards the starting model; 0 loads no reference model (less "
        "memory, TRL's default). Example: 0.04.",
    )  # fmt: skip
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Who samples the answers: vllm (colocated in the training process, CUDA only), "
        "transformers, or auto (vllm on CUDA when installed, else transformers). Example: 'auto'.",
    )  # fmt: skip


DpoLoss = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down", "sigmoid_norm"
]


class PreferenceSettings(StrictModel):
    """The preference stages' own knobs (TRL's names); unset = the stage's usual value."""

    beta: float | None = Field(
        None, gt=0.0, le=100.0,
        description="dpo / kto: how strongly the model is held near the reference (lower = moves further), usually "
        "0.1; orpo: weight of the odds-ratio term, usually 0.1; simpo: reward scale, usually 2.0. Example: 0.1.",
    )  # fmt: skip
    loss_type: DpoLoss | None = Field(
        None,
        description="dpo only: TRL's DPO loss variant: sigmoid (DPO, the default), ipo, hinge (SLiC), robust, "
        "bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, sigmoid_norm. Example: 'ipo'.",
    )
    simpo_gamma: float | None = Field(
        None, ge=0.0, le=10.0, description="simpo only: the target reward margin (TRL default 0.5). Example: 0.5."
    )
    desirable_weight: float | None = Field(
        None, gt=0.0, le=100.0, description="kto only: weight of desirable answers' loss (default 1). Example: 1.0."
    )
    undesirable_weight: float | None = Field(
        None, gt=0.0, le=100.0, description="kto only: weight of undesirable answers' loss (default 1). Example: 1.0."
    )


# Which preference settings a stage reads; any other set field is refused, naming the stages that read it.
PREFERENCE_FIELDS = {
    "beta": ("dpo", "orpo", "simpo", "kto"),
    "loss_type": ("dpo",),
    "simpo_gamma": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}


class TrainConfig(StrictModel):
    """A complete fine-tuning job. Only `model` and `dataset` are required; the rest have practitioners' defaults."""

    model: str = Field(
        description="Local model folder (containing config.json), a .gguf file (converted once), or Hugging Face "
        "hub id. Example: 'Qwen/Qwen2.5-0.5B-Instruct', './models/tiny' or './SmolLM2-135M-Instruct.Q4_1.gguf'.",
        min_length=1,
        max_length=4096,
    )
    model_gguf: str | None = Field(
        None,
        description="Set by start_training when `model` was a .gguf file: that file, while `model` becomes the "
        "Hugging Face folder it was converted into (under $LMTUNER_HOME/models/). Leave unset.",
        max_length=4096,
    )
    dataset: DatasetSpec = Field(
        description="Path to a data file (format detected), a dataset_info.json entry name, or an object. Example: "
        "'data/train.jsonl' or {'path': 'data/train.jsonl', 'format': 'alpaca', 'eval_fraction': 0.05}."
    )
    stage: Stage = Field(
        "sft",
        description="What the model learns from: sft (demonstrations), dpo / orpo / simpo (preference pairs: prompt, "
        "chosen, rejected), kto (single answers with a desirable label), reward (a reward model scoring chosen above "
        "rejected), grpo (prompts whose sampled answers graders score). Example: 'dpo'.",
    )
    preference: PreferenceSettings | None = Field(
        None,
        description="Knobs of the preference stages, e.g. {'beta': 0.1} for dpo, {'loss_type': 'ipo'}, "
        "{'simpo_gamma': 0.5}; omit for the stage's usual values.",
    )
    method: Method = Field("lora", description=method_description())
    output_dir: str | None = Field(
        None, description="Where the final adapter/model is written. Default: $LMTUNER_HOME/runs/<job_id>/final."
    )
    num_epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the data. Example: 3.")
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Stop after this many optimizer steps; overrides num_epochs."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1.0, description="Peak learning rate. Default by method: 2e-4 LoRA family, 2e-5 full."
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Rows per device per step. Example: 4.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, le=4096, description="Steps summed before each update; effective batch = batch_size × this × GPUs."
    )
    max_seq_len: int = Field(1024, ge=16, le=1_048_576, description="Rows are cut to this many tokens. Example: 2048.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA shape (LoRA-family methods).")
    freeze_trainable_layers: int = Field(
        2, ge=1, le=1000, description="With method 'freeze': how many of the last transformer layers train."
    )
    precision: Precision = Field("auto", description="auto = bf16 on GPUs that support it, else fp16; fp32 on CPU.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    packing: bool = Field(
        True,
        description="Padding-free batches: each step's batch_size rows are joined into one sequence with no padding, "
        "position ids restarting per row and attention kept inside each row, so the same rows and trained tokens "
        "per step cost no compute or memory for padding. Example: true; false for padded batches.",
    )
    group_by_length: bool = Field(
        True,
        description="With packing off: batch rows of similar length together so less padding is computed "
        "(order stays random between batches). Example: true.",
    )
    liger: bool | Literal["auto"] = Field(
        "auto",
        description="Liger Triton kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy: less memory, faster). 'auto' = "
        "on when CUDA and liger-kernel are present; true needs both (Triton has no CPU driver); false = off.",
    )
    deepspeed: DeepSpeedSettings | None = Field(
        None,
        description="ZeRO settings, e.g. {'stage': 3, 'offload_optimizer': true}; omit for plain data parallel.",
    )
    processes_per_node: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        "auto",
        description="Training processes on this node (data parallel, one per GPU). 'auto' = one per GPU in "
        "`devices`, 1 on the CPU. Example: 2 (on the CPU: 2 processes with the gloo backend).",
    )
    nodes: NodeSettings | None = Field(
        None,
        description="Multi-node training: {'count': 2, 'rank': 0, 'master_addr': '10.0.0.5', 'master_port': 29500}"
        " on node 0 and the same with rank 1 on the other. Omit for one machine.",
    )
    ray: RaySettings | None = Field(
        None,
        description="Run on a Ray cluster instead of this machine: {'address': 'http://head:8265', 'num_workers': 4,"
        " 'use_gpu': true, 'storage_path': '/shared/ckpt', 'max_failures': 1}. Omit (null) to train here.",
    )
    slurm: SlurmSettings | None = Field(
        None,
        description="Run on a Slurm cluster instead of this machine: {'partition': 'gpu', 'nodes': 2, "
        "'gpus_per_node': 4, 'cpus_per_task': 8, 'mem_gb': 64, 'time_minutes': 240}. Omit (null) to train here.",
    )
    rope_scaling: RopeScaling | None = Field(None, description="Context extension, e.g. {'type': 'yarn', 'factor': 4}.")
    report_to: list[Tracker] = Field(default_factory=list, description="Experiment trackers: 'wandb', 'tensorboard'.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed for init, shuffling and dropout.")
    resume_from: str | None = Field(None, description="A checkpoint folder to continue from.")
    optimizer: Literal["adamw", "adamw-8bit"] = Field(
        "adamw",
        description="For full/freeze/LoRA methods: 'adamw', or 'adamw-8bit' (bitsandbytes: optimizer states in 8 "
        "bits, ~4x less optimizer memory). lomo/adalomo bring their own.",
    )
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Share of steps spent warming up the LR.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, le=1000.0, description="Gradient clipping norm.")
    logging_steps: int | None = Field(
        None, ge=1, le=100_000, description="Log loss every N steps. Default: about 20 points per run, at most 10."
    )
    save_steps: int = Field(500, ge=1, le=10_000_000, description="Checkpoint every N steps (and at the end).")
    save_total_limit: int = Field(2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    eval_dataset: DatasetSpec | None = Field(
        None,
        description="Your own held-out rows (a path or an object like `dataset`): used instead of holding out a share "
        "of `dataset`. Example: 'data/test.jsonl'.",
    )
    eval_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Held-out loss every N steps. Default: about 8 times per run."
    )
    keep_best: bool = Field(
        True,
        description="The result is the checkpoint with the lowest held-out loss, not the last one (needs held-out "
        "rows). Example: true.",
    )
    early_stopping_patience: int | None = Field(
        3,
        ge=1,
        le=1000,
        description="Stop when the held-out loss has not improved for this many evaluations in a row; null = "
        "never stop early. Example: 3.",
    )
    replay: ReplaySettings | None = Field(
        None,
        description="Mix the base model's own answers to lmtuner's general requests into the training rows (self-"
        "distillation replay), so the model keeps answering other questions as it did: {'share': 0.2}, or a share "
        "alone (0.2). Chat data only. Example: {'share': 0.2}.",
    )
    report: ReportSettings = Field(
        default_factory=ReportSettings,
        description="The result report of a completed job (held-out scores base vs tuned, retention check, "
        "advice); false turns it off. It costs a few percent of a job's time (the report states how much). "
        "Example: {'retention': true, 'max_rows': 48} or false.",
    )
    assistant_only_loss: bool = Field(
        True, description="For chat data, learn only the assistant's turns (not the prompts)."
    )
    devices: list[int] | Literal["auto", "cpu"] = Field(
        "auto",
        description="GPU indices the job uses, e.g. [0, 1]; 'cpu'; or 'auto' (all visible GPUs, else the CPU). "
        "A job whose devices are busy waits as 'queued'.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub (only if trusted).")
    graders: GraderList | None = Field(
        None,
        description="Stage grpo: how each sampled answer is scored, 0-1 (a row's score is the weighted mean). Types: "
        "string_check {reference (a column), operation eq|contains|icontains}, regex {pattern}, json {schema, "
        "reference}, text_similarity {reference, metric rouge_l|bleu}, length {min_chars, max_chars}, python {file, "
        "function} (needs trust_remote_code); each with weight (default 1). Example: [{'type': 'string_check', "
        "'reference': 'answer', 'operation': 'eq'}, {'type': 'length', 'max_chars': 20, 'weight': 0.5}].",
    )
    grpo: GRPOSettings = Field(
        default_factory=GRPOSettings,
        description="Stage grpo: sampling settings. Example: {'num_generations': 4, 'max_completion_length': 32}.",
    )

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("eval_dataset", mode="before")
    @classmethod
    def _eval_dataset_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_shorthand(cls, value: Any) -> Any:
        return {"share": value} if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("report", mode="before")
    @classmethod
    def _report_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_shorthand(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> TrainConfig:
        if self.learning_rate is None:
            rate = STAGES[self.stage].learning_rate(default_learning_rate(self.method), METHODS[self.method].adapter)
            # object.__setattr__: validate_assignment would re-enter this validator.
            object.__setattr__(self, "learning_rate", rate)
        return self

    @model_validator(mode="after")
    def _stage_accepts_method(self) -> TrainConfig:
        refusal = stage_refusal(self.stage, self.method)
        if refusal:
            raise ValueError(f"stage: {refusal}")
        return self

    @model_validator(mode="after")
    def _python_graders_opted_in(self) -> TrainConfig:
        if self.stage == "grpo" and not self.graders:
            raise ValueError(
                "graders: stage 'grpo' rewards sampled answers with graders; declare at least one, e.g. "
                "[{'type': 'string_check', 'reference': 'answer', 'operation': 'eq'}] (test_grader tries them)"
            )
        if self.graders and self.stage != "grpo":
            raise ValueError(f"graders: only stage 'grpo' trains with graders (this job's stage is {self.stage!r}); "
                             "set stage 'grpo' or remove graders")  # fmt: skip
        check_python_opt_in(self.graders, self.trust_remote_code)
        if self.stage == "grpo" and self.eval_dataset is not None:
            raise ValueError(
                "eval_dataset: stage grpo measures nothing on held-out rows while it trains; remove it and score "
                "them before and after with evaluate(dataset=…, graders=…)"
            )
        per_step = self.batch_size * self.gradient_accumulation_steps
        if self.stage == "grpo" and per_step % self.grpo.num_generations:
            raise ValueError(
                f"grpo.num_generations: batch_size × gradient_accumulation_steps ({per_step}) must be a multiple of it "
                f"({self.grpo.num_generations}): a prompt's answers are compared within one step; e.g. batch_size "
                f"{self.grpo.num_generations * max(1, round(self.batch_size / self.grpo.num_generations))}"
            )
        return self

    @model_validator(mode="after")
    def _preference_fits_stage(self) -> TrainConfig:
        if self.preference is None:
            return self
        for name, stages in PREFERENCE_FIELDS.items():
            if getattr(self.preference, name) is not None and self.stage not in stages:
                raise ValueError(
                    f"preference.{name} applies to stage {' / '.join(stages)}, not {self.stage!r}; remove it or set "
                    f"stage to {stages[0]!r}"
                )
        return self

    @model_validator(mode="after")
    def _ray_runs_alone(self) -> TrainConfig:
        """On a Ray cluster, Ray places the processes: the settings for launching them here do not apply."""
        if self.ray is None:
            return self
        if self.nodes is not None:
            raise ValueError("ray: with a Ray cluster Ray places the workers; remove `nodes` (use ray.num_workers)")
        if self.processes_per_node != "auto":
            raise ValueError("ray: remove `processes_per_node`; ray.num_workers sets the number of training processes")
        if self.deepspeed is not None:
            raise ValueError("ray: DeepSpeed is not available on a Ray cluster in this version; remove `deepspeed`")
        return self

    @model_validator(mode="after")
    def _slurm_runs_alone(self) -> TrainConfig:
        """On a Slurm cluster, Slurm places the processes: the settings for launching them here do not apply."""
        if self.slurm is None:
            return self
        if self.ray is not None:
            raise ValueError("slurm, ray: a job runs on one cluster; keep either `slurm` or `ray` and remove the other")
        if self.nodes is not None:
            raise ValueError("slurm: Slurm places the processes; remove `nodes` (use slurm.nodes)")
        if self.processes_per_node != "auto":
            raise ValueError("slurm: remove `processes_per_node`; slurm.gpus_per_node sets the processes per node")
        if self.devices != "auto":
            raise ValueError("slurm: remove `devices`; Slurm gives each process its GPU (slurm.gpus_per_node)")
        if self.deepspeed is not None:
            raise ValueError("slurm: DeepSpeed is not available on a Slurm cluster in this version; remove `deepspeed`")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def dataset_spec(value: str | DatasetSpec) -> DatasetSpec:
    """A tool's dataset argument (a path or entry name, or a DatasetSpec) as a DatasetSpec, as TrainConfig reads it."""
    return value if isinstance(value, DatasetSpec) else DatasetSpec.model_validate({"path": value})


def parse_train_config(data: Any, *, source: str = "config") -> TrainConfig:
    """Validates a dict (tool input, CLI file, config.json) into TrainConfig, or raises LmtunerError."""
    if not isinstance(data, dict):
        raise LmtunerError(f"{source} must be an object with keys such as model, dataset, method; got {type(data)}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise LmtunerError(f"invalid {source}: {format_validation_error(exc)}") from None


def load_train_config_file(path: str | Path) -> TrainConfig:
    """Reads a JSON or YAML config file (as written by `lmtuner propose` or by hand)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LmtunerError(f"cannot read config file {path}: {exc.strerror}") from None
    if path.suffix in {".yaml", ".yml"}:
        import yaml  # only scripts with YAML configs pay for the import

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LmtunerError(f"config file {path} is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LmtunerError(f"config file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return parse_train_config(data, source=f"config file {path}")

"""Per-GPU training memory, estimated from a model's config.json alone (never its weights), for the planner.

Written by hand because no library does this: accelerate's `estimate-memory` and DeepSpeed's ZeRO estimators
instantiate the model (torch + transformers) and count only weights and optimizer states, not activations,
logits, quantized bases or LoRA. This module imports only the standard library and pydantic, so the server can
load it cheaply.

Every term is counted in bytes and reported in GiB (2**30 bytes), unrounded; each formula sits next to the line
that computes it, with why. The `*_gib` terms of a `MemoryEstimate` are what one GPU holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.methods import METHODS
from lmtuner_core.stages import STAGES

GIB = 2**30
LOAD_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per weight as loaded, and per activation element
NF4_BITS = 4 + 0.127  # QLoRA paper: 4-bit NF4 plus 0.127 bits/param of double-quantized block constants
LORA_BYTES = 4  # adapters (and DoRA magnitudes) are kept in fp32 for stable updates
CUDA_CONTEXT_GIB = 0.75  # CUDA context, cuBLAS workspaces and kernels: present before any tensor
CPU_PROCESS_GIB = 0.49  # measured: RSS of the training child once its recipe's imports are done (torch, transformers,
# peft, bitsandbytes, trl, datasets and what they pull in): 506 MiB in bench/cpu_memory.py
CPU_RUNTIME_GIB = 0.043  # measured on the tiny model, mmap threshold pinned: the first step's pools and lazy imports,
# the Trainer's and TRL's (44 MiB in lmtuner's recipe; 14 MiB in a bare training loop)
GLIBC_MMAP_MAX = 32 * 2**20  # glibc's dynamic mmap threshold stops here (64-bit): bigger blocks are always mmapped
# Share of one step's heap-served tensors that glibc still holds at the next step's peak, measured with lmtuner's
# recipe (bench/cpu_memory.py, glibc defaults minus a pinned threshold): 0.16-0.65 in 12 cases, SmolLM2 included
GLIBC_RETAINED_SHARE = 0.5
# With a 4-bit base glibc keeps much less (measured on SmolLM2 after the CPU loss and dropout of issue #14: QLoRA's
# peak sat 174 MiB and 35 MiB above its live tensors at 512 and 2,048 tokens, LoRA's 496 and 1,602 MiB): every
# 4-bit matmul dequantizes its weight into a fresh fp32 block, which changes how freed blocks are reused.
GLIBC_RETAINED_SHARE_NF4 = 0.2
FRAGMENTATION = 0.10  # the caching allocator rarely packs tensors tightly: ~10% of what they need
# TRL's SFTTrainer (1.16) scores the LM head in tiles of at most this many tokens × vocabulary entries (its
# chunked_logprob TOKEN_CHUNK_SIZE and _CHUNKED_LOGPROB_CHUNK_SIZE): the full tokens × vocab logits never exist.
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768
# Without Triton (the CPU) the backward of one tile holds the tile, seven fp32 temporaries of its size (the scaled
# logits twice, log p, p, the gradient, 1[target] - p and its product with the incoming gradient) and a
# one-byte target mask: counted from trl/kernels/chunked_logprob.py `_backward_tile`, the step's largest moment.
HEAD_TILE_COPIES_CPU = 7


def cpu_process_bytes() -> float:
    """What a training process holds on the CPU before it loads a model: Python and its imported libraries."""
    return CPU_PROCESS_GIB * GIB


class ModelShape(BaseModel):
    """The dimensions of a decoder-only transformer that its training memory depends on, from config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    param_count: int  # computed exactly from the shape by `shape_from_config`
    qkv_bias: bool = False  # Qwen2 puts biases on q, k and v (not on o)


class MemoryEstimate(BaseModel):
    """Training memory by term; every `*_gib` but `total_gib` and `cpu_offload_gib` is per GPU. per_gpu_gib =
    weights + gradients + optimizer + activations + logits + overhead - overlap."""

    total_gib: float  # per_gpu_gib × num_gpus: the GPU side only
    per_gpu_gib: float
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float  # runtime_gib + allocator_gib
    runtime_gib: float = 0.0  # fixed: the CUDA context, or the CPU process with its imports and thread pools
    allocator_gib: float = 0.0  # held by the allocator beyond live tensors: CUDA fragmentation, glibc's free lists
    overlap_gib: float = 0.0  # gradients and activations never held at once (one micro-batch): not in per_gpu_gib
    cpu_offload_gib: float  # optimizer states / weights moved to CPU RAM, all ranks together
    # Stage grpo (planning/grpo_memory.py): a reference model, the sampled answers' KV cache, vLLM's reserved share.
    reference_gib: float = 0.0
    generation_gib: float = 0.0
    vllm_gib: float = 0.0
    trainable_params: int
    total_params: int  # the base model plus any adapter
    notes: list[str]


# --- the parameter layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    name: str  # module path inside one transformer block, as PEFT's target_modules matches it
    fan_in: int
    fan_out: int
    bias: bool


def _is_gpt2(shape: ModelShape) -> bool:
    return shape.model_type == "gpt2"


def _block_linears(shape: ModelShape) -> list[_Linear]:
    """The linear layers of one transformer block."""
    h, i = shape.hidden_size, shape.intermediate_size
    if _is_gpt2(shape):  # Conv1D layers, all with biases; q, k and v are one fused projection
        return [
            _Linear("attn.c_attn", h, 3 * h, True),
            _Linear("attn.c_proj", h, h, True),
            _Linear("mlp.c_fc", h, i, True),
            _Linear("mlp.c_proj", i, h, True),
        ]
    q_dim = shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    b = shape.qkv_bias
    return [
        _Linear("self_attn.q_proj", h, q_dim, b),
        _Linear("self_attn.k_proj", h, kv_dim, b),
        _Linear("self_attn.v_proj", h, kv_dim, b),
        _Linear("self_attn.o_proj", q_dim, h, False),
        _Linear("mlp.gate_proj", h, i, False),  # SwiGLU: down(silu(gate(x)) * up(x))
        _Linear("mlp.up_proj", h, i, False),
        _Linear("mlp.down_proj", i, h, False),
    ]


def _block_params(shape: ModelShape) -> int:
    h = shape.hidden_size
    linear = sum(x.fan_in * x.fan_out + (x.fan_out if x.bias else 0) for x in _block_linears(shape))
    norms = 4 * h if _is_gpt2(shape) else 2 * h  # two norms per block; LayerNorm has weight + bias, RMSNorm weight
    return linear + norms


def _outer_matrices(shape: ModelShape) -> list[tuple[int, int]]:
    """The 2-D parameters outside the blocks as (rows, cols)."""
    h = shape.hidden_size
    out = [(shape.vocab_size, h)]  # token embeddings
    if _is_gpt2(shape):
        out.append((shape.max_position_embeddings, h))  # learned position embeddings
    if not shape.tie_word_embeddings:
        out.append((shape.vocab_size, h))  # lm_head; a tied head is the embedding matrix itself
    return out


def _matrices(shape: ModelShape) -> list[tuple[int, int]]:
    """Every 2-D parameter as (rows, cols); the rest of the model is 1-D (norms, biases)."""
    return _outer_matrices(shape) + [(x.fan_out, x.fan_in) for x in _block_linears(shape)] * shape.num_layers


def _count_params(shape: ModelShape) -> int:
    final_norm = 2 * shape.hidden_size if _is_gpt2(shape) else shape.hidden_size  # GPT-2's ln_f has a bias
    return sum(r * c for r, c in _outer_matrices(shape)) + shape.num_layers * _block_params(shape) + final_norm


# --- reading config.json ----------------------------------------------------------------------------------------


def _require(config: dict, key: str, model_type: str) -> int:
    value = config.get(key)
    if value is None:
        raise LmtunerError(
            f"config.json: '{key}' is missing, and a {model_type} model's memory cannot be estimated without it; "
            "pass the model's complete config.json",
            field="model",
        )
    return int(value)


def shape_from_config(config: dict) -> ModelShape:
    """The model's shape and exact parameter count from its config.json (Llama-like or GPT-2)."""
    if "hidden_size" not in config and "n_embd" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "llama")}
    model_type = str(config.get("model_type") or "llama")
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        raise LmtunerError(
            f"config.json: mixture-of-experts models ({experts} experts) are not supported by the memory estimate; "
            "use a dense model or plan memory by hand",
            field="model",
        )
    if model_type == "gpt2" or ("n_embd" in config and "hidden_size" not in config):
        h = _require(config, "n_embd", "gpt2")
        heads = _require(config, "n_head", "gpt2")
        shape = ModelShape(
            model_type="gpt2",
            hidden_size=h,
            intermediate_size=int(config.get("n_inner") or 4 * h),  # n_inner null means 4 × n_embd
            num_layers=_require(config, "n_layer", "gpt2"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=h // heads,
            vocab_size=int(config.get("vocab_size") or 50257),
            max_position_embeddings=int(config.get("n_positions") or config.get("n_ctx") or 1024),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),  # GPT-2's head is the embedding
            param_count=0,
        )
    else:  # Llama, Mistral, Qwen2 and any config with their keys
        h = _require(config, "hidden_size", model_type)
        heads = _require(config, "num_attention_heads", model_type)
        shape = ModelShape(
            model_type=model_type,
            hidden_size=h,
            intermediate_size=_require(config, "intermediate_size", model_type),
            num_layers=_require(config, "num_hidden_layers", model_type),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),  # absent: plain multi-head attention
            head_dim=int(config.get("head_dim") or h // heads),
            vocab_size=_require(config, "vocab_size", model_type),
            max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            param_count=0,
            qkv_bias=model_type == "qwen2",
        )
    return shape.model_copy(update={"param_count": _count_params(shape)})


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def load_shape(model_ref: str) -> ModelShape:
    """The shape of a model given as a local folder (or config.json path) or a hub id found in the HF cache."""
    path = Path(model_ref).expanduser()
    candidates = [path] if path.is_file() else [path / "config.json"]
    cache = _hub_cache()
    if model_ref.count("/") == 1 and not path.exists():
        snapshots = cache / f"models--{model_ref.replace('/', '--')}" / "snapshots"
        candidates = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise LmtunerError(
            f"model '{model_ref}': no config.json in that folder or in the Hugging Face cache ({cache}); the "
            f"memory estimate needs the model's config.json locally: download it (`huggingface-cli download "
            f"{model_ref} config.json`) or pass a folder that contains it",
            field="model",
        )
    try:
        config = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmtunerError(f"model '{model_ref}': {found} is not readable JSON ({exc}); re-download it") from exc
    if not isinstance(config, dict):
        raise LmtunerError(f"model '{model_ref}': {found} is not a JSON object; re-download it", field="model")
    return shape_from_config(config)


# --- the estimate -----------------------------------------------------------------------------------------------


OPTIMIZER_BYTES = {"adamw": 8, "adamw-8bit": 2}  # 2 states (m, v) × 4 bytes in fp32, or × 1 byte quantized


def _adapted(shape: ModelShape, targets: str | list[str]) -> list[_Linear]:
    """The block linears LoRA wraps, once per block."""
    linears = _block_linears(shape)
    if targets == "all-linear":
        return linears
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]

    def matches(layer: _Linear, t: str) -> bool:  # PEFT matches by suffix; "q" is short for "q_proj"
        return layer.name == t or layer.name.endswith(f".{t}") or layer.name.endswith(f".{t}_proj")

    unknown = [t for t in names if not any(matches(x, t) for x in linears)]
    if unknown or not names:
        valid = ", ".join(sorted({x.name.rsplit(".", 1)[1] for x in linears}))
        raise LmtunerError(
            f"lora_targets: {unknown or names!r} matches no linear layer of a {shape.model_type} model; "
            f"use 'all-linear' or some of {valid}",
            field="lora_targets",
        )
    return [x for x in linears if any(matches(x, t) for t in names)]


def _linear_input(layer: _Linear) -> str:
    """Which tensor a block linear reads: q, k and v (and gate and up) share one input."""
    if layer.name.endswith(("q_proj", "k_proj", "v_proj", "c_attn")):
        return "attn_in"
    if layer.name.endswith(("gate_proj", "up_proj", "c_fc")):
        return "mlp_in"
    return "attn_out" if layer.name.startswith(("self_attn.", "attn.")) else "mlp_mid"


def _activation_bytes_per_token(
    shape: ModelShape,
    load: int,
    base_trains: bool,
    adapted: list[_Linear],
    lora_r: int,
    lora_dropout: float,
    on_gpu: bool,
) -> float:
    """Bytes one block keeps for backward per token, as HF's Llama block and PEFT's LoRA layers save them: counted
    with torch.autograd.graph.saved_tensors_hooks on CPU in fp32 and under bf16 autocast (tests/test_memory.py
    checks it against the tiny model). `load` is the compute dtype's size (2 under autocast)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    # Each norm keeps its input in fp32 (RMSNorm upcasts: 4 bytes × h; in fp32 it is the input itself), and,
    # only when its weight trains, the normalized input it multiplies that weight with.
    norm = 4 * h + (load * h if base_trains else 0)
    if _is_gpt2(shape):
        # Derived from the code, not measured: fused q, k, v and SDPA's output (4h), GELU's input (i), and the
        # two residual dropouts' masks.
        core = 2 * norm + load * (4 * h + i) + 2 * h * (1 if on_gpu else 4)
    else:
        # SDPA (flash / memory-efficient) keeps q, k, v after RoPE and its output, which is o_proj's input; no
        # seq × seq matrix, only a per-row logsumexp. SwiGLU keeps gate (SiLU's input), silu(gate) and up.
        core = 2 * norm + load * (2 * q_dim + 2 * kv_dim) + load * 3 * i
    sizes = {"attn_in": h, "attn_out": q_dim, "mlp_in": h, "mlp_mid": i}
    # A linear keeps its input only when its own weight trains (a frozen F.linear keeps just the weight). LoRA's
    # dropout keeps a 1-byte mask: CUDA's fused kernel, and on the CPU lmtuner's CPUDropout (training/cpu_dropout).
    mask = 1
    extra = 0
    for name, size in sizes.items():
        readers = [x for x in adapted if _linear_input(x) == name]
        # One shared copy: a training base linear's input, or (fp32, no dropout) the input lora_A reads as is.
        # SDPA's output is o_proj's input and is already in `core`.
        if name != "attn_out" and (base_trains or (readers and not lora_dropout and load == 4)):
            extra += load * size
        for _ in readers:
            # LoRA: lora_B keeps lora_A's r-wide output. Each adapted layer has its own dropout (a mask and its
            # output); adapters are fp32, so a 16-bit input is cast up by PEFT and back down by autocast for the
            # matmul, which keeps that 16-bit copy, one per adapted layer.
            extra += load * lora_r
            if lora_dropout:
                extra += size * (mask + load)
            elif load < 4:
                extra += size * load
    return core + extra


def _glibc_retained(
    activations: float, logits: float, tokens: int, shape: ModelShape, head_tensor: float, share: float
) -> float:
    """Bytes glibc malloc keeps resident after torch has freed them, in a CPU training process.

    glibc serves a block from mmap (returned to the OS on free) only above its mmap threshold, and it raises that
    threshold to the size of each mmapped block freed, up to 32 MiB. After the first step, every activation
    tensor under that size comes from the heap, which is given back only from its top: part of the previous
    step's freed activations stays resident beside the next step's. How much depends on how allocations
    interleave; measured with lmtuner's recipe (bench/cpu_memory.py, defaults vs a pinned threshold) it was
    0.16-0.65 of one step's heap-served tensors (0.5-0.9 in a bare training loop): GLIBC_RETAINED_SHARE (less with
    a 4-bit base: GLIBC_RETAINED_SHARE_NF4), and nothing for tensors of 32 MiB or more. `head_tensor` is the LM
    head's largest single tensor in bytes, which decides the same for the logits term."""
    widest = max(shape.hidden_size, shape.intermediate_size) * tokens * 4  # an MLP activation or a dropout mask
    retained = activations if widest < GLIBC_MMAP_MAX else 0.0
    return share * (retained + (logits if head_tensor < GLIBC_MMAP_MAX else 0.0))


def _check(name: str, value: object, allowed: Collection[object]) -> None:
    if value not in allowed:
        raise LmtunerError(f"{name}: {shown(value)} is not one of {', '.join(map(str, allowed))}", field=name)


def estimate_memory(
    shape: ModelShape,
    *,
    method: str,
    precision: str,
    batch_size: int,
    seq_len: int,
    lora_r: int = 16,
    lora_targets: str | list[str] = "all-linear",
    lora_dropout: float = 0.05,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    num_gpus: int = 1,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    freeze_trainable_layers: int = 2,
    on_gpu: bool = True,
    packing: bool = True,
    stage: str = "sft",
) -> MemoryEstimate:
    """What training `shape` with these settings holds on each GPU, term by term."""
    _check("method", method, METHODS)
    _check("stage", stage, STAGES)
    _check("precision", precision, LOAD_BYTES)
    _check("optimizer", optimizer, OPTIMIZER_BYTES)
    _check("zero_stage", zero_stage, (0, 1, 2, 3))
    counts = (("batch_size", batch_size), ("seq_len", seq_len), ("lora_r", lora_r), ("num_gpus", num_gpus))
    for name, value in (*counts, ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise LmtunerError(f"{name}: {value} must be at least 1", field=name)
    if offload_params and zero_stage != 3:
        raise LmtunerError("offload_params: needs zero_stage 3 (only stage 3 partitions weights)", field="zero_stage")
    if offload_optimizer and zero_stage == 0:
        raise LmtunerError("offload_optimizer: needs zero_stage 1, 2 or 3", field="zero_stage")

    m = METHODS[method].memory
    notes: list[str] = []
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size
    load = LOAD_BYTES[precision]  # bytes per frozen weight and per activation element (autocast compute dtype)
    total = shape.param_count
    linears = _block_linears(shape)
    block_linear_weights = L * sum(x.fan_in * x.fan_out for x in linears)  # what bitsandbytes quantizes

    # Trainable parameters and the dtype they are kept in.
    layers_with_grad = L  # blocks whose activations backward needs
    adapter = 0
    if m.trains == "adapter":
        adapted = _adapted(shape, lora_targets)
        # LoRA: A (r × in) + B (out × r) per adapted layer = r × (in + out); DoRA adds a magnitude of size out.
        adapter = L * sum(lora_r * (x.fan_in + x.fan_out) + (x.fan_out if m.magnitude else 0) for x in adapted)
        trainable, trainable_bytes, trainable_base = adapter, LORA_BYTES, 0
        notes.append(
            f"{method} r={lora_r} on {len(adapted)} linear layers per block: {adapter:,} trainable fp32 parameters "
            f"({100 * adapter / total:.2f}% of the model)"
        )
    else:
        if m.trains == "last_layers":
            n = min(freeze_trainable_layers, L)
            if n < freeze_trainable_layers:
                notes.append(f"freeze_trainable_layers {freeze_trainable_layers} > {L} layers: all {L} train")
            trainable = n * _block_params(shape)  # the last n blocks; embeddings, head and final norm stay frozen
            layers_with_grad = n  # backward stops at the first trainable block: earlier ones save nothing
        else:
            trainable = total
        trainable_base = trainable
        # bf16: pure bf16 weights; fp16 mixed precision keeps fp32 master weights (fp16 updates underflow);
        # LOMO trains in the load dtype with loss scaling: that is how it avoids a master copy.
        trainable_bytes = load if (m.fused or precision == "bf16") else 4
        if precision == "fp16" and not m.fused:
            notes.append("fp16 mixed precision: trainable weights and their gradients are kept in fp32")

    # Weights.
    other = total - block_linear_weights  # embeddings, lm_head, norms, biases: never quantized
    if m.base_quant == "nf4":
        # qlora: block linears at 4.127 bits (NF4 + double-quantized constants); the rest in the load dtype.
        weights = block_linear_weights * NF4_BITS / 8 + other * load
        notes.append(
            "qlora: block linear weights in 4-bit NF4 with double quantization (4.127 bits/param); embeddings, "
            f"lm_head and norms stay {precision}"
        )
    elif m.base_quant == "int8":
        # LLM.int8: 1 byte per linear weight plus one fp32 scale per output row (bitsandbytes' SCB).
        weights = block_linear_weights + L * sum(x.fan_out for x in linears) * 4 + other * load
    else:
        # frozen weights in the load dtype; trainable ones in their training dtype (fp32 masters under fp16)
        weights = (total - trainable_base) * load + trainable_base * trainable_bytes
    weights += adapter * LORA_BYTES  # adapters live next to the base, in fp32
    spec = STAGES[stage]
    if spec.reference_model and m.trains != "adapter":
        # DPO / KTO with full weights: TRL loads a frozen reference copy of the model in the load dtype.
        weights += total * load
        notes.append(f"stage {stage}: a frozen reference copy of the model ({total * load / GIB:.2f} GiB)")
    elif spec.reference_model:
        # LoRA family: the reference is the base with the adapter switched off (TRL keeps a copy of the adapter).
        weights += adapter * LORA_BYTES
        notes.append(f"stage {stage}: the reference is the base with the adapter off (no second model)")
    elif stage != "sft" and spec.data != "prompts":
        notes.append(f"stage {stage}: no reference model (the loss needs none)")
    if m.base_quant and not on_gpu:
        # On CPU, bitsandbytes quantizes at load time from the checkpoint, which transformers memory-maps: those
        # file pages are resident in the process too (measured on the 26M model: +104 MiB for 97 MiB of fp32
        # block linears). On a GPU they sit in host RAM, not on the device.
        weights += block_linear_weights * load
        notes.append(f"{method} on CPU: the original block weights stay mapped from the checkpoint file")

    # Gradients: one per trainable parameter, in its dtype. LOMO/AdaLomo fuse the update into backward and free
    # each gradient right away, so at most the largest single parameter's gradient exists at once.
    if m.fused:
        largest = max(r * c for r, c in _matrices(shape))
        gradients = largest * trainable_bytes
    else:
        gradients = trainable * trainable_bytes

    # Optimizer states.
    if m.fused == "lomo":
        optimizer_bytes = 0  # plain SGD inside backward: no state
    elif m.fused == "adalomo":
        # Adafactor-style factored second moment: a row and a column vector in fp32 per 2-D parameter;
        # 1-D parameters (norms, biases) keep a full fp32 second moment, as AdaLomo's code does.
        matrices = _matrices(shape)
        one_d = total - sum(r * c for r, c in matrices)
        optimizer_bytes = sum(r + c for r, c in matrices) * 4 + one_d * 4
        if optimizer != "adamw":
            notes.append(f"optimizer '{optimizer}' is ignored: adalomo brings its own")
    else:
        # AdamW: m and v per trainable parameter, in the parameter's dtype (torch creates them with zeros_like):
        # fp32 adapters and fp16 masters 8 bytes, a pure-bf16 model 4; 8-bit AdamW quantizes both (2 bytes).
        # DeepSpeed's ZeRO optimizer keeps an fp32 master copy and fp32 m, v of 16-bit weights (12 bytes).
        per_param = OPTIMIZER_BYTES[optimizer] * trainable_bytes // 4 if optimizer == "adamw" else 2
        if zero_stage and trainable_bytes < 4 and optimizer == "adamw":
            per_param = 12
        optimizer_bytes = trainable * per_param
    if m.fused == "lomo" and optimizer != "adamw":
        notes.append(f"optimizer '{optimizer}' is ignored: lomo updates with plain SGD inside backward")

    # Activations saved for backward: counted tensor by tensor from what autograd keeps in HF's Llama block
    # (see `_activation_bytes_per_token`).
    base_trains = m.trains != "adapter"  # full / freeze / lomo train the block's own weights; adapters do not
    adapted_linears = _adapted(shape, lora_targets) if m.trains == "adapter" else []
    per_token_block = _activation_bytes_per_token(
        shape, load, base_trains, adapted_linears, lora_r, lora_dropout, on_gpu
    )
    # Preference stages put both answers of a row through the model in one batch (chosen and rejected; KTO an
    # answer and its mismatched KL answer): twice the sequences of an SFT step. TRL pads them (no packing).
    sequences = 2 if spec.data in ("pairs", "unpaired") else 1
    if sequences > 1:
        packing = False
        notes.append(f"stage {stage}: 2 sequences per row (chosen and rejected) in each forward pass")
    tokens = batch_size * seq_len * sequences
    # Outside the blocks: when every weight trains, the final norm keeps its fp32 input, its normalized input and
    # its output (lm_head's input, needed for lm_head's gradient). With a frozen embedding (adapters, freeze) the
    # final norm's fp32 input is offset by the first trained block's norm, whose input needs no gradient.
    outer = (4 * h + 2 * load * h) if m.trains == "all" else 0
    if gradient_checkpointing:
        # Only each block's input (h per token) is kept; one block's activations are rebuilt at a time in backward.
        activations = tokens * (layers_with_grad * h * load + per_token_block + outer)
    else:
        activations = tokens * (layers_with_grad * per_token_block + outer)

    # Logits. On a GPU: HF's loss upcasts them to fp32 and log-softmax keeps its fp32 output for backward; the
    # backward of the loss then holds that output, the gradient arriving at it and the gradient it passes on, all
    # batch × seq × vocab in fp32, at once (× 3; measured: a 128k vocabulary's peak grows by exactly 3 copies).
    # lmtuner's recipe runs TRL's chunked LM head instead, which on CUDA (Triton) holds far less; not measured on a
    # GPU here, so the GPU keeps this upper bound. On the CPU it is measured (bench/cpu_memory.py, SmolLM2):
    logits = tokens * V * 4 * 3
    head_tensor = tokens * V * 4  # the head's largest single tensor: one fp32 copy of the logits
    if not on_gpu:
        # Both CPU paths hold, while every activation is still alive, the hidden states' fp32 gradient and, when
        # the head's weight trains, its fp32 gradient (V × h; the tied embedding's, for full fine-tuning). Then:
        head_trains = m.trains == "all"  # freeze leaves embeddings and head frozen; adapters never wrap lm_head
        head_gradients = tokens * h * 4 + (V * h * 4 if head_trains else 0)
        if packing:
            # lmtuner's loss for padding-free batches (training/label_logits.py): the logits of the label positions
            # (at most every token), their fp32 log-softmax kept for backward, and in the backward the gradient
            # that arrives at it and the one it passes on (× 3).
            logits = tokens * V * 4 * 3 + head_gradients
        else:
            # TRL's chunked head without Triton: the loss's backward holds one tile of tokens × vocabulary (the
            # tile buffer in the compute dtype, 7 fp32 temporaries, a 1-byte mask).
            tile = min(tokens, HEAD_TILE_TOKENS) * min(V, HEAD_TILE_VOCAB)
            logits = tile * (load + 4 * HEAD_TILE_COPIES_CPU + 1) + head_gradients
            head_tensor = tile * 4

    if spec.scalar_head:  # a reward model's head has one output: no vocabulary-sized logits
        logits = head_tensor = tokens * 4 * 3

    # ZeRO: stage 1 shards optimizer states over the GPUs, stage 2 also gradients, stage 3 also weights.
    # Activations and logits belong to each GPU's own micro-batch and are not sharded.
    n = num_gpus
    if zero_stage and n == 1:
        notes.append("ZeRO over one GPU shards nothing; only offloading changes memory")
    cpu = 0.0
    optimizer_gpu = optimizer_bytes / n if zero_stage >= 1 else optimizer_bytes
    gradients_gpu = gradients / n if zero_stage >= 2 else gradients
    weights_gpu = weights / n if zero_stage >= 3 else weights
    if offload_optimizer:
        cpu += optimizer_bytes  # all ranks' shards together in host RAM
        optimizer_gpu = 0
    if offload_params:
        cpu += weights
        # the GPU still gathers one block (or the embedding) at a time to compute with it
        weights_gpu = max(_block_params(shape), V * h) * load
    if cpu:
        notes.append(f"{cpu / GIB:.1f} GiB of CPU RAM holds the offloaded states (all ranks together)")

    # Gradients fill in as backward frees the activations: with one micro-batch per step (and `zero_grad` setting
    # them to None) the peak is either at the start of backward (activations, logits, no gradients) or at its end
    # (all gradients, no activations), never both. Measured: full fine-tuning of the 26M model peaks at weights +
    # AdamW states + activations + logits, without the gradients. Accumulation keeps gradients across micro-batches.
    overlap = min(gradients_gpu, activations + logits) if gradient_accumulation_steps == 1 else 0.0
    # Overhead = a fixed runtime + what the allocator holds beyond the live tensors.
    held = weights_gpu + gradients_gpu + optimizer_gpu + activations + logits - overlap
    if on_gpu:
        # the CUDA context; PyTorch's caching allocator rounds and splits blocks: ~10% of what the tensors need
        runtime, allocator = CUDA_CONTEXT_GIB * GIB, FRAGMENTATION * held
    else:
        # the process with its imports and the first step's pools; glibc malloc has no such slack once tensors
        # are mmapped (RSS then follows the live tensors to within ~1%: bench/cpu_memory.py --malloc-fixed), but
        # with its default, moving mmap threshold it keeps freed activation memory (see `_glibc_retained`)
        runtime = cpu_process_bytes() + CPU_RUNTIME_GIB * GIB
        share = GLIBC_RETAINED_SHARE_NF4 if m.base_quant == "nf4" else GLIBC_RETAINED_SHARE
        allocator = _glibc_retained(activations, logits, tokens, shape, head_tensor, share)
    overhead = runtime + allocator
    per_gpu = held + overhead

    if logits > activations:
        notes.append(
            f"logits (batch × seq × {V:,}-token vocabulary in fp32, and their gradient) outweigh the activations; "
            "a smaller batch_size or seq_len shrinks them"
        )
    if not gradient_checkpointing and activations > 0.3 * per_gpu:
        saved = tokens * (layers_with_grad * h * load + per_token_block + outer)
        notes.append(
            f"gradient_checkpointing would cut activations from {activations / GIB:.1f} to {saved / GIB:.1f} GiB"
        )

    return MemoryEstimate(
        total_gib=per_gpu * n / GIB,
        per_gpu_gib=per_gpu / GIB,
        weights_gib=weights_gpu / GIB,
        gradients_gib=gradients_gpu / GIB,
        optimizer_gib=optimizer_gpu / GIB,
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
        overhead_gib=overhead / GIB,
        runtime_gib=runtime / GIB,
        overlap_gib=overlap / GIB,
        allocator_gib=allocator / GIB,
        cpu_offload_gib=cpu / GIB,
        trainable_params=trainable,
        total_params=total + adapter,
        notes=notes,
    )

"""What GRPO holds beyond a supervised step of the same batch: the reference model (or none), the sampled answers'
KV cache, and, with vLLM colocated, the share of the GPU that vLLM reserves for itself.

- Reference model: TRL keeps one only when the KL term is on (grpo.beta > 0). With an adapter method it is the base
  with the adapter switched off (no second copy); with full weights (full, freeze) it is a second copy in the load
  dtype. beta = 0 (TRL's default) loads none.
- Generation: batch_size × gradient_accumulation_steps answers are sampled at once per process (TRL's generation
  batch), each holding a KV cache of 2 × layers × KV heads × head_dim values per token, for up to max_seq_len tokens
  (prompt + answer; the prompt's length is not known to the planner, max_seq_len bounds it), plus one step's logits.
  The cache is freed before the training forward pass, so it overlaps the activations: the larger of the two counts.
- vLLM (grpo.engine vllm, or auto on CUDA with vLLM installed): colocated, it reserves VLLM_GPU_SHARE of each GPU
  (TRL's vllm_gpu_memory_utilization) for its own weights and KV cache; the transformers generation term is then 0.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from lmtuner_core.methods import METHODS
from lmtuner_core.planning.memory import GIB, LOAD_BYTES, MemoryEstimate, ModelShape

VLLM_GPU_SHARE = 0.3  # TRL's default vllm_gpu_memory_utilization, passed by the GRPO recipe


@dataclass
class GRPOMemory:
    reference_bytes: float
    generation_bytes: float
    vllm_bytes: float
    notes: list[str] = field(default_factory=list)


def grpo_memory(
    shape: ModelShape, config, precision: str, *, on_gpu: bool, gpu_total_gib: float | None = None
) -> GRPOMemory:
    """GRPO's extra terms for `config` (a TrainConfig with stage 'grpo') on one device."""
    settings = config.grpo
    load = LOAD_BYTES[precision]
    notes = []
    reference = 0.0
    if settings.beta > 0 and METHODS[config.method].memory.trains != "adapter":
        reference = shape.param_count * load
        notes.append(f"grpo: beta {settings.beta:g} keeps a frozen copy of the model as the reference "
                     f"({reference / GIB:.2f} GiB)")  # fmt: skip
    elif settings.beta > 0:
        notes.append("grpo: the reference model is the base with the adapter switched off (no second copy)")
    else:
        notes.append("grpo: beta 0 — no reference model is loaded")
    vllm = settings.engine == "vllm" or (
        settings.engine == "auto" and on_gpu and importlib.util.find_spec("vllm") is not None
    )
    sequences = config.batch_size * config.gradient_accumulation_steps
    if vllm and on_gpu:
        share = VLLM_GPU_SHARE * (gpu_total_gib or 0.0) * GIB
        notes.append(f"grpo: vLLM colocated reserves {VLLM_GPU_SHARE:.0%} of the GPU ({share / GIB:.1f} GiB) for "
                     "sampling")  # fmt: skip
        return GRPOMemory(reference, 0.0, share, notes)
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * load
    generation = sequences * (config.max_seq_len * kv_per_token + shape.vocab_size * 4)
    notes.append(f"grpo: sampling {sequences} answers at once holds {generation / GIB:.2f} GiB of KV cache (up to "
                 f"max_seq_len {config.max_seq_len} tokens each)")  # fmt: skip
    return GRPOMemory(reference, generation, 0.0, notes)


def with_grpo_memory(estimate: MemoryEstimate, terms: GRPOMemory, num_gpus: int) -> MemoryEstimate:
    """The estimate with GRPO's terms: the reference and vLLM's share held throughout; the generation cache in place
    of the activations when it is the larger (they are not held at once)."""
    extra = terms.reference_bytes + terms.vllm_bytes
    activations = estimate.activations_gib * GIB + estimate.logits_gib * GIB
    extra += max(0.0, terms.generation_bytes - activations)
    per_gpu = estimate.per_gpu_gib + extra / GIB
    return estimate.model_copy(
        update={
            "per_gpu_gib": per_gpu,
            "total_gib": per_gpu * max(1, num_gpus),
            "reference_gib": terms.reference_bytes / GIB,
            "generation_gib": terms.generation_bytes / GIB,
            "vllm_gib": terms.vllm_bytes / GIB,
            "notes": [*estimate.notes, *terms.notes],
        }
    )

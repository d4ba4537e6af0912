"""The memory estimate: exact published parameter counts from config.json, exact weight bytes, and how each term
scales with batch, sequence length, ZeRO, checkpointing, quantization and the optimizer."""

from __future__ import annotations

import json

import pytest

from lmtuner_core.errors import LmtunerError
from lmtuner_core.planning.memory import GIB, cpu_process_bytes, estimate_memory, load_shape, shape_from_config

# The dimensions each model's published config.json gives; the counts are the published parameter counts.
LLAMA_3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
LLAMA_3_70B = {
    **LLAMA_3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
QWEN_25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
QWEN_25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
SMOLLM2_135M = {  # SmolLM2-135M-Instruct's config.json (the dimensions only)
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (LLAMA_3_8B, 8_030_261_248),
        (QWEN_25_05B, 494_032_768),
        (QWEN_25_7B, 7_615_616_512),
        (MISTRAL_7B, 7_241_732_096),
        (GPT2, 124_439_808),
        (LLAMA_3_70B, 70_553_706_496),
    ],
    ids=["llama-3-8b", "qwen2.5-0.5b", "qwen2.5-7b", "mistral-7b-v0.1", "gpt2", "llama-3-70b"],
)
def test_parameter_counts_match_the_published_ones(config, count):
    assert shape_from_config(config).param_count == count


def test_shape_defaults_and_unknown_llama_like_types():
    gpt2 = shape_from_config(GPT2)
    assert (gpt2.intermediate_size, gpt2.tie_word_embeddings, gpt2.max_position_embeddings) == (3072, True, 1024)
    no_gqa = {k: v for k, v in LLAMA_3_8B.items() if k not in ("num_key_value_heads", "tie_word_embeddings")}
    shape = shape_from_config({**no_gqa, "model_type": "somethingnew"})
    assert (shape.num_kv_heads, shape.head_dim, shape.tie_word_embeddings) == (32, 128, False)
    assert shape.param_count == 8_030_261_248 + 32 * 2 * 4096 * (4096 - 1024)  # full-size k and v


def test_missing_key_names_it():
    config = {k: v for k, v in LLAMA_3_8B.items() if k != "intermediate_size"}
    with pytest.raises(LmtunerError, match="intermediate_size"):
        shape_from_config(config)
    with pytest.raises(LmtunerError, match="n_layer"):
        shape_from_config({k: v for k, v in GPT2.items() if k != "n_layer"})


def estimate(config=LLAMA_3_8B, **kw):
    settings = {"method": "full", "precision": "bf16", "batch_size": 1, "seq_len": 1024, **kw}
    return estimate_memory(shape_from_config(config), **settings)


def test_weight_bytes_are_exact():
    assert estimate(method="lora", lora_r=1, lora_targets=["q_proj"]).weights_gib * GIB == (
        8_030_261_248 * 2 + 32 * (4096 + 4096) * 4  # bf16 base + fp32 adapter
    )
    assert estimate().weights_gib == pytest.approx(8_030_261_248 * 2 / GIB, abs=1e-6)
    assert estimate(precision="fp32").weights_gib * GIB == 8_030_261_248 * 4
    assert estimate(precision="fp16").weights_gib * GIB == 8_030_261_248 * 4  # fp32 master weights


def test_activations_and_logits_scale_linearly_with_tokens():
    base = estimate(batch_size=2, seq_len=512)
    for longer in (estimate(batch_size=2, seq_len=1024), estimate(batch_size=4, seq_len=512)):
        assert longer.activations_gib == 2 * base.activations_gib
        assert longer.logits_gib == 2 * base.logits_gib
        assert longer.weights_gib == base.weights_gib
    assert base.logits_gib * GIB == 2 * 512 * 128256 * 4 * 3  # fp32: log-softmax output + 2 gradients


def test_zero_shards_states_over_gpus():
    one = estimate(num_gpus=1, zero_stage=3)  # ZeRO on one GPU shards nothing
    zero3 = estimate(num_gpus=8, zero_stage=3)
    zero2 = estimate(num_gpus=8, zero_stage=2)
    for term in ("weights_gib", "gradients_gib", "optimizer_gib"):
        assert getattr(zero3, term) == getattr(one, term) / 8
    # DeepSpeed keeps an fp32 master copy and fp32 Adam states of bf16 weights; plain torch AdamW keeps bf16 states
    assert one.optimizer_gib * GIB == 8_030_261_248 * 12
    assert estimate().optimizer_gib * GIB == 8_030_261_248 * 4
    assert zero2.weights_gib == one.weights_gib
    assert (zero2.gradients_gib, zero2.optimizer_gib) == (one.gradients_gib / 8, one.optimizer_gib / 8)
    assert (zero3.activations_gib, zero3.logits_gib) == (one.activations_gib, one.logits_gib)
    assert zero3.total_gib == pytest.approx(zero3.per_gpu_gib * 8)


def test_offload_moves_states_to_cpu():
    sharded = estimate(num_gpus=8, zero_stage=3)
    offloaded = estimate(num_gpus=8, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert offloaded.optimizer_gib == 0
    assert offloaded.weights_gib < sharded.weights_gib
    assert offloaded.cpu_offload_gib == pytest.approx(8 * (sharded.optimizer_gib + sharded.weights_gib))
    with pytest.raises(LmtunerError, match="zero_stage 3"):
        estimate(num_gpus=8, zero_stage=2, offload_params=True)


def test_gradient_checkpointing_keeps_one_input_per_layer():
    plain, checkpointed = estimate(), estimate(gradient_checkpointing=True)
    assert checkpointed.activations_gib < plain.activations_gib / 10  # 32 layers: ~13× less for Llama-3-8B
    assert checkpointed.activations_gib > plain.activations_gib / 32


def test_quantized_bases():
    # A small vocabulary: almost all weights are block linears, so NF4 brings bf16 weights to ~0.28×.
    mistral_bf16, mistral_nf4 = estimate(MISTRAL_7B, method="lora"), estimate(MISTRAL_7B, method="qlora")
    assert 0.26 < mistral_nf4.weights_gib / mistral_bf16.weights_gib < 0.30
    # Llama-3-8B's 128k-token embedding and head (1.05B params) stay 16-bit, which lifts the ratio to ~0.36.
    bf16, nf4 = estimate(method="lora"), estimate(method="qlora")
    assert 0.33 < nf4.weights_gib / bf16.weights_gib < 0.37
    block_linears = 32 * 218_103_808
    assert nf4.weights_gib * GIB == pytest.approx(
        block_linears * 4.127 / 8 + (8_030_261_248 - block_linears) * 2 + nf4.trainable_params * 4
    )
    int8 = estimate(method="lora-8bit")
    assert nf4.weights_gib < int8.weights_gib < bf16.weights_gib


def test_lora_trainable_parameters():
    lora = estimate(method="lora", lora_r=16)
    assert lora.trainable_params == 41_943_040
    assert lora.total_params == 8_030_261_248 + 41_943_040
    assert lora.gradients_gib * GIB == 41_943_040 * 4
    assert lora.optimizer_gib * GIB == 41_943_040 * 8
    dora = estimate(method="dora")
    assert dora.trainable_params == 41_943_040 + 32 * (4096 + 1024 * 2 + 4096 + 14336 * 2 + 4096)
    assert estimate(method="lora", lora_targets="q,v").trainable_params == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    with pytest.raises(LmtunerError, match="lora_targets"):
        estimate(method="lora", lora_targets=["query_key_value"])


def test_optimizers_and_fused_methods():
    adamw, adamw8 = estimate(precision="fp16"), estimate(optimizer="adamw-8bit")  # fp16: fp32 masters and states
    assert adamw8.optimizer_gib == adamw.optimizer_gib / 4
    lomo = estimate(method="lomo")
    assert lomo.optimizer_gib == 0
    assert lomo.gradients_gib * GIB == 128256 * 4096 * 2  # only the largest parameter (the embedding) at once
    adalomo = estimate(method="adalomo")
    assert 0 < adalomo.optimizer_gib < adamw.optimizer_gib / 1000  # factored: rows + cols per matrix


def test_freeze_trains_the_last_layers_only():
    freeze = estimate(method="freeze", freeze_trainable_layers=2)
    assert freeze.trainable_params == 2 * 218_112_000
    full = estimate()
    final_norm = 1024 * (4 + 2 + 2) * 4096  # full fine-tuning alone keeps the final norm's input, norm and output
    # backward stops at the first trainable block: the earlier 30 keep nothing
    assert freeze.activations_gib * GIB == pytest.approx((full.activations_gib * GIB - final_norm) * 2 / 32)


def test_seventy_billion_full_finetune_does_not_fit_one_gpu():
    big = estimate(LLAMA_3_70B)
    assert big.per_gpu_gib > 500
    assert big.overhead_gib > 0.75
    assert estimate(on_gpu=False).overhead_gib < estimate().overhead_gib


def test_unknown_settings_are_refused():
    for bad in ({"method": "prefix"}, {"precision": "int4"}, {"optimizer": "sgd"}, {"batch_size": 0}):
        with pytest.raises(LmtunerError, match=next(iter(bad))):
            estimate(**bad)


def test_load_shape_from_a_folder_and_from_the_hub_cache(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_25_05B))
    assert load_shape(str(folder)).param_count == 494_032_768

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(GPT2))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert load_shape("org/name").param_count == 124_439_808

    with pytest.raises(LmtunerError, match=r"config\.json locally"):
        load_shape("org/missing")


@pytest.mark.parametrize(
    ("method", "precision"),
    [("full", "fp32"), ("lora", "fp32"), ("qlora", "fp32"), ("full", "bf16"), ("lora", "bf16")],
)
def test_activations_are_what_autograd_saves(tiny_model, method, precision):
    """The activation term against the bytes autograd really keeps for backward in one forward pass of the tiny
    model, built by lmtuner's own model setup (bf16: weights in bf16 under autocast, as the Trainer runs); on
    CPU, where dropout keeps an fp32 mask."""
    import contextlib

    import torch

    from lmtuner_core.config import TrainConfig
    from lmtuner_core.training.model_setup import apply_method, load_base_model

    config = TrainConfig.model_validate(
        {"model": str(tiny_model), "dataset": "unused.jsonl", "method": method, "precision": precision}
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = apply_method(load_base_model(config, precision, dtype), config)
    model.train()
    shape = load_shape(str(tiny_model))
    batch, seq = 2, 64
    ids = torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):  # one entry per storage: views of one tensor are counted once, weights not at all
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=dtype) if precision == "bf16" else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    expected = estimate_memory(shape, method=method, precision=precision, batch_size=batch, seq_len=seq, on_gpu=False)
    # The loss keeps log-softmax's fp32 output (tokens × vocab × 4), which the logits term counts.
    measured = sum(saved.values()) - batch * seq * shape.vocab_size * 4
    assert expected.activations_gib * GIB == pytest.approx(measured, rel=0.08)  # LoRA: +5% here, +1% at 26M


def test_allocator_slack_cuda_fragmentation_and_glibc_retention():
    gpu = estimate(method="lora")
    held = gpu.weights_gib + gpu.gradients_gib + gpu.optimizer_gib + gpu.activations_gib + gpu.logits_gib
    held -= gpu.overlap_gib
    assert gpu.allocator_gib == pytest.approx(0.10 * held)
    assert gpu.overhead_gib == pytest.approx(gpu.runtime_gib + gpu.allocator_gib)
    # CPU: glibc keeps half of one step's freed activations (measured 0.16-0.65) while its tensors stay under its
    # 32 MiB mmap ceiling...
    small = {**QWEN_25_05B, "vocab_size": 1000}
    short = estimate(small, method="lora", precision="fp32", seq_len=256, on_gpu=False)
    assert short.allocator_gib == pytest.approx(0.5 * (short.activations_gib + short.logits_gib))
    # ...and none of the activations once every activation tensor is big enough to be mmapped and handed back on
    # free. The LM head: padding-free batches hold all label positions' logits in one tensor (16,384 × 1000 fp32
    # is over the ceiling); padded batches go through TRL's tiles (at most 4096 tokens × a 1000-token vocabulary),
    # which stay under it at any length
    long = estimate(small, method="lora", precision="fp32", seq_len=4096, batch_size=4, on_gpu=False)
    assert long.allocator_gib == 0
    padded = estimate(small, method="lora", precision="fp32", seq_len=4096, batch_size=4, on_gpu=False, packing=False)
    assert padded.allocator_gib == pytest.approx(0.5 * padded.logits_gib)
    # a 4-bit base: glibc keeps less (measured on SmolLM2)
    nf4 = estimate(small, method="qlora", precision="fp32", seq_len=256, on_gpu=False)
    assert nf4.allocator_gib == pytest.approx(0.2 * (nf4.activations_gib + nf4.logits_gib))
    wide = estimate(QWEN_25_05B, method="lora", precision="fp32", seq_len=4096, batch_size=4, on_gpu=False)
    assert wide.allocator_gib == 0


def test_lora_dropout_keeps_a_one_byte_mask_on_gpu_and_cpu():
    with_dropout = estimate(method="lora", precision="fp32")
    without = estimate(method="lora", precision="fp32", lora_dropout=0.0)
    # dropout: every adapted layer keeps its own dropped-out input and a 1-byte mask (CUDA's kernel; CPUDropout)
    fan_in = 32 * 1024 * (4096 * 6 + 14336)  # q, k, v, o, gate, up read 4096 values; down reads 14336
    assert (with_dropout.activations_gib - without.activations_gib) * GIB == pytest.approx(
        fan_in * (4 + 1) - 32 * 1024 * (2 * 4096 + 14336) * 4  # fp32 without dropout: lora_A reads the shared input
    )
    on_cpu = estimate(method="lora", precision="fp32", on_gpu=False)
    assert on_cpu.activations_gib == pytest.approx(with_dropout.activations_gib)


def test_gradients_and_activations_do_not_coexist_with_one_micro_batch():
    one = estimate(seq_len=4096)  # full fine-tuning, one micro-batch per step
    accumulated = estimate(seq_len=4096, gradient_accumulation_steps=4)
    # backward frees activations as it fills gradients: the peak holds the larger of the two, not both
    assert one.overlap_gib == min(one.gradients_gib, one.activations_gib + one.logits_gib)
    assert accumulated.overlap_gib == 0  # accumulated gradients stay through the next micro-batch's forward
    assert accumulated.per_gpu_gib - one.per_gpu_gib == pytest.approx(one.overlap_gib * 1.10)  # + fragmentation
    lora = estimate(method="lora")
    assert lora.overlap_gib == lora.gradients_gib  # adapters' gradients are tiny next to the activations


# Peak RSS above the pre-load baseline (MiB) of lmtuner's recipe training SmolLM2-135M on the CPU: fp32, batch 2,
# 3 steps, glibc defaults, plain-text rows (every token a label), with the CPU loss from the label positions' logits
# and CPUDropout (bench/cpu_memory.py --model, docs/MEMORY.md, 2026-12-02 00:05 UTC).
SMOLLM2_MEASURED = [("full", 256, 2941.0), ("lora", 256, 2197.8), ("qlora", 256, 1928.2),
                    ("full", 1024, 6114.1), ("lora", 1024, 6570.2), ("qlora", 1024, 5055.5)]  # fmt: skip


@pytest.mark.parametrize(("method", "seq", "measured_mib"), SMOLLM2_MEASURED)
def test_cpu_estimate_within_20_percent_of_smollm2_measured(method, seq, measured_mib):
    shape = shape_from_config(SMOLLM2_135M)
    assert shape.param_count == 134_515_008
    e = estimate(SMOLLM2_135M, method=method, precision="fp32", batch_size=2, seq_len=seq, on_gpu=False)
    error = ((e.per_gpu_gib * GIB - cpu_process_bytes()) / 2**20 - measured_mib) / measured_mib
    assert -0.20 <= error <= 0.20

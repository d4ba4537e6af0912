"""Estimated vs measured training memory on a GPU (issue #3), for random-init models of real shapes.

For each shape and method: build the model from its config (random weights, no download), train a few steps
at the given sequence length, and compare torch.cuda.max_memory_allocated with lmtuner's estimate. The
estimate's fixed overhead (CUDA context, fragmentation) is not part of max_memory_allocated, so the
comparison uses the estimate without it. Prints one row per case and the error in percent (goal: within 10%).

    python bench/gpu_memory.py                       # on a GPU: llama-3.2-1b and llama-3-8b shapes
    python bench/gpu_memory.py --shapes tiny --seq 128   # anywhere: checks the script runs (no CUDA: estimate only)
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.planning.memory import estimate_memory, shape_from_config

SHAPES = {
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 500000.0,
    },
    "llama-3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "rope_theta": 500000.0,
    },
    "tiny": {
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
}  # fmt: skip
METHODS = {
    "llama-3.2-1b": ["lora", "qlora", "full"],
    "llama-3-8b": ["lora", "qlora"],
    "tiny": ["lora", "qlora", "full"],
}


def build(shape_name: str, method: str, cuda: bool, workdir: Path):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(**{k: v for k, v in SHAPES[shape_name].items() if k != "model_type"})
    if method == "qlora":
        folder = workdir / shape_name
        if not (folder / "config.json").exists():  # quantization happens at load: save random weights once
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                     device_map={"": 0 if cuda else "cpu"}, dtype=dtype)  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.to("cuda" if cuda else "cpu")
    if method in ("lora", "qlora"):
        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        )  # lmtuner's default LoRA: every linear layer, dropout 0.05
    return model


def measure(shape_name: str, method: str, seq: int, batch: int, steps: int, workdir: Path) -> float | None:
    import torch

    cuda = torch.cuda.is_available()
    model = build(shape_name, method, cuda, workdir)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    device = "cuda" if cuda else "cpu"
    ids = torch.randint(0, SHAPES[shape_name]["vocab_size"], (batch, seq), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):  # as the Trainer runs bf16
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=list(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA: estimates only)'}; seq {args.seq}, "
          f"batch {args.batch}, {args.steps} steps, bf16 on GPU / fp32 on CPU")  # fmt: skip
    print(f"{'shape':<14}{'method':<8}{'estimate GiB':>14}{'measured GiB':>14}{'error':>9}{'seconds':>9}")
    workdir = Path(tempfile.mkdtemp(prefix="lmtuner-gpu-memory-"))
    for shape_name in args.shapes:
        shape = shape_from_config(SHAPES[shape_name])
        for method in METHODS[shape_name]:
            estimate = estimate_memory(
                shape, method=method, precision="bf16" if cuda else "fp32", batch_size=args.batch, seq_len=args.seq,
                on_gpu=cuda,
            )  # fmt: skip
            predicted = estimate.per_gpu_gib - estimate.overhead_gib  # max_memory_allocated has no context/fragments
            started = time.monotonic()
            try:
                measured = measure(shape_name, method, args.seq, args.batch, args.steps, workdir)
            except torch.cuda.OutOfMemoryError:
                measured = float("inf")
            error = f"{100 * (predicted - measured) / measured:+.1f}%" if measured not in (None, float("inf")) else "-"
            shown = "OOM" if measured == float("inf") else ("n/a" if measured is None else f"{measured:.2f}")
            print(
                f"{shape_name:<14}{method:<8}{predicted:>14.2f}{shown:>14}{error:>9}{time.monotonic() - started:>9.1f}"
            )


if __name__ == "__main__":
    main()

"""Estimated vs measured training memory on the CPU (issue #3): peak RSS of a training process minus its RSS
just before it loads the model (imports done, the random model it wrote for loading freed and trimmed), against
lmtuner's estimate without the process's fixed import cost, for full, LoRA and QLoRA on the tiny model and a
~26M-parameter Llama. Each case runs in its own process so peaks do not mix. Results: docs/MEMORY.md.

The child trains as lmtuner's training child does on a CPU: fp32, SDPA attention, LoRA r=16 on every linear
layer with dropout 0.05, torch AdamW. `--malloc-fixed` pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) so
freed tensors go back to the OS at once: RSS then follows the live tensors, which shows how much of the default
peak is memory glibc keeps after torch has freed it.

    .venv/bin/python bench/cpu_memory.py [--seq 256 512] [--batch 4] [--steps 3] [--malloc-fixed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.planning.memory import GIB, cpu_process_bytes, estimate_memory, shape_from_config

SHAPES = {
    "tiny-0.6m": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000},
    "small-26m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 1000},
}  # fmt: skip
METHODS = ("full", "lora", "qlora")

CHILD = r"""
import ctypes, gc, json, sys, tempfile
import torch, transformers, peft, bitsandbytes  # imported before the baseline is read
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
shape, method, seq, batch, steps = json.loads(sys.argv[1])
imported = rss("VmRSS")
torch.manual_seed(0)
config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
folder = tempfile.mkdtemp()
AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # qlora quantizes at load time
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # the random model built for saving is not part of training
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM: the peak counts from here
baseline = rss("VmRSS")
if method == "qlora":
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
if method in ("lora", "qlora"):
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
model.config.use_cache = False
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5)
ids = torch.randint(0, shape["vocab_size"], (batch, seq))
for _ in range(steps):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"peak": rss("VmHWM"), "baseline": baseline, "imported": imported}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--malloc-fixed", action="store_true", help="pin glibc's mmap threshold (live tensors)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.malloc_fixed:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    allocator = "glibc, mmap threshold pinned at 64 KiB" if args.malloc_fixed else "glibc defaults"
    print(f"CPU, fp32, batch {args.batch}, {args.steps} steps, {allocator}; measured = peak RSS - RSS before loading")
    print("estimate = live tensors + first-step runtime; + glibc = that plus the retention the estimate adds on CPU")
    print(f"{'shape':<11}{'params':>8}{'method':>8}{'seq':>6}{'measured':>10}{'estimate':>10}{'error':>8}"
          f"{'+ glibc':>10}{'error':>8}   (MiB)")  # fmt: skip
    for name in args.shapes:
        dims = SHAPES[name]
        shape = shape_from_config({"model_type": "llama", "max_position_embeddings": 4096, **dims})
        for seq in args.seq:
            for method in args.methods:
                estimate = estimate_memory(shape, method=method, precision="fp32", batch_size=args.batch,
                                           seq_len=seq, on_gpu=False)  # fmt: skip
                # the process's imports are in the baseline; everything else the estimate counts is not
                full = (estimate.per_gpu_gib * GIB - cpu_process_bytes()) / 2**20
                live = full - estimate.allocator_gib * 1024
                payload = json.dumps([dims, method, seq, args.batch, args.steps])
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True, env=env
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                measured = (result["peak"] - result["baseline"]) / 2**20
                errors = [100 * (value - measured) / measured for value in (live, full)]
                print(f"{name:<11}{shape.param_count / 1e6:>7.1f}M{method:>8}{seq:>6}{measured:>10.1f}{live:>10.1f}"
                      f"{errors[0]:>+7.0f}%{full:>10.1f}{errors[1]:>+7.0f}%"
                      f"   (imports {result['imported'] / 2**20:.0f} MiB)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

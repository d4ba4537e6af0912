"""Estimated vs measured training memory on the CPU (issue #3): peak RSS of a training process minus its RSS
after imports, against lmtuner's estimate without its fixed overhead, for full, LoRA and QLoRA on the tiny
model and a ~26M-parameter Llama. Each case runs in its own process so peaks do not mix.

    .venv/bin/python bench/cpu_memory.py [--seq 256] [--batch 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.memory import estimate_memory, shape_from_config

SHAPES = {
    "tiny-0.6m": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000},
    "small-26m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 1000},
}  # fmt: skip
METHODS = ("full", "lora", "qlora")

CHILD = r"""
import json, sys, tempfile
import torch, transformers, peft, bitsandbytes  # imported before the baseline is read
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
shape, method, seq, batch, steps = json.loads(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
folder = tempfile.mkdtemp()
AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # qlora quantizes at load time
baseline = rss("VmRSS")
if method == "qlora":
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
if method in ("lora", "qlora"):
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
model.config.use_cache = False
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5)
ids = torch.randint(0, shape["vocab_size"], (batch, seq))
for _ in range(steps):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"peak": rss("VmHWM"), "baseline": baseline}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU, fp32, seq {args.seq}, batch {args.batch}, {args.steps} steps; measured = peak RSS - RSS after imports")
    print(f"{'shape':<11}{'params':>8}{'method':>8}{'estimate MiB':>14}{'measured MiB':>14}{'error':>9}")
    for name, dims in SHAPES.items():
        shape = shape_from_config({"model_type": "llama", "max_position_embeddings": 4096, **dims})
        for method in METHODS:
            estimate = estimate_memory(shape, method=method, precision="fp32", batch_size=args.batch,
                                       seq_len=args.seq, on_gpu=False)  # fmt: skip
            predicted = (estimate.per_gpu_gib - estimate.overhead_gib) * 1024
            payload = json.dumps([dims, method, args.seq, args.batch, args.steps])
            out = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            measured = (result["peak"] - result["baseline"]) / 2**20
            error = 100 * (predicted - measured) / measured
            print(f"{name:<11}{shape.param_count / 1e6:>7.1f}M{method:>8}{predicted:>14.1f}{measured:>14.1f}"
                  f"{error:>+8.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()

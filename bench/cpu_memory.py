"""Estimated vs measured training memory on the CPU (issue #3, issue #14 item 6): peak RSS of a training process
minus its RSS just before it loads the model (imports, tokenizer and tokenized data done, freed memory trimmed),
against lmtuner's estimate without the process's fixed import cost, for full, LoRA and QLoRA. Each case runs in
its own process so peaks do not mix. Results: docs/MEMORY.md.

The child is lmtuner's own training recipe (`SFTRecipe`, what `python -m lmtuner_core.training.train` runs): fp32,
SDPA attention with padding-free batches, LoRA r=16 on every linear layer with dropout 0.05, torch AdamW, TRL's
SFTTrainer (its loss from the label positions' logits on the CPU: `label_logits`), QLoRA through bitsandbytes as
`model_setup` loads it. One micro-batch per step (gradient_accumulation_steps 1). Every row is plain text cut at
`--seq` tokens, so a step holds exactly batch × seq tokens. The peak is read at the end of the last step, before the
final checkpoint (which the bench skips).

Models: random-weight Llamas of two shapes (tiny-0.6m, small-26m; a 1000-token vocabulary from lmtuner's tiny
tokenizer), or `--model PATH`, any model a user has: a Hugging Face folder or a .gguf file (converted once, as
start_training does). `--malloc-fixed` pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) so freed tensors go
back to the OS at once: RSS then follows the live tensors, which shows how much of the default peak is memory
glibc keeps after torch has freed it.

    .venv/bin/python bench/cpu_memory.py [--seq 256 512] [--batch 4] [--steps 3] [--malloc-fixed]
    .venv/bin/python bench/cpu_memory.py --model ~/.cache/lmtuner/smollm2-hf --seq 256 1024 --batch 2 \
        --data data/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.planning.memory import GIB, cpu_process_bytes, estimate_memory, load_shape

SHAPES = {
    "tiny-0.6m": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32},
    "small-26m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 8, "head_dim": 64},
}  # fmt: skip
METHODS = ("full", "lora", "qlora")

CHILD = r"""
import ctypes, gc, json, sys, threading
from pathlib import Path
import torch, transformers, peft, bitsandbytes, trl  # imported before the baseline is read
from transformers import TrainerCallback
from lmtuner_core.config import TrainConfig
from lmtuner_core.jobs.run_folder import RunDir, StateFile
from lmtuner_core.training.recipe import SFTRecipe

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model, data, method, seq, batch, steps, run_dir = json.loads(sys.argv[1])
marks = {"imported": rss("VmRSS")}
load_model = SFTRecipe._setup_model

def setup_model_from_baseline(self):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # tokenizing is not part of training
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak counts from here
    marks["baseline"] = rss("VmRSS")
    load_model(self)

SFTRecipe._setup_model = setup_model_from_baseline

class LastStepPeak(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        marks["peak"] = rss("VmHWM")
        control.should_save = False  # the final checkpoint is a save, not training

config = TrainConfig(model=model, dataset={"path": data, "format": "text"}, method=method, max_seq_len=seq,
                     batch_size=batch, gradient_accumulation_steps=1, max_steps=steps, precision="fp32",
                     logging_steps=1, output_dir=str(Path(run_dir) / "final"))
run = RunDir(Path(run_dir))
run.config.write_text(config.model_dump_json())
recipe = SFTRecipe(config, run, StateFile(run), threading.Event())
recipe.setup()
recipe.trainer.add_callback(LastStepPeak())
recipe.train()
print(json.dumps(marks))
"""


def random_model(name: str, folder: Path) -> Path:
    """A random-weight Llama of SHAPES[name] with lmtuner's tiny tokenizer, written once into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtuner_core.training.tiny_model import make_tiny_model

    out = make_tiny_model(folder / name)
    config = AutoConfig.from_pretrained(out)  # the tiny model's: vocabulary, special tokens
    for key, value in SHAPES[name].items():
        setattr(config, key, value)
    config.max_position_embeddings, config.tie_word_embeddings = 4096, False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def text_rows(source: Path | None, seq: int, count: int) -> list[dict]:
    """`count` plain-text rows, each far longer than `seq` tokens (the recipe cuts them to exactly `seq`), built
    from every string in a JSON / JSON-lines data file, or from lmtuner's demo rows."""
    if source is None:
        from lmtuner_core.data.sample_data import demo_rows

        records: list = demo_rows(400)
    elif source.suffix == ".jsonl":
        records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = json.loads(source.read_text(encoding="utf-8"))

    def strings(value) -> list[str]:
        if isinstance(value, str):
            return [value] if value.strip() else []
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return [s for item in items for s in strings(item)]

    pieces = [s for record in records for s in strings(record)]
    rows, at = [], 0
    for _ in range(count):
        text = []
        while sum(map(len, text)) < 8 * seq:  # ≥ 2 characters per token in any tokenizer: 4 × seq tokens or more
            text.append(pieces[at % len(pieces)])
            at += 1
        rows.append({"text": "\n\n".join(text)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a model folder or .gguf file instead of the random shapes")
    parser.add_argument("--data", type=Path, help="a JSON / JSON-lines file whose strings make the text rows")
    parser.add_argument("--seq", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--malloc-fixed", action="store_true", help="pin glibc's mmap threshold (live tensors)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu-memory-"))
    try:
        run_cases(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # random models, text rows and run folders


def run_cases(args: argparse.Namespace, work: Path) -> None:
    env = dict(os.environ)
    env["LMTUNER_HOME"] = str(work / "home")  # the tokenized-data cache stays out of the user's home
    if args.malloc_fixed:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    if args.model:
        from lmtuner_core.models.reference import resolve_model
        from lmtuner_core.paths import AllowedRoots

        # a .gguf is converted once, as start_training does
        folder = resolve_model(args.model, AllowedRoots(None), trust_remote_code=False)
        models = {Path(args.model).name: Path(folder)}
    else:
        models = {name: random_model(name, work / "models") for name in args.shapes}
    allocator = "glibc, mmap threshold pinned at 64 KiB" if args.malloc_fixed else "glibc defaults"
    print(f"CPU, fp32, batch {args.batch}, {args.steps} steps, {allocator}; measured = peak RSS - RSS before loading")
    print("estimate = live tensors + first-step runtime; + glibc = that plus the retention the estimate adds on CPU")
    print(f"{'model':<24}{'params':>8}{'method':>8}{'seq':>6}{'measured':>10}{'estimate':>10}{'error':>8}"
          f"{'+ glibc':>10}{'error':>8}   (MiB)")  # fmt: skip
    for name, folder in models.items():
        shape = load_shape(str(folder))
        for seq in args.seq:
            data = work / f"text-{seq}.jsonl"
            rows = text_rows(args.data, seq, args.batch * args.steps)
            data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            for method in args.methods:
                estimate = estimate_memory(shape, method=method, precision="fp32", batch_size=args.batch,
                                           seq_len=seq, on_gpu=False)  # fmt: skip
                # the process's imports are in the baseline; everything else the estimate counts is not
                full = (estimate.per_gpu_gib * GIB - cpu_process_bytes()) / 2**20
                live = full - estimate.allocator_gib * 1024
                run_dir = Path(tempfile.mkdtemp(dir=work))
                payload = json.dumps([str(folder), str(data), method, seq, args.batch, args.steps, str(run_dir)])
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env,
                    cwd=Path(__file__).resolve().parent.parent,
                )  # fmt: skip
                if out.returncode:
                    sys.exit(f"{name} {method} seq {seq} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                measured = (result["peak"] - result["baseline"]) / 2**20
                errors = [100 * (value - measured) / measured for value in (live, full)]
                print(f"{name[:23]:<24}{shape.param_count / 1e6:>7.1f}M{method:>8}{seq:>6}{measured:>10.1f}"
                      f"{live:>10.1f}{errors[0]:>+7.0f}%{full:>10.1f}{errors[1]:>+7.0f}%"
                      f"   (imports {result['imported'] / 2**20:.0f} MiB, baseline {result['baseline'] / 2**20:.0f})",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

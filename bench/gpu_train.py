"""Training throughput and peak memory on a GPU for LoRA, QLoRA, full and full + Liger (issue #4, part 5).

A random-init Llama-3.2-1B-shaped model (config written by hand, no download) is saved once, then each case
runs in its own process (so peak memory and Liger's module patching stay per case) through lmtuner's own
loader and method builders (`model_setup.load_base_model`, `apply_method`, `resolve_liger`) and the
transformers Trainer with `use_liger_kernel`, as a job does. 20 steps of random tokens at seq 2048; the first
`--warmup` steps are not timed. Prints one row per case: tokens/s and torch.cuda.max_memory_allocated.

    python bench/gpu_train.py              # on the GPU (bf16)
    python bench/gpu_train.py --tiny       # the same code path on the tiny model on CPU (fp32, seq 128, 3 steps);
                                           # full+liger is reported as skipped there (Triton has no CPU driver)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_3_2_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001,
}  # fmt: skip
CASES = {  # name -> (method, liger)
    "lora": ("lora", False),
    "qlora": ("qlora", False),
    "full": ("full", False),
    "full+liger": ("full", True),
}


def make_model(folder: Path, tiny: bool) -> Path:
    """Writes the model once: quantized methods quantize at load, so the weights must be on disk."""
    if (folder / "config.json").exists():
        return folder
    if tiny:
        from lmtuner_core.training.tiny_model import make_tiny_model

        return make_tiny_model(folder)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3_2_1B), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def run_case(model_dir: str, case: str, steps: int, warmup: int, seq: int, batch: int) -> dict:
    """Trains one case in this process and returns its measurements."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmtuner_core.config import parse_train_config
    from lmtuner_core.errors import LmtunerError
    from lmtuner_core.training.model_setup import apply_method, load_base_model, resolve_liger, resolve_precision

    method, liger = CASES[case]
    cuda = torch.cuda.is_available()
    config = parse_train_config(
        {"model": model_dir, "dataset": "unused.jsonl", "method": method, "liger": liger, "max_seq_len": seq}
    )
    try:
        use_liger, _ = resolve_liger(config.liger)
    except LmtunerError as exc:
        return {"case": case, "skipped": str(exc)}
    precision, dtype = resolve_precision("auto")
    model = apply_method(load_base_model(config, precision, dtype), config)
    model.config.use_cache = False
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq,), generator=generator) for _ in range(steps * batch)]
    data = [{"input_ids": ids, "labels": ids} for ids in rows]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                self.started = time.perf_counter()

    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda, use_liger_kernel=use_liger,
            save_strategy="no", report_to="none", logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - (timer.started or time.perf_counter())
    timed_tokens = (steps - warmup) * batch * seq
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": case, "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": precision,
        "liger": use_liger, "steps": steps, "seq": seq, "batch": batch,
        "tokens_per_second": round(timed_tokens / elapsed, 1) if elapsed > 0 else None,
        "peak_memory_gib": round(peak / 2**30, 3), "peak_kind": "cuda max_memory_allocated" if cuda else "RSS",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script end to end")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 128 with --tiny)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp dir)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run a single case
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    seq = args.seq or (128 if args.tiny else 2048)
    if not 0 <= warmup < steps:
        parser.error("--warmup must be at least 0 and below --steps")

    if args.one:
        print("RESULT " + json.dumps(run_case(args.model, args.one, steps, warmup, seq, args.batch)), flush=True)
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(args.workdir or tmp) / ("tiny" if args.tiny else "llama-3.2-1b-random"), args.tiny)
        print(f"model: {model_dir}; {steps} steps ({warmup} untimed), seq {seq}, batch {args.batch}", flush=True)
        print(f"{'case':<12} {'tokens/s':>10} {'peak GiB':>9}  notes")
        for case in cases:
            command = [sys.executable, __file__, "--one", case, "--model", str(model_dir), "--steps", str(steps),
                       "--warmup", str(warmup), "--seq", str(seq), "--batch", str(args.batch)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                print(f"{case:<12} {'-':>10} {'-':>9}  failed (exit {done.returncode}): {' | '.join(tail)}")
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            if "skipped" in result:
                print(f"{case:<12} {'-':>10} {'-':>9}  skipped: {result['skipped']}")
            else:
                notes = f"{result['device']}, {result['precision']}, {result['peak_kind']}"
                print(f"{case:<12} {result['tokens_per_second']:>10} {result['peak_memory_gib']:>9}  {notes}")
            print("JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

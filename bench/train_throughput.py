"""Training throughput side by side (issue #8): one epoch of LoRA SFT over real variable-length rows.

    .venv/bin/python bench/train_throughput.py [--rows 240] [--max-len 1024] [--batch 8] [--rounds 2]
        [--only plain,llamafactory,lmtuner] [--work DIR] [--lf-venv DIR] [--shape bench-26m]
        [--model PATH] [--whole-process]

`--model PATH` trains a real model instead of a random shape: a Hugging Face folder or a `.gguf` file (converted
once, as lmtuner's tools do, into the work folder's LMTUNER_HOME), with its own tokenizer and chat template.
`--whole-process` times what a user waits for, each configuration as one process from start to exit: imports,
loading, tokenizing, training and saving the adapter; lmtuner as `lmtuner train --follow CONFIG` (the CLI, the job
store, the training process it starts and its final save). Peak RSS is then the training process's own (for
lmtuner the job's `peak_rss_mib` in state.json).

On a GPU (prepared for the H200 the device tool sometimes lends; see docs/BENCHMARKS.md) the same comparison
runs in bf16 on random-init Llama-3.2-1B or Llama-3-8B shapes: `--shape llama-3.2-1b --max-len 2048 --rows 999`;
each run then also reports peak GPU memory (torch.cuda.max_memory_allocated) and MFU against --peak-tflops.

Three configurations train the same ~26M-parameter random Llama (BPE of 1,200 tokens trained here on the rows
themselves) on the same first N rows of LLaMA-Factory's alpaca_en_demo.json, batch size, max length and LoRA
(r=8 on all 7 linear modules), one epoch each:
  plain        the script a user writes: transformers Trainer + PEFT, each batch padded to its longest row
  llamafactory LLaMA-Factory in its own venv (bench/setup_llamafactory.sh) with its fastest settings: packing on,
               gradient checkpointing off; skipped with a message when that venv is absent
  llamafactory-padded  the same with LLaMA-Factory's default packing off (batches padded, like plain)
  lmtuner      lmtuner's recipe (SFTRecipe) with its defaults: padding-free packing, SDPA
Runs alternate (plain, llamafactory, lmtuner, plain, ...) so a machine shared with others loads all alike; each
run is its own process so peak RSS values do not mix. Timed: trainer.train() from on_train_begin to
on_train_end (model loading and tokenization are not). Real tokens: non-padding input tokens the model saw
(the Trainer's num_input_tokens_seen="non_padding"). plain and lmtuner tokenize with the same function, so they
train on identical tokens; LLaMA-Factory renders with its own chatml template (a few tokens per row differ).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"
DEFAULT_LF_VENV = Path(os.environ.get("LLAMAFACTORY_VENV", "~/.cache/lmtuner/llamafactory-venv")).expanduser()
CONFIGS = ("plain", "llamafactory", "llamafactory-padded", "lmtuner", "lmtuner-grouped")
# lmtuner-grouped: packing off, rows of similar length batched together
GROUPED = {"packing": False, "group_by_length": True}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # model shapes (random init); the tokenizer is always the 1,200-token BPE trained on the rows
    "bench-26m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 8, "head_dim": 64},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "rope_theta": 500000.0},
}  # fmt: skip
VOCAB = 1200
LR = 2e-4


# ------------------------------------------------------------------------------------------------- setup


def build_model(work: Path, rows: list[dict], shape_name: str = "bench-26m") -> Path:
    """A random Llama of the named shape and a byte-level BPE of 1,200 tokens trained on the rows, with lmtuner's
    ChatML template. Shapes with a larger vocabulary keep it (the LM head costs what it costs in the real model);
    the tokenizer only ever emits its first 1,200 ids. Built in bf16 on the GPU when there is one."""
    shape = dict(SHAPES[shape_name])
    out = work / ("model" if shape_name == "bench-26m" else f"model-{shape_name}")
    marker = out / "bench.json"
    spec = {"shape": dict(shape), "vocab": VOCAB, "rows": len(rows)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    sys.path.insert(0, str(REPO))
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmtuner_core.data.chat_template import CHAT_TEMPLATE
    from lmtuner_core.training.tiny_model import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator([f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=4096, padding_side="right", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab = max(len(tokenizer), shape.pop("vocab_size", 0))
    tied = shape.pop("tie_word_embeddings", False)
    rope_theta = shape.pop("rope_theta", None)
    config = LlamaConfig(
        **shape, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if rope_theta:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(0)
    if torch.cuda.is_available():
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(spec))
    return out


def real_model(path: Path, work: Path) -> Path:
    """A real model's folder: as given, or a .gguf converted once by lmtuner's own import into work/home/models."""
    path = path.expanduser().resolve()
    if path.suffix != ".gguf":
        return path
    os.environ["LMTUNER_HOME"] = str(work / "home")
    sys.path.insert(0, str(REPO))
    from lmtuner_core.models.gguf_import import converted_folder

    return converted_folder(path)


def write_rows(work: Path, rows: list[dict]) -> Path:
    path = work / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    # LLaMA-Factory reads datasets through a dataset_info.json entry (alpaca columns are its defaults).
    (work / "dataset_info.json").write_text(json.dumps({"bench_rows": {"file_name": "rows.json"}}))
    return path


# ------------------------------------------------------------------------------------------------- children


def timing_callback(result: dict):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            result["started"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            result["seconds"] = time.perf_counter() - result["started"]
            result["real_tokens"] = int(state.num_input_tokens_seen)
            result["steps"] = state.global_step
            model = kwargs.get("model")
            if model is not None:  # all parameters, frozen ones too: what the forward and backward pass through
                result["parameters"] = sum(p.numel() for p in model.parameters())
            import torch

            if torch.cuda.is_available():
                result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20

    return Timer()


def child_plain(spec: dict, result: dict) -> None:
    """What a user writes without lmtuner: Trainer + PEFT, every batch padded to its longest row."""
    sys.path.insert(0, str(REPO))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lmtuner_core.data.datasets import ALPACA_COLUMNS, alpaca_to_example, fit_to_length, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = json.loads(Path(spec["rows"]).read_text())
    examples = [alpaca_to_example(r, ALPACA_COLUMNS) for r in rows]
    dataset, _, _ = fit_to_length(tokenize_examples(examples, tokenizer), spec["max_len"])
    dataset = dataset.map(
        lambda r: {"labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"], strict=True)]},
        remove_columns=["assistant_masks"],
    )
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=1, learning_rate=LR,
        logging_steps=10, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timing_callback(result)]
    )
    trainer.train()
    trainer.save_model(spec["out"])  # the adapter, as the script a user writes ends


def lmtuner_config(spec: dict) -> dict:
    """The TrainConfig of the lmtuner runs: the same LoRA, batch, length and schedule as the others."""
    return {
        "model": spec["model"], "dataset": {"path": spec["rows"], "format": "alpaca"}, "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS},
        "num_epochs": 1, "batch_size": spec["batch"], "gradient_accumulation_steps": 1, "max_seq_len": spec["max_len"],
        "learning_rate": LR, "warmup_ratio": 0.0, "lr_scheduler": "constant", "logging_steps": 10,
        "save_steps": 10_000_000, **spec.get("overrides", {}),
    }  # fmt: skip


def run_lmtuner_cli(spec: dict, real_tokens: int) -> dict | None:
    """`lmtuner train --follow` as a user runs it, timed from start to exit; the job store lives in the work folder.
    The memory check is forced: the estimate assumes every batch at max length, these rows are shorter."""
    config = {**lmtuner_config(spec), "output_dir": spec["out"]}
    config_file = Path(spec["out"] + ".json")
    config_file.write_text(json.dumps(config))
    home = Path(spec["work"]) / "home"
    started = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lmtuner"), "train", "--follow", "--force", str(config_file)],
        capture_output=True, text=True, env={**os.environ, "LMTUNER_HOME": str(home)},
    )  # fmt: skip
    seconds = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        print(f"  lmtuner: failed (exit {proc.returncode})\n" + "\n".join(proc.stderr.splitlines()[-25:]), flush=True)
        return None
    run_dir = proc.stdout.splitlines()[0].split("; run folder ", 1)[1]  # "job ID started; run folder DIR"
    state = json.loads((Path(run_dir) / "state.json").read_text())
    return {
        "seconds": seconds, "process_seconds": seconds, "real_tokens": real_tokens, "steps": state["step"],
        "peak_rss_mib": state["peak_rss_mib"],
    }  # fmt: skip


def child_lmtuner(spec: dict, result: dict) -> None:
    """lmtuner's recipe with its defaults, as a training job runs it (minus the server and the final save)."""
    sys.path.insert(0, str(REPO))
    import threading

    from lmtuner_core.config import parse_train_config
    from lmtuner_core.jobs.run_folder import RunDir
    from lmtuner_core.training.recipe import SFTRecipe
    from lmtuner_core.training.train import StateFile

    config = parse_train_config(lmtuner_config(spec))
    run = RunDir(Path(spec["out"]))
    run.root.mkdir(parents=True, exist_ok=True)
    recipe = SFTRecipe(config, run, StateFile(run), threading.Event())
    recipe.setup()
    recipe.trainer.add_callback(timing_callback(result))
    result["packing"] = recipe.packing
    recipe.train()


def child_llamafactory(spec: dict, result: dict) -> None:
    """LLaMA-Factory 0.9.5's fastest CPU settings: packing on, gradient checkpointing off, SDPA."""
    from llamafactory.train.tuner import run_exp

    lf_args = {
        "model_name_or_path": spec["model"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": ",".join(LORA_TARGETS),
        "dataset": "bench_rows",
        "dataset_dir": spec["work"],
        "template": "chatml",
        "cutoff_len": spec["max_len"],
        "packing": spec.get("packing", True),
        "disable_gradient_checkpointing": True,
        "flash_attn": "sdpa",
        "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1.0,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "logging_steps": 10,
        "save_strategy": "no",
        "output_dir": spec["out"],
        "overwrite_output_dir": True,
        "report_to": "none",
        "use_cpu": not spec.get("cuda"),
        "bf16": bool(spec.get("cuda")),
        "fp16": False,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "plot_loss": False,
        "dataloader_num_workers": 0,
        "preprocessing_num_workers": None,
    }
    run_exp(lf_args, callbacks=[timing_callback(result)])


def child_llamafactory_padded(spec: dict, result: dict) -> None:
    """LLaMA-Factory with its default packing off: each batch padded to its longest row, like plain. Its packed
    batches (8 packs of max length) hold every logit of 8 × 1,024 positions, which a 24 GiB machine cannot on
    SmolLM2's 49k vocabulary."""
    child_llamafactory({**spec, "packing": False}, result)


def child_lmtuner_grouped(spec: dict, result: dict) -> None:
    """lmtuner with packing off: rows of similar length batched together (group_by_length), each row padded only
    to its batch's longest. No attention is computed between rows or over other rows' positions."""
    child_lmtuner({**spec, "overrides": GROUPED}, result)


CHILDREN = {
    "plain": child_plain, "lmtuner": child_lmtuner, "lmtuner-grouped": child_lmtuner_grouped,
    "llamafactory": child_llamafactory, "llamafactory-padded": child_llamafactory_padded,
}  # fmt: skip


def run_child(name: str, spec: dict, python: str) -> dict | None:
    started = time.monotonic()
    proc = subprocess.run(
        [python, __file__, "--child", name, json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"},
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_seconds": round(time.monotonic() - started, 1)}
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    print(f"  {name}: failed (exit {proc.returncode})\n{tail}", flush=True)
    return None


# ------------------------------------------------------------------------------------------------- main


def reference_tokens(args, model: Path, rows_path: Path) -> int:
    """Real tokens of one epoch over the rows, cut at max length, as plain and lmtuner train them."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from lmtuner_core.data.datasets import ALPACA_COLUMNS, alpaca_to_example, fit_to_length, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [alpaca_to_example(r, ALPACA_COLUMNS) for r in json.loads(rows_path.read_text())]
    dataset = fit_to_length(tokenize_examples(examples, tokenizer), args.max_len)[0]
    return sum(len(ids) for ids in dataset["input_ids"])


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for name, runs in results.items():
        rates = [r["real_tokens"] / r["seconds"] for r in runs]
        summary[name] = {
            "runs": len(runs),
            "real_tokens": sorted({r["real_tokens"] for r in runs}),
            "steps": sorted({r["steps"] for r in runs}),
            "tokens_per_s_median": round(statistics.median(rates), 1),
            "tokens_per_s_min": round(min(rates), 1),
            "tokens_per_s_max": round(max(rates), 1),
            "seconds_median": round(statistics.median(r["seconds"] for r in runs), 1),
            "seconds_best": round(min(r["seconds"] for r in runs), 1),
            "peak_rss_mib_max": round(max(r["peak_rss_mib"] for r in runs)),
        }
        if all("peak_gpu_mib" in r for r in runs):
            summary[name]["peak_gpu_mib_max"] = round(max(r["peak_gpu_mib"] for r in runs))
    return summary


def _cuda_available() -> bool:
    """Asked in a child process, so this parent never initialises CUDA (or imports torch) itself."""
    probe = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--work", type=Path, default=Path("~/.cache/lmtuner/bench-train-throughput").expanduser())
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV)
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-26m", help="model shape (random init)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU: the GPU's dense bf16 peak")
    parser.add_argument("--model", type=Path, help="a real model (folder or .gguf) instead of a random --shape")
    parser.add_argument("--whole-process", action="store_true", help="time each run from process start to exit")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        name, spec = args.child[0], json.loads(args.child[1])
        result: dict = {}
        CHILDREN[name](spec, result)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    configs = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if not DATA.is_file():
        parser.error(f"{DATA} not found (the shared data sits beside the repository)")
    lf_python = args.lf_venv / "bin" / "python"
    if any(c.startswith("llamafactory") for c in configs) and not lf_python.is_file():
        print(f"llamafactory: skipped, no venv at {args.lf_venv} (create it with bash bench/setup_llamafactory.sh)")
        configs = [c for c in configs if not c.startswith("llamafactory")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = json.loads(DATA.read_text())[: args.rows]
    model = real_model(args.model, args.work) if args.model else build_model(args.work, rows, args.shape)
    cuda = _cuda_available()
    rows_path = write_rows(args.work, rows)
    # The rows' real tokens, for the runs that cannot count them themselves (LLaMA-Factory, whole processes).
    counted_elsewhere = args.whole_process or any(c.startswith("llamafactory") for c in configs)
    reference = reference_tokens(args, model, rows_path) if counted_elsewhere else None
    print(
        f"{args.model or args.shape} on {'cuda (bf16)' if cuda else 'cpu (fp32)'}; "
        f"{'whole processes' if args.whole_process else 'trainer.train() only'}; "
        f"{len(rows)} rows of {DATA.name}, max length {args.max_len}, batch {args.batch}, LoRA r=8 on "
        f"{len(LORA_TARGETS)} modules, 1 epoch, {args.rounds} rounds of {', '.join(configs)}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for name in configs:
            spec = {
                "model": str(model), "rows": str(rows_path), "work": str(args.work), "max_len": args.max_len,
                "batch": args.batch, "out": str(args.work / f"out-{name}-{round_}"), "cuda": cuda,
            }  # fmt: skip
            python = str(lf_python) if name.startswith("llamafactory") else sys.executable
            if args.whole_process and name.startswith("lmtuner"):
                overrides = GROUPED if name == "lmtuner-grouped" else {}
                result = run_lmtuner_cli({**spec, "overrides": overrides}, reference)
            else:
                result = run_child(name, spec, python)
            if result is None:
                continue
            if args.whole_process:
                result["seconds"] = result["process_seconds"]
            if name.startswith("llamafactory"):
                # LLaMA-Factory's packing (without neat_packing) marks its pack padding as attended, so its
                # non-padding count is every position; the real tokens are those of the same rows, as counted
                # in the plain run (its chatml template has no bos: one token a row fewer, 0.3% here).
                result["positions"] = result["real_tokens"]
                result["real_tokens"] = reference
            results[name].append(result)
            gpu = ""
            if "peak_gpu_mib" in result:
                # Model FLOPs utilisation by the usual 6 x parameters per token (LoRA skips the frozen weights'
                # gradients, so its true share is nearer 4/6 of this figure).
                mfu = 6 * result.get("parameters", 0) * result["real_tokens"] / result["seconds"]
                gpu = f", peak GPU {result['peak_gpu_mib']:.0f} MiB, MFU {100 * mfu / (args.peak_tflops * 1e12):.1f}%"
            print(
                f"  round {round_ + 1} {name:12s} {result['real_tokens']:7d} real tokens in {result['seconds']:6.1f} s "
                f"= {result['real_tokens'] / result['seconds']:7.1f} tokens/s, {result['steps']} steps, "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB{gpu}; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    summary = summarize({k: v for k, v in results.items() if v})
    print("\nconfig        real tokens   tokens/s median (min-max)   steps   peak RSS MiB")
    for name, s in summary.items():
        print(
            f"{name:12s} {'/'.join(map(str, s['real_tokens'])):>12s}   {s['tokens_per_s_median']:8.1f} "
            f"({s['tokens_per_s_min']:.1f}-{s['tokens_per_s_max']:.1f})   {'/'.join(map(str, s['steps'])):>7s}   "
            f"{s['peak_rss_mib_max']:6d}"
        )
    if "lmtuner" in summary:
        for other in ("plain", "llamafactory", "llamafactory-padded"):
            if other in summary:
                ratio = summary["lmtuner"]["tokens_per_s_median"] / summary[other]["tokens_per_s_median"]
                pairs = [
                    (a["real_tokens"] / a["seconds"]) / (b["real_tokens"] / b["seconds"])
                    for a, b in zip(results["lmtuner"], results[other], strict=False)
                ]
                spread = f" (per round: {', '.join(f'{p:.2f}' for p in pairs)})" if pairs else ""
                best = summary[other]["seconds_best"] / summary["lmtuner"]["seconds_best"]
                print(f"lmtuner / {other}: {ratio:.2f}x real tokens/s{spread}; best of each: {best:.2f}x")
    if args.json:
        options = {"rows": args.rows, "max_len": args.max_len, "batch": args.batch, "rounds": args.rounds}
        args.json.write_text(json.dumps({"options": options, "runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lmtuner`: the tools for scripts and terminals. Each command calls the same tool function the MCP server
registers, so there is one implementation; output is JSON (`--json`) or a short human summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from lmtuner_core.config import load_train_config_file
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import lmtuner_home
from lmtuner_core.progress import JobProgress
from lmtuner_core.store import TERMINAL
from tools import data, evaluation, export, hardware, inference, planning, quantize, serving, training
from tools.context import ToolContext

# Where results go. With --json, main() points sys.stdout at stderr while a command runs, so whatever the
# libraries print (DeepSpeed logs its accelerator to stdout on import) never corrupts the JSON on stdout.
RESULTS = sys.stdout


def _print(result: BaseModel, as_json: bool, summary: str) -> None:
    print(result.model_dump_json(indent=2) if as_json else summary, file=RESULTS, flush=True)


def _progress_line(p: JobProgress) -> str:
    total = p.total_steps or 0
    width = 30
    done = int(width * p.step / total) if total else 0
    bar = "#" * done + "-" * (width - done)
    loss = f"loss {p.loss:.4f}" if p.loss is not None else "loss -"
    eta = f"eta {p.eta_seconds:.0f}s" if p.eta_seconds is not None else ""
    phase = f"({p.phase})" if p.phase and p.phase != "training" else ""
    return f"{p.job_id} {p.status:<9} [{bar}] {p.step}/{total or '?'} {loss} {eta} {phase}".rstrip()


def follow(ctx: ToolContext, job_id: str, stream=sys.stdout) -> JobProgress:
    """Redraws one progress line until the job ends; returns the final progress."""
    while True:
        progress = training.job_status(ctx, job_id, wait_seconds=5, log_lines=0)
        line = _progress_line(progress)
        if stream.isatty():
            stream.write("\r" + line.ljust(110))
        else:
            stream.write(line + "\n")
        stream.flush()
        if progress.status in TERMINAL:
            if stream.isatty():
                stream.write("\n")
            return training.job_status(ctx, job_id, log_lines=10)


def cmd_train(ctx: ToolContext, args: argparse.Namespace) -> int:
    config = load_train_config_file(args.config)
    result = training.start_training(ctx, config, dry_run=args.dry_run)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _print(result, args.json, f"job {result.job_id} {result.status}; run folder {result.run_dir}")
    if args.follow and result.job_id:
        final = follow(ctx, result.job_id)
        return _report_end(final)
    return 0


def _report_end(progress: JobProgress) -> int:
    if progress.status == "completed":
        print(f"completed: output in {progress.output_dir}")
        return 0
    print(f"{progress.status}: {progress.error or ''}", file=sys.stderr)
    return 1


def cmd_status(ctx: ToolContext, args: argparse.Namespace) -> int:
    if args.follow:
        return _report_end(follow(ctx, args.job_id))
    progress = training.job_status(ctx, args.job_id, log_lines=args.log_lines)
    summary = _progress_line(progress) + ("\n" + "\n".join(progress.log_tail or []) if args.log_lines else "")
    if progress.error:
        summary += f"\nerror: {progress.error}"
    _print(progress, args.json, summary)
    return 0


def cmd_jobs(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.list_jobs(ctx, args.status)
    _print(result, args.json, "\n".join(_progress_line(p) for p in result.jobs) or "no jobs")
    return 0


def cmd_cancel(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.cancel_job(ctx, args.job_id, grace_seconds=args.grace)
    _print(result, args.json, f"{result.job_id} {result.status}")
    return 0


def cmd_resume(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.resume_job(ctx, args.job_id)
    _print(result, args.json, f"job {result.job_id} {result.status}; continuing from {result.config.resume_from}")
    if args.follow:
        return _report_end(follow(ctx, result.job_id))
    return 0


def cmd_analyze(ctx: ToolContext, args: argparse.Namespace) -> int:
    def progress(done: float, total: float, message: str) -> None:
        print(f"  {message}", file=sys.stderr)

    result = data.analyze_dataset(ctx, args.dataset, model=args.model, progress=progress)
    lengths = result.token_lengths
    cuts = ", ".join(f"{k}: {v}" for k, v in result.truncated_at.items())
    summary = (
        f"{result.rows} rows, format {result.format} ({result.source})\n"
        f"tokens ({result.tokenizer}): p50 {lengths.p50}, p95 {lengths.p95}, max {lengths.max}\n"
        f"rows cut at max_seq_len {cuts}\n" + "".join(f"problem: {p}\n" for p in result.problems)
    ).rstrip()
    _print(result, args.json, summary)
    return 0


def cmd_generate(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = inference.generate(
        ctx, args.model, prompts=args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )  # fmt: skip
    summary = "\n".join(f"> {p}\n{o.text}\n" for p, o in zip(args.prompt, result.outputs, strict=True))
    _print(result, args.json, summary + f"({result.tokens_per_second} tokens/s, {result.engine})")
    return 0


def cmd_merge(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = inference.merge_adapter(ctx, args.model, args.adapter, args.output_dir)
    _print(result, args.json, f"merged model in {result.output_dir} ({result.size_bytes / 2**20:.1f} MiB)")
    return 0


def cmd_quantize(ctx: ToolContext, args: argparse.Namespace) -> int:
    def progress(done: float, total: float, message: str) -> None:
        print(f"  [{done:.0f}/{total:.0f}] {message}", file=sys.stderr, flush=True)

    result = quantize.quantize(
        ctx, args.model, args.method, args.output, adapter=args.adapter, dataset=args.dataset,
        calibration_samples=args.calibration_samples, group_size=args.group_size, progress=progress,
    )  # fmt: skip
    summary = (
        f"{result.method} model in {result.output_dir}: {result.size_bytes / 2**20:.2f} MiB, {result.ratio:.0%} of "
        f"{result.source_size_bytes / 2**20:.2f} MiB, {result.seconds:.1f} s"
    )
    if result.calibration_samples:
        summary += f"; {result.calibration_source} for calibration, group size {result.group_size}"
    _print(result, args.json, summary)
    return 0


def cmd_export(ctx: ToolContext, args: argparse.Namespace) -> int:
    def progress(done: float, total: float, message: str) -> None:
        print(f"  [{done:.0f}/{total:.0f}] {message}", file=sys.stderr, flush=True)

    result = export.export_model(
        ctx, args.model, args.output, adapter=args.adapter, format=args.format, quantization=args.quantization,
        trust_remote_code=args.trust_remote_code, progress=progress,
    )  # fmt: skip
    commands = "\n".join(f"  {name}: {command}" for name, command in result.run_commands.items())
    summary = (
        f"{result.quantization} GGUF in {result.gguf_file} ({result.size_bytes / 2**20:.1f} MiB, "
        f"{result.seconds:.0f} s), Ollama Modelfile beside it; run it with\n{commands}"
    )
    _print(result, args.json, summary)
    return 0


def _adapter_pairs(values: list[str] | None) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LmtunerError(f"--adapter: {value!r} is not NAME=PATH, e.g. --adapter medical=runs/JOB/final")
        adapters[name] = path
    return adapters


def _server_line(s) -> str:
    names = ", ".join([s.served_model_name, *s.adapters])
    return f"{s.server_id} {s.status:<8} {s.base_url}  models: {names}" + (f"  error: {s.error}" if s.error else "")


def cmd_serve(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.serve_model(
        ctx, args.model, adapters=_adapter_pairs(args.adapter) or None, port=args.port,
        served_model_name=args.served_model_name, max_model_len=args.max_model_len, dtype=args.dtype,
    )  # fmt: skip
    _print(result, args.json, _server_line(result) + f"\nready in {result.startup_seconds} s; log {result.log_path}")
    return 0


def cmd_stop_serving(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.stop_serving(ctx, args.server_id, grace_seconds=args.grace)
    _print(result, args.json, _server_line(result))
    return 0


def cmd_servers(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.list_servers(ctx, args.status)
    _print(result, args.json, "\n".join(_server_line(s) for s in result.servers) or "no servers")
    return 0


def cmd_propose(ctx: ToolContext, args: argparse.Namespace) -> int:
    plan = planning.propose_config(
        ctx, args.model, args.dataset, method=args.method, max_seq_len=args.max_seq_len,
        target_context=args.target_context, goal=args.goal,
    )  # fmt: skip
    if args.write:
        args.write.write_text(plan.config.to_json(), encoding="utf-8")
    m = plan.memory
    summary = "\n".join(
        [f"{'fits' if plan.fits else 'does NOT fit'}: {m.per_gpu_gib:.1f} of {m.budget_gib:.1f} GiB per device "
         f"(weights {m.weights_gib:.1f}, gradients {m.gradients_gib:.1f}, optimizer {m.optimizer_gib:.1f}, "
         f"activations {m.activations_gib:.1f}, logits {m.logits_gib:.1f}, overhead {m.overhead_gib:.1f})"]
        + [f"- {line}" for line in plan.rationale]
        + [f"! {w}" for w in plan.warnings]
        + ([f"config written to {args.write} (lmtuner train {args.write})"] if args.write else [])
    )  # fmt: skip
    _print(plan, args.json, summary)
    return 0


def cmd_evaluate(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = evaluation.evaluate(
        ctx, args.model, args.dataset, adapter=args.adapter, predictions=args.predictions,
        max_samples=args.max_samples, compare_base=args.compare_base,
    )  # fmt: skip

    def line(label: str, s) -> str:
        return (f"{label}: BLEU-2 {s.bleu_2:.2f}  BLEU-4 {s.bleu_4:.2f}  METEOR {s.meteor:.3f}  NIST-4 {s.nist_4:.3f}  "
                f"ROUGE-L {s.rouge_l:.3f}  (n={s.n})")  # fmt: skip

    summary = line(result.source, result) + (f"\n{line('base', result.base)}" if result.base else "")
    summary += f"\ntokenization: {result.tokenization}; prompts stripped: {result.prompts_stripped}"
    _print(result, args.json, summary)
    return 0


def cmd_inspect(ctx: ToolContext, args: argparse.Namespace) -> int:
    report = hardware.inspect_gpus(ctx)
    gpus = ", ".join(f"{g.name} ({g.memory_free_mib}/{g.memory_total_mib} MiB free)" for g in report.gpus) or "none"
    summary = (
        f"GPUs: {gpus}\nCPU: {report.cpu.model}, {report.cpu.cores} cores\n"
        f"RAM: {report.memory_available_mib}/{report.memory_total_mib} MiB available\n"
        f"Disk: {report.disk_free_gib} GiB free"
    )
    _print(report, args.json, summary)
    return 0


def cmd_make_tiny_model(ctx: ToolContext, args: argparse.Namespace) -> int:
    from lmtuner_core.tiny_model import make_tiny_model

    try:
        out = make_tiny_model(args.dir, overwrite=args.overwrite)
    except ValueError as exc:
        raise LmtunerError(str(exc)) from None
    print(json.dumps({"model_dir": str(out)}) if args.json else f"tiny model written to {out}", file=RESULTS)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtuner", description="Fine-tune LLMs from scripts and terminals.")
    parser.add_argument("--json", action="store_true", help="Print results as JSON.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Start a job from a JSON/YAML TrainConfig file.")
    p.add_argument("config", type=Path)
    p.add_argument("--dry-run", action="store_true", help="Check everything, start nothing.")
    p.add_argument("--follow", action="store_true", help="Show progress until the job ends.")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("status", help="Show a job's progress.")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="Live progress bar until the job ends.")
    p.add_argument("--log-lines", type=int, default=0)
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("jobs", help="List jobs.")
    p.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"])
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("cancel", help="Stop a job (it saves a checkpoint first).")
    p.add_argument("job_id")
    p.add_argument("--grace", type=float, default=20.0, help="Seconds to wait before killing it.")
    p.set_defaults(run=cmd_cancel)

    p = sub.add_parser("resume", help="Continue a failed or cancelled job from its newest checkpoint.")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="Show progress until the job ends.")
    p.set_defaults(run=cmd_resume)

    p = sub.add_parser("analyze", help="Rows, format, token lengths and problems of a dataset.")
    p.add_argument("dataset")
    p.add_argument("--model", help="Count tokens with this model's tokenizer and chat template.")
    p.set_defaults(run=cmd_analyze)

    p = sub.add_parser("generate", help="Answer prompts with a model, optionally with an adapter.")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    p.add_argument("--adapter", help="A LoRA-family job's output_dir.")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("merge", help="Merge an adapter into its base model (a standalone HF model).")
    p.add_argument("model")
    p.add_argument("adapter")
    p.add_argument("output_dir")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("quantize", help="Quantize a model (merging an adapter first): bnb-nf4, bnb-int8, gptq-w4a16.")
    p.add_argument("model")
    p.add_argument("--method", required=True, choices=["bnb-nf4", "bnb-int8", "gptq-w4a16"])
    p.add_argument("--output", required=True, help="A new or empty folder for the quantized model.")
    p.add_argument("--adapter", help="A LoRA-family job's output_dir to merge in first.")
    p.add_argument("--dataset", help="gptq-w4a16: calibration rows (default: a built-in sample).")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--group-size", type=int, choices=[32, 64, 128])
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("export", help="Export a model (merging an adapter first) as GGUF for llama.cpp and Ollama.")
    p.add_argument("model", help="A model folder, .gguf file or cached hub id.")
    p.add_argument("--output", required=True, help="A new or empty folder for the .gguf file and its Modelfile.")
    p.add_argument("--adapter", help="A LoRA-family job's output_dir to merge in first.")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--quantization", choices=["f16", "bf16", "q8_0", "q4_k_m"], default="q8_0")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow a model's own code to run.")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("serve", help="Serve a model (and adapters) with vLLM's OpenAI-compatible API.")
    p.add_argument("model")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="A LoRA adapter to serve (repeatable).")
    p.add_argument("--port", type=int)
    p.add_argument("--served-model-name")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("stop-serving", help="Stop a vLLM server (every process of it).")
    p.add_argument("server_id")
    p.add_argument("--grace", type=float, default=10.0, help="Seconds to wait before killing it.")
    p.set_defaults(run=cmd_stop_serving)

    p = sub.add_parser("servers", help="List vLLM servers.")
    p.add_argument("--status", choices=["starting", "running", "stopped", "failed"])
    p.set_defaults(run=cmd_servers)

    p = sub.add_parser("propose", help="Plan a config that fits this machine, with reasons.")
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--method")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--target-context", type=int)
    p.add_argument("--goal")
    p.add_argument("--write", type=Path, help="Write the proposed config to this JSON file.")
    p.set_defaults(run=cmd_propose)

    p = sub.add_parser("evaluate", help="BLEU/METEOR/NIST/ROUGE-L of a model, adapter or predictions file.")
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--adapter")
    p.add_argument("--predictions", help="Score this file of predictions instead of generating.")
    p.add_argument("--max-samples", type=int, default=50)
    p.add_argument("--compare-base", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("inspect", help="GPUs, CPU, memory, disk and library versions.")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("make-tiny-model", help="Build a tiny offline Llama + tokenizer (tests, demos).")
    p.add_argument("dir", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = ToolContext(home=lmtuner_home())
    global RESULTS
    RESULTS = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    try:
        return args.run(ctx, args)
    except LmtunerError as exc:
        print(f"lmtuner: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout = RESULTS


if __name__ == "__main__":
    sys.exit(main())

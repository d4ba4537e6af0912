"""`make demo`: what an agent does with lmtuner, end to end, on a model and data built right here.

It builds a tiny Llama and a small chat dataset, launches `lmtuner-mcp` over stdio with the official MCP SDK
client (the initialize handshake a desktop host performs), calls inspect_gpus, starts a LoRA job, follows it
with job_status until it finishes, and prints where the adapter is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters

from lmtuner_core.sample_data import write_demo_dataset
from lmtuner_core.tiny_model import make_tiny_model

DEMO_DIR = Path(".lmtuner-demo").resolve()


def server_params(home: Path) -> StdioServerParameters:
    command = shutil.which("lmtuner-mcp", path=str(Path(sys.executable).parent)) or "lmtuner-mcp"
    return StdioServerParameters(
        command=command, args=["--root", str(DEMO_DIR)], env={**os.environ, "LMTUNER_HOME": str(home)}, cwd=DEMO_DIR
    )


async def run_demo() -> int:
    started = time.monotonic()
    home = DEMO_DIR / "home"
    home.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(DEMO_DIR / "tiny-model")
    data = write_demo_dataset(DEMO_DIR / "maths-tutor.jsonl", n=200)
    print(f"model: {model}\ndata: {data} (200 chat rows)")

    async with mcp.Client(server_params(home)) as client:
        tools = await client.list_tools()
        print(f"\nconnected to lmtuner-mcp over stdio; tools: {', '.join(t.name for t in tools.tools)}")

        hw = (await client.call_tool("inspect_gpus", {})).structured_content
        gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none (training on CPU)"
        print(f"inspect_gpus: GPUs {gpus}; CPU {hw['cpu']['model']} x{hw['cpu']['cores']}; "
              f"RAM {hw['memory_available_mib']} MiB free")  # fmt: skip

        config = {
            "model": str(model),
            "dataset": {"path": str(data), "eval_fraction": 0.05},
            "method": "lora",
            "num_epochs": 3,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 2e-3,
            "max_seq_len": 256,
            "lora": {"r": 8, "alpha": 16},
        }
        print(f"\nstart_training: {json.dumps(config)}")
        result = await client.call_tool("start_training", {"config": config})
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
            eta = f", eta {s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else ""
            print(f"  {s['status']:<9} {s['phase'] or '':<17} step {s['step']}/{s['total_steps'] or '?'} loss {loss}"
                  f"{eta}")  # fmt: skip
            if s["status"] not in ("queued", "running"):
                break

    print()
    if s["status"] != "completed":
        print(f"job {s['status']}: {s['error']}", file=sys.stderr)
        return 1
    print(f"completed in {s['elapsed_seconds']:.0f}s: loss {first_loss:.3f} -> {s['loss']:.3f}"
          + (f", eval loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else ""))  # fmt: skip
    print(f"adapter: {s['output_dir']}")
    print(f"demo wall time (this script): {time.monotonic() - started:.0f}s")
    return 0


def main() -> int:
    return anyio.run(run_demo)


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: what an agent does with lmtuner, end to end, on a model and data built right here.

It builds a tiny Llama and a small chat dataset, launches `lmtuner-mcp` over stdio with the official MCP SDK
client (the initialize handshake a desktop host performs), calls inspect_gpus, asks propose_config for a plan,
starts the LoRA job it proposes, follows it with job_status, saves the loss curve, compares generate with and
without the adapter, and scores both on held-out rows with evaluate.
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

from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.library_noise import quiet_library_noise
from lmtuner_core.training.tiny_model import make_tiny_model

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
    held_out = write_demo_dataset(DEMO_DIR / "maths-tutor-test.jsonl", n=20, seed=1)
    print(f"model: {model}\ndata: {data} (200 chat rows), held out: {held_out} (20 rows)")

    async with mcp.Client(server_params(home)) as client:
        tools = await client.list_tools()
        print(f"\nconnected to lmtuner-mcp over stdio; tools: {', '.join(t.name for t in tools.tools)}")

        hw = (await client.call_tool("inspect_gpus", {})).structured_content
        gpus = ", ".join(g["name"] for g in hw["gpus"]) or "none (training on CPU)"
        print(f"inspect_gpus: GPUs {gpus}; CPU {hw['cpu']['model']} x{hw['cpu']['cores']}; "
              f"RAM {hw['memory_available_mib']} MiB free")  # fmt: skip

        plan = (await client.call_tool(
            "propose_config", {"model": str(model), "dataset": {"path": str(data), "eval_fraction": 0.05},
                               "goal": "answer maths questions in one short sentence"},
        )).structured_content  # fmt: skip
        memory = plan["memory"]
        print(f"\npropose_config: {plan['config']['method']}, fits={plan['fits']} "
              f"({memory['per_gpu_gib']:.2f} of {memory['budget_gib']:.1f} GiB)")  # fmt: skip
        for line in plan["rationale"]:
            print(f"  - {line}")
        # The tiny model starts from random weights: a higher learning rate than the LoRA default (2e-4) makes the
        # falling loss visible within a minute.
        config = {**plan["config"], "learning_rate": 2e-3}
        print(f"\nstart_training: method {config['method']}, batch {config['batch_size']}, "
              f"{config['num_epochs']} epochs, max_seq_len {config['max_seq_len']}")  # fmt: skip
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
        plot = await client.call_tool("job_status", {"job_id": job_id, "include_plot": True, "log_lines": 0})
        image = next(c for c in plot.content if c.type == "image")
        (DEMO_DIR / "loss.png").write_bytes(base64.b64decode(image.data))
        print(f"loss curve: {DEMO_DIR / 'loss.png'}")

        question = "What is 7 plus 5?"
        for label, extra in (("base", {}), ("tuned", {"adapter": s["output_dir"]})):
            answer = (await client.call_tool(
                "generate", {"model": str(model), "prompts": [question], "max_new_tokens": 20, **extra}
            )).structured_content["outputs"][0]["text"]  # fmt: skip
            print(f"generate ({label}): {question!r} -> {answer!r}")
        scores = (await client.call_tool(
            "evaluate", {"model": str(model), "dataset": str(held_out), "adapter": s["output_dir"],
                         "compare_base": True, "max_samples": 20, "max_new_tokens": 24},
        )).structured_content  # fmt: skip
        print(
            f"evaluate on 20 held-out rows: ROUGE-L {scores['base']['rouge_l']:.3f} (base) -> "
            f"{scores['rouge_l']:.3f} (tuned), BLEU-4 {scores['base']['bleu_4']:.2f} -> {scores['bleu_4']:.2f}"
        )
    print(f"demo wall time (this script): {time.monotonic() - started:.0f}s")
    return 0


def main() -> int:
    quiet_library_noise()
    return anyio.run(run_demo)


if __name__ == "__main__":
    sys.exit(main())

"""Issue 23's "seed's own table": LMTuner's medical Q/A (MedDialog COVID example, 482 training rows, 61 test rows),
SmolLM2-135M-Instruct tuned as propose_config proposes against the predictions LMTuner published for its fine-tuned
Llama-7B, every column scored by the same evaluator (the `evaluate` tool: BLEU-4, METEOR, NIST-4, ROUGE-L on words).

    python -m bench.medical_table                       # runs the job and scores; prints the table, writes --out
    python -m bench.medical_table --table               # the table from --out

All through the MCP server, as an agent would: propose_config on the training rows (goal stated) -> start_training
with the config as proposed (only the report is turned off: it changes nothing in training, and the evaluate calls
below score the 61 test rows instead) -> evaluate the adapter with compare_base on the test set -> evaluate the
predictions file. Greedy, 160 new tokens (the references run to 118 words).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
import mcp

from bench.recipe_study import HOME, call, server_params
from lmtuner_core.data.sample_data import SMOLLM2_GGUF
from lmtuner_core.data.study_tasks import MEDICAL_DATA, TASKS, write_task

OUT = Path(__file__).resolve().parent.parent / "docs" / "medical_table.json"
NEW_TOKENS = 160
COLUMNS = ("bleu_4", "meteor", "nist_4", "rouge_l")


async def measure(out: Path) -> dict:
    HOME.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lmtuner-medical-"))
    task = TASKS["medical"]
    try:
        train, test = write_task("medical", task.sizes[-1], scratch)
        async with mcp.Client(server_params(HOME, [scratch, SMOLLM2_GGUF.parent, MEDICAL_DATA])) as client:
            plan = await call(client, "propose_config", {"model": str(SMOLLM2_GGUF), "dataset": str(train),
                                                         "goal": task.goal})  # fmt: skip
            config = {**plan["config"], "report": False}
            started = time.monotonic()
            job = await call(client, "start_training", {"config": config})
            while True:
                status = await call(client, "job_status", {"job_id": job["job_id"], "wait_seconds": 30, "log_lines": 3})
                if status["status"] in ("completed", "failed", "cancelled"):
                    break
            if status["status"] != "completed":
                raise RuntimeError(f"medical job {status['status']}: {status['error']}")
            job_seconds = time.monotonic() - started
            used = json.loads(Path(status["run_dir"], "config.json").read_text())
            common = {"dataset": str(test), "max_samples": len(TASKS["medical"].rows(1)[1]),
                      "max_new_tokens": NEW_TOKENS}  # fmt: skip
            tuned = await call(client, "evaluate", {"model": used["model"], "adapter": status["output_dir"],
                                                    "compare_base": True, **common})  # fmt: skip
            published = await call(
                client,
                "evaluate",
                {"model": used["model"], "predictions": str(MEDICAL_DATA / "lmtuner_predictions.jsonl"), **common},
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "model": "SmolLM2-135M-Instruct", "train_rows": task.sizes[-1], "test_rows": tuned["n"],
        "max_new_tokens": NEW_TOKENS, "tokenization": tuned["tokenization"],
        "rows": {
            "LMTuner's published predictions (Llama-7B, fine-tuned)": {k: published[k] for k in COLUMNS},
            "SmolLM2-135M-Instruct, base": {k: tuned["base"][k] for k in COLUMNS},
            "SmolLM2-135M-Instruct, tuned as proposed": {k: tuned[k] for k in COLUMNS},
        },
        "prompts_stripped_from_published": published["prompts_stripped"],
        "recipe_used": {k: used.get(k) for k in ("method", "learning_rate", "num_epochs", "batch_size",
                                                 "gradient_accumulation_steps", "lora", "replay", "max_seq_len")},
        "job_id": job["job_id"], "job_seconds": round(job_seconds, 1), "rationale": plan["rationale"],
        "samples": tuned["samples"],
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def table(result: dict) -> str:
    lines = ["| predictions | BLEU-4 | METEOR | NIST-4 | ROUGE-L |", "|---|---|---|---|---|"]
    for name, scores in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table from --out and stop")
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.table else anyio.run(measure, args.out)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

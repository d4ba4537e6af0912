"""Issue 23's sweep bar on SmolLM2-135M-Instruct: a budgeted sweep of at least 8 trials on this machine, inside its
stated budget, whose best config scores at least as well as the plan as proposed (propose_config's config).

Everything goes through a real `lmtuner-mcp` over stdio, as an agent would: propose_config on the study's capitals
task (short answers over facts the base model knows; bench/recipe_study.py, lmtuner_core/data/study_tasks.py), then
tune_config with that plan as the centre and the task's fixed test rows as held-out rows, ranked by the result
report's held-out score (exact match). The sweep's first trial is the plan itself, so its score is the plan's,
measured in the same sweep on the same rows. The retention probe is off in the trials (it does not enter the score
and costs time); the recipe is the plan's.

    flock /tmp/lmtuner-heavy.lock python -m bench.sweep_proof --rows 32 --trials 8 --budget-minutes 20

Prints one JSON line (LMTUNER-SWEEP ...) with the figures and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
import mcp

from bench.recipe_study import call, server_params
from lmtuner_core.data.sample_data import SMOLLM2_GGUF
from lmtuner_core.data.study_tasks import TASKS, write_task

HOME = Path(os.environ.get("LMTUNER_SWEEP_HOME") or Path.home() / ".cache/lmtuner/sweep-home")
SEARCH = {
    "learning_rate": {"min": 1e-4, "max": 1e-3, "log": True},
    "num_epochs": [3, 6],
    "lora.r": [8, 16, 32],
    "lora.target_modules": ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]],
}


async def proof(task_name: str, rows: int, trials: int, budget: float, out: Path | None) -> dict:
    task = TASKS[task_name]
    HOME.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lmtuner-sweep-"))
    try:
        train, test = write_task(task.name, rows, scratch / task.name)
        test_rows = len(test.read_text(encoding="utf-8").splitlines())
        async with mcp.Client(server_params(HOME, [scratch, SMOLLM2_GGUF.parent])) as client:
            plan = await call(client, "propose_config", {"model": str(SMOLLM2_GGUF), "dataset": str(train),
                                                         "goal": task.goal})  # fmt: skip
            centre = {**plan["config"], "eval_dataset": str(test), "report": {"retention": False, "max_rows": 32}}
            started = time.monotonic()
            sweep = await call(client, "tune_config", {"config": centre, "search": SEARCH, "trials": trials,
                                                       "budget_minutes": budget, "metric": "report"})  # fmt: skip
            while True:
                status = await call(
                    client, "job_status", {"job_id": sweep["job_id"], "wait_seconds": 30, "log_lines": 0}
                )
                if status["status"] in ("completed", "failed", "cancelled"):
                    break
            wall = time.monotonic() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = status["trials"] or []
    plan_trial = table[0] if table else {}
    scored = [t for t in table if t["status"] == "completed" and t["score"] is not None]
    best = max(scored, key=lambda t: t["score"]) if scored else None
    plan_recipe = {k: plan["config"][k] for k in ("learning_rate", "num_epochs", "lora", "replay")}
    result = {
        "model": "SmolLM2-135M-Instruct", "task": task.name, "train_rows": rows, "test_rows": test_rows,
        "job_id": sweep["job_id"], "status": status["status"], "error": status["error"],
        "trials_asked": trials, "trials_run": len(table), "budget_minutes": budget,
        "wall_minutes": round(wall / 60, 2), "job_minutes": round((status["elapsed_seconds"] or 0) / 60, 2),
        "within_budget": (status["elapsed_seconds"] or 0) <= budget * 60,
        "statuses": {s: sum(t["status"] == s for t in table) for s in {t["status"] for t in table}},
        "plan_recipe": plan_recipe, "plan_score": plan_trial.get("score"),
        "best_score": best and best["score"], "best_trial": best and best["trial_id"],
        "best_values": best and best["config"],
        "best_is_plan": bool(best and plan_trial and best["trial_id"] == plan_trial["trial_id"]),
        "trials": [{k: t[k] for k in ("trial_id", "config", "score", "status", "eval_loss", "step")} for t in table],
    }  # fmt: skip
    line = json.dumps(result)
    print("LMTUNER-SWEEP " + line, flush=True)
    if out:
        out.write_text(line + "\n", encoding="utf-8")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--rows", type=int, default=64, help="training rows (the study's medium size for capitals)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--budget-minutes", type=float, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    anyio.run(proof, args.task, args.rows, args.trials, args.budget_minutes, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The preference stages on a real model, through a real MCP client: DPO on SmolLM2-135M-Instruct (from its .gguf)
makes the model prefer the correct answer on held-out pairs it never trained on, and a reward model ranks held-out
pairs better than chance. Run with `-k real_model` (under the heavy-run lock: they train the real model)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from lmtuner_core.data.preference_tasks import write_preference_task
from lmtuner_core.data.sample_data import SMOLLM2_GGUF
from tests.helpers import call_ok, stdio_client, wait_for_end

needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file(), reason=f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}: run `make smollm2`"
)
TRAIN_PAIRS = 64  # of the dates_iso task's 160 training dates; the 32 held-out dates are never trained on


def run_planned_job(tmp_path, lmtuner_home, stage: str, **changes) -> tuple[dict, dict]:
    """propose_config on the pairs (the stage given or the data's usual one), the plan's recipe with `changes`,
    start_training, wait: (plan, final job_status)."""
    train, test = write_preference_task("dates_iso", TRAIN_PAIRS, tmp_path / "pairs")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, SMOLLM2_GGUF.parent]) as client:
            asked = {"model": str(SMOLLM2_GGUF), "dataset": str(train), "eval_dataset": str(test), "stage": stage}
            plan = await call_ok(client, "propose_config", asked)
            started = await call_ok(client, "start_training", {"config": {**plan["config"], **changes}})
            return plan, await wait_for_end(client, started["job_id"], timeout=2400)

    return anyio.run(scenario)


@needs_smollm2
@pytest.mark.proof  # `make proofs`: 4 min in the full suite, out of `make test` for CI's budget
@pytest.mark.timeout(2400)  # ≈3 min on an idle 2-core machine; much longer when it is shared
def test_real_model_dpo_makes_the_model_prefer_the_correct_answer_on_held_out_pairs(tmp_path, lmtuner_home):
    """Pairs over dates_iso ("Write this date in ISO 8601 form: the eleventh of July, 1984"): chosen the ISO date,
    rejected the date copied back as written, which is what the base model does and prefers. After DPO as planned
    (2 epochs, no accumulation, lr 2e-4 for a wide margin) the model prefers the ISO date on held-out dates: +25
    points or more, or at least 85%. Measured: 0.1875 -> 1.0 (the planner's 5e-5 gives the same, margin 0.75)."""
    plan, final = run_planned_job(tmp_path, lmtuner_home, "dpo", learning_rate=2e-4, num_epochs=2,
                                  gradient_accumulation_steps=1, eval_steps=1000)  # fmt: skip
    assert plan["config"]["stage"] == "dpo" and plan["config"]["preference"]["beta"] == 0.1
    assert final["status"] == "completed", final["error"]
    report = final["report"]
    print(f"\ndpo on {TRAIN_PAIRS} pairs: preference accuracy {report['base']} -> {report['tuned']} on "
          f"{report['held_out_rows']} held-out pairs; rewards_margin {final['rewards_margin']}, rewards_accuracy "
          f"{final['rewards_accuracy']}; {final['elapsed_seconds']}s")  # fmt: skip
    assert report["metric"] == "preference_accuracy" and report["held_out_rows"] == 32
    assert report["base"] <= 0.5, report  # the base prefers the copied-back date (measured: 6 of 32 pairs)
    assert report["tuned"] >= min(report["base"] + 0.25, 0.85), report
    assert final["rewards_margin"] > 0 and final["rewards_accuracy"] >= 0.5, final
    records = [json.loads(line) for line in Path(final["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards_margin"] for r in records if "loss" in r][-1] > 0


@needs_smollm2
@pytest.mark.proof  # `make proofs`: 3 min of training, out of CI for its budget (figures: docs/PREFERENCE.md)
@pytest.mark.timeout(2400)
def test_real_model_reward_model_ranks_held_out_pairs_better_than_chance(tmp_path, lmtuner_home):
    """A reward model (SmolLM2 as a sequence classifier with a new one-output head, LoRA) on the same pairs ranks
    the held-out pairs well above chance (0.5); measured: its untrained head ranked 0 of 32, the trained one 32."""
    plan, final = run_planned_job(tmp_path, lmtuner_home, "reward", learning_rate=2e-4, num_epochs=2,
                                  gradient_accumulation_steps=1, eval_steps=1000)  # fmt: skip
    assert plan["config"]["stage"] == "reward"
    assert final["status"] == "completed", final["error"]
    report = final["report"]
    print(f"\nreward model on {TRAIN_PAIRS} pairs: held-out ranking accuracy {report['base']} (untrained head) -> "
          f"{report['tuned']} on {report['held_out_rows']} pairs; {final['elapsed_seconds']}s")  # fmt: skip
    assert report["tuned"] >= 0.75, report

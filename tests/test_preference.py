"""Preference stages end to end on the tiny model: every stage trains through the tool functions, reports its
reward metrics to job_status, and writes a report of preference accuracy; bad rows are named."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.stages import STAGES
from tests.helpers import quick_config
from tools import training
from tools.context import ToolContext

WORDS = ["cat", "dog", "house", "bread", "tree", "car", "book", "water", "sun", "moon", "fish", "bird"]


def pair_rows(n: int = 48, conversational: bool = True) -> list[dict]:
    """Pairs over a toy task: the chosen answer repeats the word, the rejected one names another."""
    rows = []
    for i in range(n):
        word, other = WORDS[i % len(WORDS)], WORDS[(i + 5) % len(WORDS)]
        prompt, good, bad = f"Repeat the word {word}.", f"{word}", f"{other} {other}"
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})  # fmt: skip
        else:
            rows.append({"prompt": prompt + " ", "chosen": good, "rejected": bad})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_job(ctx: ToolContext, config: dict, timeout: float = 300):
    started = training.start_training(ctx, parse_train_config(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = training.job_status(ctx, started.job_id, wait_seconds=10, log_lines=40)
        if status.status in ("completed", "failed", "cancelled"):
            return status
    raise AssertionError(f"job did not finish: {status}")


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto", "reward"])
def test_each_preference_stage_trains_and_reports(stage, tiny_model, lmtuner_home, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    config = quick_config(tiny_model, {"path": str(data), "eval_fraction": 0.25}, stage=stage, max_steps=6,
                          eval_steps=3)  # fmt: skip
    final = run_job(ctx, config)
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    records = [json.loads(line) for line in Path(final.run_dir, "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 6
    for key in STAGES[stage].progress_keys:  # TRL's reward metrics, under lmtuner's names, on every logged step
        assert all(key in r for r in trained), (key, trained[0])
    assert any("eval_rewards_margin" in r for r in records if "eval_loss" in r)
    report = json.loads(Path(final.run_dir, "report.json").read_text())
    assert report["metric"] == "preference_accuracy" and report["held_out_rows"] == 12
    assert 0.0 <= report["base"] <= 1.0 and 0.0 <= report["tuned"] <= 1.0
    marker = json.loads(Path(final.output_dir, "lmtuner_artifact.json").read_text())
    assert marker["stage"] == stage


def test_dpo_through_mcp_from_analysis_to_evaluate(tiny_model, lmtuner_home, tmp_path):
    """The agent's path through a real MCP client: analyze_dataset names the pairs and the stages, propose_config
    proposes dpo with its recipe, start_training refuses sft on pairs by name, the dpo job's job_status carries the
    reward metrics and a plot with the reward panel, and evaluate scores preference accuracy of tuned and base."""
    import anyio

    from tests.helpers import call_error, call_ok, stdio_client, wait_for_end
    from tests.test_agent_surface import png_size

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    held_out = write_jsonl(tmp_path / "held-out.jsonl", pair_rows(12)[4:])

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            analysis = await call_ok(client, "analyze_dataset", {"dataset": str(data), "model": str(tiny_model)})
            plan = await call_ok(client, "propose_config", {"model": str(tiny_model), "dataset": str(data)})
            sft = await call_error(
                client, "start_training", {"config": {**plan["config"], "stage": "sft", "preference": None}}
            )
            config = {**plan["config"], "eval_dataset": str(held_out), "max_steps": 6, "eval_steps": 3,
                      "learning_rate": 3e-3, "logging_steps": 1}  # fmt: skip
            started = await call_ok(client, "start_training", {"config": config})
            final = await wait_for_end(client, started["job_id"], timeout=300)
            plotted = await client.call_tool("job_status", {"job_id": started["job_id"], "include_plot": True})
            scores = await call_ok(client, "evaluate", {
                "model": str(tiny_model), "dataset": str(held_out), "adapter": final["output_dir"],
                "compare_base": True, "max_samples": 8, "max_new_tokens": 4})  # fmt: skip
            return analysis, plan, sft, final, plotted, scores

    analysis, plan, sft, final, plotted, scores = anyio.run(scenario)
    assert analysis["format"] == "preference" and analysis["stages"][0] == "dpo"
    config = plan["config"]
    assert config["stage"] == "dpo" and config["preference"]["beta"] == 0.1
    assert config["learning_rate"] == STAGES["dpo"].learning_rate_adapter
    assert any("stage is 'dpo'" in line for line in plan["rationale"]), plan["rationale"]
    assert "dataset:" in sft and "stage 'sft' trains on demonstrations" in sft and "'dpo'" in sft, sft
    assert final["status"] == "completed", final["error"]
    assert final["stage"] == "dpo"
    assert final["rewards_margin"] is not None and 0.0 <= final["rewards_accuracy"] <= 1.0
    assert final["report"]["metric"] == "preference_accuracy" and final["report"]["held_out_rows"] == 8
    images = [c for c in plotted.content if c.type == "image"]
    import base64

    assert png_size(base64.b64decode(images[0].data)) == (640, 640)  # the loss and, below it, the reward panel
    assert 0.0 <= scores["preference_accuracy"] <= 1.0 and 0.0 <= scores["base_preference_accuracy"] <= 1.0
    assert scores["n"] == 8 and scores["samples"][0]["reference"] in WORDS


def test_evaluate_refuses_a_reward_model_by_name(tiny_model, lmtuner_home, tmp_path):
    from tools.evaluation import evaluate

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    final = run_job(ctx, quick_config(tiny_model, data, stage="reward", max_steps=2))
    assert final.status == "completed", final.error
    with pytest.raises(LmtunerError, match=r"adapter: .* is a reward model \(stage 'reward'\): it scores answers"):
        evaluate(ctx, str(tiny_model), str(data), adapter=final.output_dir)


@pytest.mark.parametrize("method", ["full", "freeze", "dora", "qlora", "lomo"])
def test_dpo_trains_with_every_method(method, tiny_model, lmtuner_home, tmp_path):
    """The registry refuses no method for dpo: each trains (full weights against a frozen reference copy, the LoRA
    family against the base with the adapter off, LOMO inside the backward pass)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    final = run_job(ctx, quick_config(tiny_model, data, stage="dpo", method=method, max_steps=3, learning_rate=1e-3))
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    log = Path(final.run_dir, "train.log").read_text()
    copy = "a frozen copy of the model" in log
    assert copy == (method in ("full", "freeze", "lomo")), log[-2000:]
    assert len([r for r in map(json.loads, Path(final.run_dir, "metrics.jsonl").read_text().splitlines())
                if "rewards_margin" in r]) == 3  # fmt: skip


@pytest.mark.parametrize("launch", [{"processes_per_node": 2}, {"deepspeed": {"stage": 2}}], ids=["ddp2", "zero2"])
def test_dpo_runs_on_two_processes_and_under_deepspeed(launch, tiny_model, lmtuner_home, tmp_path, monkeypatch):
    """The same recipe under torchrun (two CPU processes, gloo) and under DeepSpeed ZeRO-2 (TRL's DPOTrainer takes
    both through its TrainingArguments): every step logs its reward metrics, written once by rank 0."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/lmtuner/torch_extensions"))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    final = run_job(ctx, quick_config(tiny_model, data, stage="dpo", max_steps=3, **launch), timeout=600)
    assert final.status == "completed", f"{final.error}\n" + "\n".join(final.log_tail or [])
    trained = [r for r in map(json.loads, Path(final.run_dir, "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3] and all("rewards_margin" in r for r in trained)

"""GRPO's surface through a real MCP client: test_grader scores sample answers as the graders declare (and refuses bad
graders naming graders[i].field), evaluate's grader_score on prompts-only rows, and a GRPO job on the tiny model whose
job_status shows reward_mean / reward_std and whose plot carries the reward curve."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import mcp
import pytest

from server.app import build_server
from tests.helpers import call_error, call_ok, stdio_client

DATE_GRADERS = [
    {"type": "regex", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
    {"type": "string_check", "reference": "answer", "operation": "eq", "weight": 2},
]
PROMPTS = [
    {"prompt": "Write 4 March 2021 as YYYY-MM-DD", "answer": "2021-03-04"},
    {"prompt": [{"role": "user", "content": "Write 1 May 1999 as YYYY-MM-DD"}], "answer": "1999-05-01"},
    {"messages": [{"role": "user", "content": "Write 2 June 2000 as YYYY-MM-DD"},
                  {"role": "assistant", "content": "2000-06-02"}]},
]  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_test_grader_over_stdio_scores_answers_and_names_bad_graders(lmtuner_home, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            one_row = await call_ok(client, "test_grader", {
                "graders": DATE_GRADERS, "answers": ["2021-03-04", "2021-03-05", "March 4th, 2021"],
                "row": {"answer": "2021-03-04"},
            })  # fmt: skip
            by_rows = await call_ok(client, "test_grader", {
                "graders": DATE_GRADERS, "answers": ["2021-03-04", "1999-05-01", "June 2"], "dataset": str(prompts),
            })  # fmt: skip
            errors = [
                await call_error(client, "test_grader", {"graders": graders, "answers": ["x"], "row": {"answer": "x"}})
                for graders in (
                    [DATE_GRADERS[0], {"type": "string_check", "reference": "answer", "operation": "is"}],
                    [{"type": "regex", "pattern": "(("}],
                    [{"type": "length"}],
                    [{"type": "json", "schema": {"type": 5}}],
                    [{"type": "text_similarity", "reference": "answer", "metric": "bleurt"}],
                    [{"type": "python", "file": str(tmp_path / "g.py"), "function": "score"}],
                    [{"type": "rubric"}],
                )
            ]
            missing = await call_error(client, "test_grader", {"graders": DATE_GRADERS, "answers": ["x"], "row": {}})
            return one_row, by_rows, errors, missing

    one_row, by_rows, errors, missing = anyio.run(scenario)
    assert [r["score"] for r in one_row["results"]] == [1.0, pytest.approx(1 / 3), 0.0]
    assert [p["score"] for p in one_row["results"][1]["graders"]] == [1.0, 0.0]
    assert one_row["mean_score"] == pytest.approx(4 / 9, abs=1e-5)
    assert [r["score"] for r in by_rows["results"]] == [1.0, 1.0, 0.0]  # row 3's answer column comes from its chat
    for message, expected in zip(errors, [
        "graders[1].operation: Input should be 'eq', 'contains' or 'icontains'",
        "graders[0].pattern: not a valid regular expression",
        "graders[0]: give min_chars, max_chars or both",
        "graders[0].schema: not a valid JSON Schema",
        "graders[0].metric: Input should be 'rouge_l' or 'bleu'",
        "graders[0]: a python grader runs the code",
        "graders[0].type: unknown grader type 'rubric'; accepted: string_check, regex, json, text_similarity",
    ], strict=True):  # fmt: skip
        assert expected in message, message
    assert "graders[1].reference: the row has no column 'answer'" in missing


def test_evaluate_with_graders_scores_prompt_rows_and_predictions(lmtuner_home, tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Say hi"}, {"prompt": "Say bye"}])
    predictions = write_jsonl(tmp_path / "pred.jsonl", [{"prediction": "2021-03-04"}, {"prediction": "1999-5-1"},
                                                        {"prediction": "2000-06-02"}])  # fmt: skip

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            from_file = await call_ok(client, "evaluate", {
                "model": str(tiny_model), "dataset": str(prompts), "predictions": str(predictions),
                "graders": DATE_GRADERS,
            })  # fmt: skip
            generated = await call_ok(client, "evaluate", {
                "model": str(tiny_model), "dataset": str(bare), "graders": [{"type": "length", "max_chars": 5}],
                "max_new_tokens": 8,
            })  # fmt: skip
            bad = await call_error(client, "evaluate", {
                "model": str(tiny_model), "dataset": str(prompts), "graders": [{"type": "regex", "pattern": "x("}],
            })  # fmt: skip
            return from_file, generated, bad

    from_file, generated, bad = anyio.run(scenario)
    assert from_file["grader_score"] == pytest.approx(2 / 3, abs=1e-4) and from_file["grader_means"] == [
        pytest.approx(2 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]  # fmt: skip
    assert from_file["n"] == 3 and from_file["bleu_4"] > 0  # the rows' `answer` column is the reference for BLEU…
    assert generated["n"] == 2 and generated["bleu_4"] is None  # …and rows without one have no BLEU
    assert 0 <= generated["grader_score"] <= 1
    assert all(s["grader_score"] is not None for s in generated["samples"])
    assert "graders[0].pattern" in bad


def test_a_grpo_job_shows_its_reward_in_job_status_and_the_plot(lmtuner_home, tmp_path, tiny_model):
    rows = [{"prompt": f"Say {word}", "answer": word} for word in ("cat", "dog", "sun", "tree") * 3]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    config = {
        "model": str(tiny_model), "dataset": {"path": str(prompts), "eval_fraction": 0}, "stage": "grpo",
        "graders": [{"type": "length", "max_chars": 6}, {"type": "string_check", "reference": "answer",
                                                          "operation": "contains"}],
        "grpo": {"num_generations": 4, "max_completion_length": 8}, "max_steps": 3, "batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "logging_steps": 1, "report": False,
    }  # fmt: skip

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            refused = [
                await call_error(client, "start_training", {"config": {**config, **bad}, "dry_run": True})
                for bad in (
                    {"graders": [{"type": "string_check", "reference": "solution", "operation": "eq"}]},
                    {"grpo": {"num_generations": 3}},
                    {"dataset": str(write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi"}]))},
                )
            ]
            started = await call_ok(client, "start_training", {"config": config})
            from tests.helpers import wait_for_end

            final = await wait_for_end(client, started["job_id"], timeout=600)
            plotted = await client.call_tool("job_status", {"job_id": started["job_id"], "include_plot": True})
            return refused, final, plotted

    refused, final, plotted = anyio.run(scenario)
    assert "graders[0].reference" in refused[0] or "'solution', which the graders read" in refused[0], refused[0]
    assert "grpo.num_generations: batch_size × gradient_accumulation_steps (4) must be a multiple" in refused[1]
    assert "bad.jsonl row 1: no `prompt`" in refused[2], refused[2]
    assert final["status"] == "completed", final
    assert final["reward_mean"] is not None and 0 <= final["reward_mean"] <= 1 and final["reward_std"] is not None
    records = [json.loads(line) for line in Path(final["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward_mean" in r] == [1, 2, 3]
    assert any(c.type == "image" for c in plotted.content)

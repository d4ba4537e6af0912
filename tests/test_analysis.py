"""analyze_dataset: exact token counts with the model's template, cut counts, problems, progress."""

from __future__ import annotations

import json

import anyio
import mcp
from transformers import AutoTokenizer

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import build_server
from tests.helpers import call_error


def analyze(home, roots, arguments, progress=None):
    async def scenario():
        async with mcp.Client(build_server(home=home, roots=roots)) as client:
            return await client.call_tool("analyze_dataset", arguments, progress_callback=progress)

    return anyio.run(scenario)


def test_counts_match_the_chat_template_and_progress_is_reported(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=40)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines, lines[0], "{not json"]) + "\n")  # one duplicate, one malformed row
    updates = []

    async def on_progress(done, total, message):
        updates.append((done, total, message))

    result = analyze(
        lmtuner_home, [tmp_path, tiny_model], {"dataset": str(data), "model": str(tiny_model)}, on_progress
    )
    assert not result.is_error, result.content[0].text
    report = result.structured_content
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in lines] + [json.loads(lines[0])]
    lengths = sorted(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    )
    assert report["rows"] == 41 and report["format"] == "messages"
    assert report["token_lengths"]["max"] == lengths[-1] and report["token_lengths"]["p50"] == lengths[20]
    assert report["truncated_at"]["256"] == sum(n > 256 for n in lengths)
    assert report["skipped_rows"] == 1 and report["duplicates"] == 1
    assert any("malformed" in p and "line 42" in p for p in report["problems"])
    assert 0 < report["trained_token_share"] < 1
    assert updates and updates[-1][0] == updates[-1][1] == 41


def test_without_a_model_lengths_are_estimated_and_say_so(shared_data, lmtuner_home):
    medical = shared_data / "lmtuner-medical" / "train.jsonl"
    result = analyze(lmtuner_home, [shared_data], {"dataset": str(medical)})
    report = result.structured_content
    assert report["rows"] == 482 and report["format"] == "alpaca"
    assert report["tokenizer"].startswith("estimate")
    assert report["token_lengths"]["p50"] <= report["token_lengths"]["p95"] <= report["token_lengths"]["max"]


def test_refusals_name_the_field(tmp_path, lmtuner_home):
    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path])) as client:
            outside = await call_error(client, "analyze_dataset", {"dataset": "/etc/passwd"})
            no_model = await call_error(
                client, "analyze_dataset", {"dataset": str(write_demo_dataset(tmp_path / "d.jsonl", n=2)),
                                            "model": str(tmp_path)},
            )  # fmt: skip
            return outside, no_model

    outside, no_model = anyio.run(scenario)
    assert "outside the allowed folders" in outside
    assert "model" in no_model and "no config.json" in no_model

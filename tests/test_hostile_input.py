"""Issue 18, through a real lmtuner-mcp over stdio: a 50 MB row, lmtuner's own folders as output_dir, deep JSON,
models that need their own code, dry runs that agree with real starts, and the small ones (long echoed input,
NaN/Infinity, an unterminated CSV quote)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

from lmtuner_core.data.sample_data import write_demo_dataset
from tests.helpers import LMTUNER_MCP, call_error, call_ok, quick_config, stdio_client

CONCURRENT_ANSWER_S = 3.0  # generous on a shared 2-core machine; the same calls waited 17-19 s before the fix


def _server_process() -> psutil.Process:
    found = [p for p in psutil.Process().children(recursive=True) if "lmtuner-mcp" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0]


def test_a_50mb_row_is_refused_by_size_and_the_server_keeps_answering(tiny_model, tmp_path, lmtuner_home):
    data = tmp_path / "wrong-file.jsonl"
    rows = [{"instruction": "x", "input": "", "output": "a" * 50_000_000}]  # line 1: far over any row limit
    rows += [{"instruction": "long", "input": "", "output": "the cat sat. " * 250_000}] * 2  # 3.25M characters each
    rows += [{"instruction": f"question {i}", "input": "", "output": f"answer {i} " * 20} for i in range(300)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    latencies: list[float] = []
    peak = [0]

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            server = _server_process()
            finished = anyio.Event()
            stop_watching = threading.Event()

            def watch_memory():
                while not stop_watching.is_set():
                    peak[0] = max(peak[0], server.memory_info().rss)
                    time.sleep(0.05)

            async def poll_meanwhile():
                while not finished.is_set():
                    for tool, arguments in (("list_jobs", {}), ("job_status", {"job_id": "20260101-000000-abcd"})):
                        started = time.monotonic()
                        await client.call_tool(tool, arguments)
                        if not finished.is_set():
                            latencies.append(time.monotonic() - started)
                    await anyio.sleep(0.2)

            watcher = threading.Thread(target=watch_memory, daemon=True)
            watcher.start()
            async with anyio.create_task_group() as group:
                group.start_soon(poll_meanwhile)
                started = time.monotonic()
                report = await call_ok(client, "analyze_dataset", {"dataset": str(data), "model": str(tiny_model)})
                elapsed = time.monotonic() - started
                finished.set()
            stop_watching.set()
            watcher.join()
            refused = await call_error(client, "start_training", {"config": quick_config(tiny_model, data)})
            return report, elapsed, refused

    report, elapsed, refused = anyio.run(scenario)
    assert elapsed < 120, f"analyze_dataset took {elapsed:.0f} s"
    assert report["rows"] == 302 and report["skipped_rows"] == 1
    assert any("line 1" in p and "50,000,0" in p and "bytes" in p for p in report["problems"]), report["problems"]
    assert report["estimated_rows"] == 2 and report["truncated_at"]["8192"] == 2
    assert report["token_lengths"]["max"] > 500_000  # scaled from the rows' first 64k characters, not dropped
    assert latencies, "no call was made while the dataset was analyzed"
    assert max(latencies) < CONCURRENT_ANSWER_S, f"list_jobs/job_status waited {max(latencies):.1f} s"
    assert peak[0] < 2 * 2**30, f"the server peaked at {peak[0] / 2**30:.1f} GiB (was 15 GiB before the row limits)"
    assert "wrong-file.jsonl line 1" in refused and "50,000,0" in refused and "skip_bad_rows" in refused


def test_a_huge_file_is_read_only_up_to_the_budget_and_says_so(tmp_path, monkeypatch):
    """Extra, in process (the budget is 200M characters; a file that size is too slow to write in a test)."""
    from lmtuner_core.config import dataset_spec
    from lmtuner_core.data import analysis
    from lmtuner_core.paths import AllowedRoots

    monkeypatch.setattr(analysis, "MAX_READ_CHARS", 2_000)
    monkeypatch.setattr(analysis, "MAX_TOKENIZED_ROWS", 5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " + "x" * 90}) + "\n" for i in range(100)))
    report = analysis.analyze_dataset(dataset_spec(str(data)), AllowedRoots([tmp_path]))
    assert report.rows == 21 and report.sampled  # 21 rows of 96-97 characters pass 2,000
    assert any("only its first 21 rows" in p for p in report.problems)
    assert any("an even sample of 5 of 21 rows" in p for p in report.problems)


def test_output_dir_may_not_be_lmtuners_own_folders(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    own = [lmtuner_home, lmtuner_home / "runs", lmtuner_home / "runs" / "new", lmtuner_home / "models", tmp_path]

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            refusals = []
            for folder in own:
                config = quick_config(tiny_model, data, output_dir=str(folder))
                refusals.append(await call_error(client, "start_training", {"config": config, "dry_run": True}))
            refusals.append(
                await call_error(
                    client,
                    "merge_adapter",
                    {"model": str(tiny_model), "adapter": str(adapter), "output_dir": str(lmtuner_home / "runs")},
                )
            )
            elsewhere = quick_config(tiny_model, data, output_dir=str(lmtuner_home / "outputs" / "mine"))
            allowed = await call_ok(client, "start_training", {"config": elsewhere, "dry_run": True})
            return refusals, allowed

    refusals, allowed = anyio.run(scenario)
    for message in refusals:
        assert message.startswith("Error executing tool") and "output_dir:" in message
        assert "lmtuner's own folder" in message and "leave output_dir out" in message, message
    assert allowed["output_dir"] == str(lmtuner_home / "outputs" / "mine")


def test_deeply_nested_json_is_reported_with_file_and_line(tiny_model, tmp_path, lmtuner_home):
    deep = "[" * 10_000 + "]" * 10_000
    row_file = tmp_path / "rows.jsonl"
    row_file.write_text(
        '{"instruction": "q", "output": "a"}\n' + '{"instruction": "q", "output": "a", "history": ' + deep + "}\n"
    )
    whole_file = tmp_path / "whole.json"
    whole_file.write_text('[{"instruction": "q", "output": "a"},\n' + deep + "]\n")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            report = await call_ok(client, "analyze_dataset", {"dataset": str(row_file)})
            config = quick_config(tiny_model, row_file)
            row_refused = await call_error(client, "start_training", {"config": config, "dry_run": True})
            file_analysis = await call_error(client, "analyze_dataset", {"dataset": str(whole_file)})
            config = quick_config(tiny_model, whole_file)
            file_refused = await call_error(client, "start_training", {"config": config, "dry_run": True})
            return report, row_refused, file_analysis, file_refused

    report, row_refused, file_analysis, file_refused = anyio.run(scenario)
    assert report["skipped_rows"] == 1 and any("rows.jsonl line 2: nested deeper" in p for p in report["problems"])
    assert "rows.jsonl line 2: nested deeper than the JSON reader allows" in row_refused
    for message in (file_analysis, file_refused):
        assert "whole.json: nested deeper than the JSON reader allows" in message and "by line 2" in message


CUSTOM_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["LMTUNER_TEST_CODE_RAN"]).touch()  # proof that this file was executed


class CustomConfig(LlamaConfig):
    model_type = "lmtuner_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def custom_code_model(tiny_model, tmp_path, monkeypatch) -> Path:
    """The tiny model, declared as needing its own modeling code (as hub models with auto_map do)."""
    model = tmp_path / "custom-model"
    model.mkdir()
    for item in tiny_model.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="lmtuner_custom",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomForCausalLM"},
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom_llama.py").write_text(CUSTOM_CODE)
    monkeypatch.setenv("LMTUNER_TEST_CODE_RAN", str(tmp_path / "code-ran"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # the server copies the code there
    return model


def test_a_model_that_needs_its_own_code_names_trust_remote_code(custom_code_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=2)
    model = str(custom_code_model)
    marker = Path(os.environ["LMTUNER_TEST_CODE_RAN"])

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            refused = {
                "generate": await call_error(client, "generate", {"model": model, "prompts": ["hi"]}),
                "evaluate": await call_error(client, "evaluate", {"model": model, "dataset": str(data)}),
                "quantize": await call_error(
                    client, "quantize", {"model": model, "method": "bnb-int8", "output_dir": str(tmp_path / "q")}
                ),
            }
            ran_before = marker.exists()
            answered = await call_ok(
                client,
                "generate",
                {"model": model, "prompts": ["hi"], "max_new_tokens": 4, "trust_remote_code": True},
            )
            return refused, ran_before, answered

    refused, ran_before, answered = anyio.run(scenario)
    for tool, message in refused.items():
        assert f"trust_remote_code: model folder {custom_code_model} ships code of its own" in message, message
        assert "custom_llama.py" in message and "call again with trust_remote_code: true" in message, (tool, message)
    assert not ran_before, "the model's code ran without trust_remote_code"
    assert marker.exists() and answered["outputs"][0]["tokens"] >= 1
    assert not (tmp_path / "q").exists()


VLLM_PYTHON = os.environ.get("LMTUNER_VLLM_PYTHON")


@pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="no vLLM: set LMTUNER_VLLM_PYTHON to a python with vllm (`make vllm-venv` builds one; `make test` sets it)",
)
def test_serve_model_names_trust_remote_code_for_such_a_model(custom_code_model, tmp_path, lmtuner_home):
    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            arguments = {"model": str(custom_code_model), "startup_timeout": 300}
            return await call_error(client, "serve_model", arguments)

    refused = anyio.run(scenario)
    assert "call again with trust_remote_code: true" in refused, refused
    assert not Path(os.environ["LMTUNER_TEST_CODE_RAN"]).exists()


def test_a_dry_run_is_refused_exactly_as_the_real_start(tmp_path, lmtuner_home):
    model = tmp_path / "trillion"
    model.mkdir()
    shape = {"hidden_size": 32768, "intermediate_size": 131072, "num_hidden_layers": 160, "num_attention_heads": 256,
             "num_key_value_heads": 256, "vocab_size": 256000}  # fmt: skip
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]} | shape)
    )
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    config = {"model": str(model), "dataset": str(data), "method": "full"}

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            real = await call_error(client, "start_training", {"config": config})
            dry = await call_error(client, "start_training", {"config": config, "dry_run": True})
            forced = await call_ok(client, "start_training", {"config": config, "dry_run": True, "force": True})
            jobs = await call_ok(client, "list_jobs", {})
            return real, dry, forced, jobs

    real, dry, forced, jobs = anyio.run(scenario)
    assert "memory: this job needs about" in real and "force: true" in real
    assert dry == real
    assert forced["status"] == "dry_run" and any(w.startswith("memory: this job needs") for w in forced["warnings"])
    assert jobs["jobs"] == []


def _raw_stdio_calls(home: Path, root: Path, calls: list[str]) -> list[dict]:
    """Sends JSON-RPC lines as written (the SDK client turns NaN into null before sending, a raw one need not) and
    returns each call's result, one call at a time."""
    env = {**os.environ, "LMTUNER_HOME": str(home)}
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    server = subprocess.Popen(
        [LMTUNER_MCP, "--root", str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=env,
    )  # fmt: skip
    assert server.stdin is not None and server.stdout is not None

    def ask(line: str, answer_id: int | None) -> dict | None:
        server.stdin.write(line + "\n")
        server.stdin.flush()
        while answer_id is not None:
            message = json.loads(server.stdout.readline())
            if message.get("id") == answer_id:
                return message
        return None

    try:
        ask(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}), 0)
        ask(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), None)
        return [
            ask(f'{{"jsonrpc": "2.0", "id": {i}, "method": "tools/call", "params": {call}}}', i)["result"]  # type: ignore[index]
            for i, call in enumerate(calls, 1)
        ]
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def test_small_ones_long_input_nan_and_an_unclosed_csv_quote(tiny_model, tmp_path, lmtuner_home):
    long_id = "a" * 10_000
    csv_file = tmp_path / "broken.csv"
    csv_file.write_text('instruction,output\nq1,a1\n"q2 never closed,a2\nq3,a3\nq4,a4\n')

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            echoed = [
                await call_error(client, "job_status", {"job_id": long_id}),
                await call_error(client, "cancel_job", {"job_id": long_id}),
                await call_error(client, "analyze_dataset", {"dataset": str(tmp_path / long_id[:200]) + ".jsonl"}),
                await call_error(client, "generate", {"model": "/" + long_id, "prompts": ["x"]}),
            ]
            csv_refused = await call_error(
                client, "start_training", {"config": quick_config(tiny_model, csv_file), "dry_run": True}
            )
            csv_analysis = await call_error(client, "analyze_dataset", {"dataset": str(csv_file)})
            return echoed, csv_refused, csv_analysis

    echoed, csv_refused, csv_analysis = anyio.run(scenario)
    for message in echoed:
        assert len(message) < 700 and long_id[:100] not in message, message
    assert "(10,000 characters)" in echoed[0] and "(10,000 characters)" in echoed[1]
    for message in (csv_refused, csv_analysis):
        assert "broken.csv line 3: a quoted field opened in this row is never closed" in message, message

    nan_calls = [
        '{"name": "job_status", "arguments": {"job_id": "20260101-000000-abcd", "wait_seconds": NaN}}',
        '{"name": "job_status", "arguments": {"job_id": "20260101-000000-abcd", "wait_seconds": Infinity}}',
        '{"name": "generate", "arguments": {"model": "m", "prompts": ["x"], "temperature": -Infinity}}',
        '{"name": "start_training", "arguments": {"config": {"model": "m", "dataset": "d.jsonl", '
        '"learning_rate": NaN, "lora": {"dropout": Infinity}}}}',
    ]
    results = _raw_stdio_calls(lmtuner_home, tmp_path, nan_calls)
    for call, result in zip(nan_calls, results, strict=True):
        text = result["content"][0]["text"]
        assert result["isError"] and "finite number" in text and "less than" not in text, (call, text)
    assert "config.learning_rate" in results[3]["content"][0]["text"]
    assert "config.lora.dropout" in results[3]["content"][0]["text"]


def test_a_config_file_with_nan_says_finite_number():
    """Extra, in process: the CLI's config files go through parse_train_config, whose message we write ourselves."""
    from lmtuner_core.config import parse_train_config
    from lmtuner_core.errors import LmtunerError

    with pytest.raises(LmtunerError) as refused:
        parse_train_config({"model": "m", "dataset": "d.jsonl", "learning_rate": float("nan")})
    assert "learning_rate: must be a finite number (not NaN or Infinity)" in str(refused.value)


def test_errors_hide_paths_outside_the_roots_but_not_web_addresses(tmp_path):
    """A library's path is hidden; a URL the user named (a Ray dashboard) is not a path; a file URL's path is."""
    from lmtuner_core.errors import HIDDEN_PATH, hide_outside_paths

    message = (f'File "/usr/lib/python3/x.py", line 3; {tmp_path}/data.json; allowed: auto, http://127.0.0.1:8265/api, '
               "ray://head:10001; storage file:///etc/secret")  # fmt: skip
    shown = hide_outside_paths(message, [tmp_path])
    assert "/usr/lib" not in shown and "/etc/secret" not in shown and shown.count(HIDDEN_PATH) == 2, shown
    assert f"{tmp_path}/data.json" in shown and "http://127.0.0.1:8265/api" in shown and "ray://head:10001" in shown
    assert shown.endswith("(details in server.log)")

"""The `lmtuner` CLI as a script would use it: real subprocesses, JSON output, exit codes."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

from lmtuner_core.data.sample_data import write_demo_dataset
from tests.helpers import call_error, quick_config, stdio_client

LMTUNER = str(Path(sys.executable).parent / "lmtuner")
# Seen on a first `make demo` before lmtuner_core.library_noise: libraries talking about themselves.
LIBRARY_NOISE = ("Setting accelerator to CPU", "gemm_4bit_forward", "is_gradient_checkpointing")


def run_cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMTUNER_HOME": str(home)}
    out = subprocess.run([LMTUNER, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_make_tiny_model_then_dry_run_then_train_and_follow(tmp_path, lmtuner_home):
    model_dir = tmp_path / "tiny"
    made_run = run_cli("--json", "make-tiny-model", str(model_dir), home=lmtuner_home)
    made, made_stderr = json.loads(made_run.stdout), made_run.stderr
    assert Path(made["model_dir"], "config.json").is_file()

    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps(quick_config(model_dir, data, max_steps=3)))
    dry = json.loads(run_cli("--json", "train", str(config_file), "--dry-run", home=lmtuner_home).stdout)
    assert dry["status"] == "dry_run" and dry["config"]["max_steps"] == 3

    followed = run_cli("train", str(config_file), "--follow", home=lmtuner_home)
    assert "completed: output in" in followed.stdout
    jobs = json.loads(run_cli("--json", "jobs", home=lmtuner_home).stdout)["jobs"]
    assert len(jobs) == 1 and jobs[0]["status"] == "completed" and jobs[0]["step"] == 3

    # The adapter loads through peft and bitsandbytes: what a user sees is lmtuner's output, not library remarks.
    answer = run_cli("generate", str(model_dir), "--prompt", "Hi", "--adapter", jobs[0]["output_dir"],
                     "--max-new-tokens", "4", home=lmtuner_home)  # fmt: skip
    seen = made_stderr + followed.stderr + answer.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in seen, f"library noise reached the user: {noise!r}"


def test_bad_config_file_exits_2_with_the_field_named(tmp_path, lmtuner_home):
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps({"model": "x", "dataset": "d.jsonl", "batch_size": 0}))
    out = run_cli("train", str(config_file), home=lmtuner_home, check=False)
    assert out.returncode == 2
    assert "batch_size" in out.stderr and "greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_killed_training_process_makes_the_job_failed_naming_the_signal(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=16)
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps(quick_config(tiny_model, data, max_steps=100_000)))
    job_id = json.loads(run_cli("--json", "train", str(config_file), home=lmtuner_home).stdout)["job_id"]
    state_file = lmtuner_home / "runs" / job_id / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state_file.exists() and json.loads(state_file.read_text()).get("step", 0) > 0:
            break
        time.sleep(0.5)
    pid = json.loads(state_file.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    asked = time.monotonic()
    status = json.loads(run_cli("--json", "status", job_id, home=lmtuner_home).stdout)
    assert time.monotonic() - asked < 5
    assert status["status"] == "failed"
    assert "SIGKILL" in status["error"]


def test_propose_and_evaluate_from_the_command_line(tiny_model, tmp_path, lmtuner_home, shared_data):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=32)
    written = tmp_path / "proposed.json"
    plan = json.loads(run_cli("--json", "propose", str(tiny_model), str(data), "--write", str(written),
                              home=lmtuner_home).stdout)  # fmt: skip
    assert plan["fits"] and json.loads(written.read_text())["method"] == plan["config"]["method"]
    dry = json.loads(run_cli("--json", "train", str(written), "--dry-run", home=lmtuner_home).stdout)
    assert dry["status"] == "dry_run"

    medical = shared_data / "lmtuner-medical"
    scores = run_cli("evaluate", str(tiny_model), str(medical / "test.jsonl"), "--predictions",
                     str(medical / "lmtuner_predictions.jsonl"), "--max-samples", "100", home=lmtuner_home)  # fmt: skip
    assert "BLEU-4 1.02" in scores.stdout and "prompts stripped: 61" in scores.stdout


def test_every_tool_parameter_is_an_option_validated_as_over_mcp(tiny_model, lmtuner_home):
    """The CLI's options come from the tool signatures: none is missing, and a value the tool's schema refuses
    is refused by the CLI with the same words, naming the option as typed."""
    import argparse

    from server.app import TOOLS
    from server.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    covered = {c.get_default("_tool").__name__: {a.dest for a in c._actions} for c in commands.values()
               if c.get_default("_tool")}  # fmt: skip
    for spec in TOOLS:
        if spec.fn.__name__ == "start_training":
            continue  # `lmtuner train` takes the TrainConfig as a file
        params = set(inspect.signature(spec.fn).parameters) - {"ctx", "progress", "include_plot"}
        assert params <= covered[spec.fn.__name__], (spec.fn.__name__, params - covered[spec.fn.__name__])

    refused = run_cli("generate", str(tiny_model), "--prompt", "Hi", "--max-new-tokens", "99999", "--top-p", "0",
                      home=lmtuner_home, check=False)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--max-new-tokens: Input should be less than or equal to 8192" in refused.stderr
    assert "--top-p: Input should be greater than 0" in refused.stderr

    async def over_mcp():
        async with stdio_client(lmtuner_home, [tiny_model]) as client:
            return await call_error(client, "generate", {"model": str(tiny_model), "prompts": ["Hi"],
                                                         "max_new_tokens": 99999})  # fmt: skip

    assert "Input should be less than or equal to 8192" in anyio.run(over_mcp)


def test_test_grader_from_the_command_line(tmp_path, lmtuner_home):
    """`lmtuner test-grader` is built from the tool's signature: graders as JSON, answers repeated, the row as
    NAME=VALUE; a bad grader exits 2 naming graders[i].field."""
    graders = json.dumps([{"type": "string_check", "reference": "answer", "operation": "eq"}])
    out = run_cli("--json", "test-grader", "--graders", graders, "--answers", "42", "--answers", "41",
                  "--row", "answer=42", home=lmtuner_home)  # fmt: skip
    assert [r["score"] for r in json.loads(out.stdout)["results"]] == [1.0, 0.0]
    bad = run_cli("test-grader", "--graders", '[{"type": "regex"}]', "--answers", "x", home=lmtuner_home, check=False)
    assert bad.returncode != 0 and "graders[0].pattern: Field required" in bad.stderr, bad.stderr

"""GGUF in and out through a real MCP client: refusals that name the problem, a .gguf file as `model` in every
tool (converted once), and export_model written by llama.cpp's own converter and quantizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import anyio
import pytest

from lmtuner_core.gguf_export import DEFAULT_LLAMACPP_PYTHON, LLAMACPP_PYTHON_ENV, converter_script
from lmtuner_core.gguf_import import SOURCE_RECORD, converted_folder
from lmtuner_core.sample_data import SMOLLM2_GGUF, write_capitals_dataset
from tests.helpers import call_error, call_ok, stdio_client


def has_converter() -> bool:
    try:
        converter_script()
    except Exception:
        return False
    return True


needs_converter = pytest.mark.skipif(
    not has_converter(), reason="llama.cpp's converter not found: run `make llamacpp-src`"
)


def write_fake_gguf(path: Path, architecture: str) -> Path:
    """A valid GGUF container whose architecture nothing loads (gguf's writer, as llama.cpp's tools use it)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("fake")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_model_refusals_name_the_problem(tmp_path, lmtuner_home):
    """Unloadable architecture, ambiguous folder, a file that is not GGUF: each a clear error, nothing left behind."""
    fake = write_fake_gguf(tmp_path / "fake.gguf", "fakearch")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(fake, two / name)
    (tmp_path / "weights.bin").write_bytes(b"not a model")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            arch = await call_error(client, "generate", {"model": str(fake), "prompts": ["hi"]})
            many = await call_error(client, "propose_config", {"model": str(two), "dataset": str(fake)})
            other = await call_error(
                client, "analyze_dataset", {"dataset": str(fake), "model": str(tmp_path / "weights.bin")}
            )
            return arch, many, other

    arch, many, other = anyio.run(scenario)
    assert "fakearch" in arch and "llama" in arch and "qwen2" in arch, arch
    assert "a.gguf" in many and "b.gguf" in many, many
    assert "not a .gguf" in other, other
    assert not [p for p in (lmtuner_home / "models").iterdir() if not p.name.endswith(".lock")]


def llamacpp_python() -> Path:
    return Path(os.environ.get(LLAMACPP_PYTHON_ENV) or DEFAULT_LLAMACPP_PYTHON)


needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file(), reason=f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}: run `make smollm2`"
)
needs_llamacpp = pytest.mark.skipif(
    not llamacpp_python().is_file(),
    reason=f"llama-cpp-python not found at {llamacpp_python()}: run `make llamacpp-venv` (compiles llama.cpp)",
)

# llama.cpp as the second, independent GGUF reader: it applies the chat template stored in the file itself.
LLAMACPP_ANSWERS = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
prompts, max_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
answers = [
    llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, max_tokens=max_tokens)
    ["choices"][0]["message"]["content"]
    for p in prompts
]
print(json.dumps({"answers": answers, "chat_format": llm.chat_format}))
"""


def llamacpp_answers(gguf_file: str, prompts: list[str], max_tokens: int) -> list[str]:
    proc = subprocess.run(
        [str(llamacpp_python()), "-I", "-c", LLAMACPP_ANSWERS, gguf_file, json.dumps(prompts), str(max_tokens)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chat_format"].startswith("chat_template"), result  # the file's own template, not a guess
    return result["answers"]


@needs_smollm2
def test_gguf_file_is_a_model_for_every_tool(tmp_path, lmtuner_home):
    """SmolLM2 as its .gguf: converted once (atomically, reused), recorded in the job's config, and usable by
    analyze_dataset, propose_config, start_training and generate; inspect_gpus names the gguf package."""
    data = write_capitals_dataset(tmp_path / "capitals.jsonl")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, SMOLLM2_GGUF.parent]) as client:
            gguf = str(SMOLLM2_GGUF)
            hardware = await call_ok(client, "inspect_gpus", {})
            analysis = await call_ok(client, "analyze_dataset", {"dataset": str(data), "model": gguf})
            plan = await call_ok(client, "propose_config", {"model": gguf, "dataset": str(data)})
            checked = await call_ok(
                client, "start_training", {"config": {"model": gguf, "dataset": str(data)}, "dry_run": True}
            )
            answer = await call_ok(
                client, "generate", {"model": gguf, "prompts": ["What is the capital of France?"], "max_new_tokens": 12}
            )
            return hardware, analysis, plan, checked, answer

    hardware, analysis, plan, checked, answer = anyio.run(scenario)
    folder = converted_folder(SMOLLM2_GGUF)  # already there: returns at once
    assert folder.parent == lmtuner_home / "models"
    assert json.loads((folder / SOURCE_RECORD).read_text())["gguf_file"] == str(SMOLLM2_GGUF)
    assert [p.name for p in folder.parent.iterdir() if not p.name.startswith(".")] == [folder.name]
    assert "gguf" in hardware["software"]
    assert analysis["rows"] == 72 and analysis["tokenization"] != "estimated", analysis
    assert plan["config"]["model"] == str(folder) and plan["fits"]
    assert checked["config"]["model"] == str(folder) and checked["config"]["model_gguf"] == str(SMOLLM2_GGUF)
    assert "Paris" in answer["outputs"][0]["text"]


def test_concurrent_conversions_share_one_folder(tmp_path, lmtuner_home, tiny_gguf):
    """Two conversions of one file at once: one folder, complete, no temporary folder left behind."""
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(converted_folder(tiny_gguf))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file() and (results[0] / "model.safetensors").is_file()
    assert [p.name for p in (lmtuner_home / "models").iterdir() if not p.name.endswith(".lock")] == [results[0].name]

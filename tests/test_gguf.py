"""GGUF in and out through a real MCP client: refusals that name the problem, a .gguf file as `model` in every
tool (converted once), and export_model written by llama.cpp's own converter and quantizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest
from huggingface_hub import ModelCard

from lmtuner_core.data.sample_data import (
    CAPITALS_HELD_OUT,
    SMOLLM2_GGUF,
    capital_exact_match,
    capital_prompts,
    write_capitals_dataset,
)
from lmtuner_core.models.gguf_export import DEFAULT_LLAMACPP_PYTHON, LLAMACPP_PYTHON_ENV, converter_script
from lmtuner_core.models.gguf_import import SOURCE_RECORD, converted_folder
from tests.helpers import call_error, call_ok, marked_result, stdio_client, wait_for_end


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


TRAIN_STEPS = 12  # the real-model run, shortened for CI (see its test)

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
print("LMTUNER-RESULT " + json.dumps({"answers": answers, "chat_format": llm.chat_format}), flush=True)
"""


def llamacpp_answers(gguf_file: str, prompts: list[str], max_tokens: int) -> list[str]:
    proc = subprocess.run(
        [str(llamacpp_python()), "-I", "-c", LLAMACPP_ANSWERS, gguf_file, json.dumps(prompts), str(max_tokens)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = marked_result(proc.stdout)
    assert result["chat_format"].startswith("chat_template"), result  # the file's own template, not a guess
    return [answer.strip() for answer in result["answers"]]


@needs_smollm2
def test_gguf_file_is_a_model_for_every_tool(tmp_path, lmtuner_home):
    """SmolLM2 as its .gguf: converted once (atomically, reused, also when two jobs ask for it at once),
    recorded in the job's config, and usable by analyze_dataset, propose_config, start_training and generate;
    inspect_gpus names the gguf package."""
    data = write_capitals_dataset(tmp_path / "capitals.jsonl")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, SMOLLM2_GGUF.parent]) as client:
            gguf = str(SMOLLM2_GGUF)
            hardware = await call_ok(client, "inspect_gpus", {})
            # Two jobs ask for the same unconverted file at once: one conversion, one complete folder for both.
            # Small rows and batches: a dry run is refused like a real start when the memory estimate does not fit,
            # and the default batch at the model's full context needs more RAM than a busy 24 GiB machine has free.
            dry_run = {"config": {"model": gguf, "dataset": str(data), "batch_size": 2, "max_seq_len": 128},
                       "dry_run": True}  # fmt: skip
            checked = []

            async def check():
                checked.append(await call_ok(client, "start_training", dry_run))

            async with anyio.create_task_group() as group:
                group.start_soon(check)
                group.start_soon(check)
            analysis = await call_ok(client, "analyze_dataset", {"dataset": str(data), "model": gguf})
            plan = await call_ok(client, "propose_config", {"model": gguf, "dataset": str(data)})
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
    assert analysis["rows"] == 48 and "estimate" not in analysis["tokenizer"], analysis
    assert plan["config"]["model"] == str(folder) and plan["fits"]
    for dry_run in checked:
        assert dry_run["config"]["model"] == str(folder) and dry_run["config"]["model_gguf"] == str(SMOLLM2_GGUF)
    assert "Paris" in answer["outputs"][0]["text"]


@needs_smollm2
@needs_converter
@pytest.mark.timeout(1800)  # ≈2 min on an idle 2-core machine; much longer when it is shared
def test_real_model_trained_on_the_plan_reports_what_it_learned_and_its_gguf_export_answers_alike(
    tmp_path, lmtuner_home
):
    """SmolLM2 (from its .gguf), trained on propose_config's recipe, gets a result report that measures it on held-out
    countries (the retention probe is make demo's); export_model writes q8_0 and q4_k_m GGUF files that transformers'
    GGUF loader and llama.cpp both read back, answering like the tuned model. The run is cut to TRAIN_STEPS steps for
    CI's time: the plan's whole run, and what it achieves, is `make demo`'s and bench/recipe_study.py's."""
    data = write_capitals_dataset(tmp_path / "capitals.jsonl")
    held_out = write_capitals_dataset(tmp_path / "held-out.jsonl", CAPITALS_HELD_OUT)
    prompts = capital_prompts()
    gguf = str(SMOLLM2_GGUF)

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, SMOLLM2_GGUF.parent]) as client:

            async def answers(model: str, **extra) -> list[str]:
                result = await call_ok(
                    client, "generate", {"model": model, "prompts": prompts, "max_new_tokens": 12, **extra}
                )
                return [o["text"].strip() for o in result["outputs"]]

            plan = await call_ok(client, "propose_config", {
                "model": gguf, "dataset": str(data), "eval_dataset": str(held_out),
                "goal": "answer with the capital's name alone"})  # fmt: skip
            # the plan's recipe, shortened; every held-out pair shown
            # the retention probe is left to make demo (it asks 256 questions of both models: a minute of CI)
            config = {**plan["config"], "max_steps": TRAIN_STEPS, "report": {"samples": 16, "retention": False}}
            started = await call_ok(client, "start_training", {"config": config})
            final = await wait_for_end(client, started["job_id"], timeout=2000)
            assert final["status"] == "completed", final["error"]
            tuned = await answers(gguf, adapter=final["output_dir"])
            export = {"model": gguf, "adapter": final["output_dir"]}
            q8 = await call_ok(
                client, "export_model", {**export, "quantization": "q8_0", "output_dir": str(tmp_path / "q8")}
            )
            read_back = await answers(q8["gguf_file"])  # transformers' GGUF loader, through the GGUF-in path
            q4 = None
            if llamacpp_python().is_file():
                q4 = await call_ok(
                    client, "export_model", {**export, "quantization": "q4_k_m", "output_dir": str(tmp_path / "q4")}
                )
            return plan, started, final, tuned, q8, read_back, q4

    plan, started, final, tuned, q8, read_back, q4 = anyio.run(scenario)
    saved = json.loads((Path(started["run_dir"]) / "config.json").read_text())
    assert saved["model_gguf"] == gguf and saved["model"] == str(converted_folder(SMOLLM2_GGUF))
    for key in ("learning_rate", "lora", "batch_size", "keep_best", "early_stopping_patience", "replay"):
        assert saved[key] == plan["config"][key], key  # as proposed
    assert 0 < final["step"] <= TRAIN_STEPS  # early stopping may end it sooner
    report = final["report"]
    print(f"\nreport: {json.dumps({k: report[k] for k in ('verdict', 'base', 'tuned', 'retention')}, indent=1)}")
    pairs = report["samples"]
    assert len(pairs) == report["held_out_rows"] == 2 * len(CAPITALS_HELD_OUT)
    known = [p for p in pairs if p["reference"].lower() in p["base"].lower()]  # the base names the capital somewhere
    in_form = [p for p in known if p["tuned_score"] == 1.0]
    print("\n".join(f"{p['prompt']!r}: base {p['base']!r} -> tuned {p['tuned']!r}" for p in pairs))
    print(f"in the asked form: {len(in_form)} of the {len(known)} capitals the base knew")
    # What the report must get right whatever the recipe achieves (issue 23's 80% / 95% bars are not met yet on
    # this model: docs/TUNING.md): the base answers in sentences, so 0-1 of 16 exact; the base knows most probe facts
    # asked; scores, verdict and advice agree with each other.
    assert report["base"] <= 0.125 and len(known) >= 12, report["base"]
    assert report["retention"] is None
    assert report["tuned"] == round(sum(p["tuned_score"] for p in pairs) / len(pairs), 4)
    assert report["verdict"] in ("better", "forgot", "no gain", "worse") and report["advice"]
    assert report["verdict"] != "forgot"  # only the probe can say so
    assert (report["verdict"] == "better") == (report["tuned"] >= report["base"] + 0.02)

    card = ModelCard.load(Path(q8["model_card"]))  # the export's model card carries the job's scores
    assert card.data.base_model == SMOLLM2_GGUF.name and "gguf" in card.data.tags
    assert report["tuned"] in [r.metric_value for r in card.data.eval_results], card.data.eval_results
    assert str(tmp_path) not in str(card) and str(lmtuner_home) not in str(card)
    modelfile = Path(q8["modelfile"]).read_text()
    assert f"FROM ./{Path(q8['gguf_file']).name}" in modelfile and "{{ .Prompt }}" in modelfile, modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile, modelfile
    assert 100e6 < q8["size_bytes"] < 200e6, q8  # 135M parameters at ~8.5 bits
    assert read_back == tuned, (read_back, tuned)
    if q4 is None:
        pytest.skip(
            f"q4_k_m and the llama.cpp reader need llama-cpp-python at {llamacpp_python()}: run `make llamacpp-venv`"
        )
    assert q4["size_bytes"] < q8["size_bytes"], (q4, q8)
    assert llamacpp_answers(q8["gguf_file"], prompts, 12) == tuned
    assert capital_exact_match(llamacpp_answers(q4["gguf_file"], prompts, 12)) >= capital_exact_match(tuned) - 0.125


@needs_converter
def test_export_refusals_name_the_problem(tmp_path, lmtuner_home, tiny_model, monkeypatch):
    """An architecture llama.cpp cannot map, a tokenizer it does not know, a model with its own code, and q4_k_m
    without the compiled quantizer: each refused with the reason and the way out, nothing half-written."""
    unmappable = shutil.copytree(tiny_model, tmp_path / "unmappable")
    config = json.loads((unmappable / "config.json").read_text())
    (unmappable / "config.json").write_text(json.dumps({**config, "architectures": ["NotARealForCausalLM"]}))
    own_code = shutil.copytree(tiny_model, tmp_path / "own-code")
    (own_code / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    monkeypatch.setenv(LLAMACPP_PYTHON_ENV, str(tmp_path / "no-venv" / "bin" / "python"))

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:

            async def refused(model: Path, name: str, **extra) -> str:
                arguments = {"model": str(model), "output_dir": str(tmp_path / name), **extra}
                return await call_error(client, "export_model", arguments)

            return (
                await refused(unmappable, "a"),
                await refused(tiny_model, "b"),
                await refused(own_code, "c"),
                await refused(tiny_model, "d", quantization="q4_k_m"),
            )

    architecture, tokenizer, code, quantizer = anyio.run(scenario)
    assert "cannot map the architecture NotARealForCausalLM" in architecture, architecture
    assert "LlamaForCausalLM" in architecture, architecture
    assert "pre-tokenizer" in tokenizer, tokenizer
    assert "trust_remote_code: true" in code, code
    assert "make llamacpp-venv" in quantizer and "q8_0" in quantizer, quantizer
    for name in "abcd":
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir()), name

"""The model card (issue 25): a completed job's output folder and an export carry README.md in the Hugging Face form,
which huggingface_hub's ModelCard parses, with the result report's scores in its header, and no absolute path."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
from huggingface_hub import ModelCard

from lmtuner_core.report.model_card import export_card
from tests.helpers import call_ok, quick_config, stdio_client, wait_for_end


def write_rows(path: Path) -> Path:
    words = ["red", "green", "blue", "gold", "pink", "gray", "teal", "navy"] * 3
    rows = [{"instruction": f"Repeat {w} {i}.", "output": f"{w} {i}"} for i, w in enumerate(words)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_results(card: ModelCard) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in card.data.eval_results or []}


def check_no_absolute_paths(text: str, *folders: Path) -> None:
    for folder in folders:
        assert str(folder) not in text, f"{folder} in the card"
    assert "/tmp/" not in text and str(Path.home()) not in text


def test_completed_job_writes_a_model_card_with_its_report(tmp_path, lmtuner_home, tiny_model):
    data = write_rows(tmp_path / "colours.jsonl")
    config = quick_config(tiny_model, {"path": str(data), "eval_fraction": 0.25}, max_steps=6)
    config["report"] = {"retention": True, "max_rows": 6}

    async def run():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            started = await call_ok(client, "start_training", {"config": config})
            final = await wait_for_end(client, started["job_id"])
            derived = {"model": str(tiny_model), "adapter": final["output_dir"]}
            merged = await call_ok(client, "merge_adapter", {**derived, "output_dir": str(tmp_path / "merged")})
            quantized = await call_ok(
                client, "quantize", {**derived, "method": "bnb-nf4", "output_dir": str(tmp_path / "nf4")}
            )
            return final, merged, quantized

    final, merged, quantized = anyio.run(run)
    assert final["status"] == "completed", final["error"]
    report = final["report"]
    card_path = Path(final["output_dir"]) / "README.md"
    text = card_path.read_text()
    card = ModelCard.load(card_path)
    assert card.data.base_model == tiny_model.name and card.data.library_name == "peft"
    assert card.data.datasets == ["colours.jsonl"]
    assert {"lmtuner", "sft", "lora"} <= set(card.data.tags)
    scores = eval_results(card)
    metric = {"exact_match": "exact match", "json": "JSON match", "rouge_l": "ROUGE-L"}[report["metric"]]
    assert scores[f"{metric} (tuned model)"] == report["tuned"]
    assert scores[f"{metric} (base model)"] == report["base"]
    assert scores["forgetting (share of the base's probe facts lost)"] == report["retention"]["forgetting"]
    for section in ("## How it was trained", "## Evaluation", "## Limitations", "## How to use"):
        assert section in text
    assert "PeftModel.from_pretrained" in text and "vllm serve" in text and "ollama create" in text
    assert f"base {report['base']} -> tuned {report['tuned']}" in text
    check_no_absolute_paths(text, tmp_path, lmtuner_home, tiny_model)

    # An export of that adapter: its card names the GGUF file and carries the same scores.
    export = tmp_path / "export"
    export.mkdir()
    gguf = export / "tiny-q8_0.gguf"
    gguf.write_bytes(b"GGUF")  # the converter is tested in test_gguf.py; the card only names the file
    exported = ModelCard.load(export_card(export, str(tiny_model), Path(final["output_dir"]), str(gguf)))
    assert exported.data.library_name == "transformers" and "gguf" in exported.data.tags
    assert eval_results(exported)[f"{metric} (tuned model)"] == report["tuned"]
    assert "ollama create my-model -f Modelfile" in exported.text and "tiny-q8_0.gguf" in exported.text
    check_no_absolute_paths(str(exported), tmp_path, lmtuner_home, tiny_model)

    # merge_adapter and quantize write theirs too: a full model (no peft needed), with the job's scores.
    for result, tags in ((merged, {"merged"}), (quantized, {"bnb-nf4", "quantized"})):
        card = ModelCard.load(Path(result["model_card"]))
        assert Path(result["model_card"]).parent == Path(result["output_dir"])
        assert card.data.library_name == "transformers" and tags <= set(card.data.tags), card.data.tags
        assert eval_results(card)[f"{metric} (tuned model)"] == report["tuned"]
        assert "PeftModel" not in card.text and 'AutoModelForCausalLM.from_pretrained(".")' in card.text
        check_no_absolute_paths(str(card), tmp_path, lmtuner_home, tiny_model)
    assert "bnb-nf4 quantized model" in ModelCard.load(Path(quantized["model_card"])).text


def test_job_without_held_out_rows_says_it_was_not_measured(tmp_path, lmtuner_home, tiny_model):
    data = write_rows(tmp_path / "colours.jsonl")
    config = quick_config(tiny_model, data, max_steps=2)

    async def run():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            started = await call_ok(client, "start_training", {"config": config})
            return await wait_for_end(client, started["job_id"])

    final = anyio.run(run)
    assert final["status"] == "completed", final["error"]
    card = ModelCard.load(Path(final["output_dir"]) / "README.md")
    assert card.data.eval_results is None and "Not measured" in card.text
    check_no_absolute_paths(str(card), tmp_path, lmtuner_home, tiny_model)

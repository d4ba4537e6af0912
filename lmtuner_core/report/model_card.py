"""The README.md model card a completed job's output folder and every export carry, in the Hugging Face form: a
YAML header (base_model, library_name, tags, datasets, and the result report's scores as `model-index`) built with
huggingface_hub's ModelCardData, then how the model was trained, its evaluation, its limitations and how to run it
with transformers, vLLM and Ollama. The card holds no absolute path: local models and data are named by their file
or folder name, and commands use paths relative to the card's folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmtuner_core.jobs.run_folder import ARTIFACT_MARKER, read_json
from lmtuner_core.report.result import REPORT_FILE, ResultReport, read_report

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METRIC_NAMES = {"exact_match": "exact match", "json": "JSON match", "rouge_l": "ROUGE-L"}


def public_name(reference: str | None) -> str:
    """A hub id as it is; a local file or folder by its name only (the card is meant to be shared)."""
    if not reference:
        return "unknown"
    if HUB_ID.match(reference) and not Path(reference).exists():
        return reference
    from lmtuner_core.models.gguf_import import gguf_source

    source = gguf_source(reference)  # a folder converted from a .gguf: the file the user gave
    return Path(source or reference.rstrip("/")).name or "unknown"


def _dataset_names(config: dict[str, Any]) -> list[str]:
    names = []
    for key in ("dataset", "eval_dataset"):
        spec = config.get(key)
        if isinstance(spec, dict):
            spec = spec.get("path") or spec.get("name")
        if spec:
            names.append(public_name(str(spec)))
    return list(dict.fromkeys(names))


def card_data(config: dict[str, Any], report: ResultReport | None, name: str, library: str, extra_tags: list[str]):
    """The YAML header, as huggingface_hub's ModelCardData (its `eval_results` become the hub's `model-index`)."""
    from huggingface_hub import EvalResult, ModelCardData

    method, stage = config.get("method", "lora"), config.get("stage", "sft")
    tags = ["lmtuner", stage, method, *extra_tags, *(["lora"] if library == "peft" else [])]
    results = []
    datasets = _dataset_names(config)
    if report is not None and report.tuned is not None:
        held_out = datasets[-1] if datasets else "held-out rows"
        metric = METRIC_NAMES.get(report.metric, report.metric)
        for who, value in (("tuned", report.tuned), ("base", report.base)):
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=held_out,
                    dataset_name=f"{held_out} (held-out rows)",
                    metric_type=report.metric,
                    metric_value=value,
                    metric_name=f"{metric} ({who} model)",
                )
            )
        if report.retention is not None:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="lmtuner-probe",
                    dataset_name="lmtuner probe",
                    metric_type="forgetting",
                    metric_value=report.retention.forgetting,
                    metric_name="forgetting (share of the base's probe facts lost)",
                )
            )
    return ModelCardData(
        base_model=public_name(config.get("model")),
        library_name=library,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=datasets or None,
        model_name=name,
        eval_results=results or None,
    )


def _training_lines(config: dict[str, Any], job_seconds: float | None) -> list[str]:
    lines = [
        f"- Method: `{config.get('method')}`, stage `{config.get('stage', 'sft')}`, precision "
        f"`{config.get('precision', 'auto')}`.",
    ]
    length = f"{config['max_steps']} steps" if config.get("max_steps") else f"{config.get('num_epochs')} epochs"
    lines.append(
        f"- {length}, learning rate {config.get('learning_rate')}, batch {config.get('batch_size')} x "
        f"{config.get('gradient_accumulation_steps')} accumulation, rows cut at {config.get('max_seq_len')} tokens."
    )
    lora = config.get("lora")
    if lora and config.get("method") in ("lora", "dora", "qlora", "lora-8bit"):
        lines.append(f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, on {lora.get('target_modules')}.")
    if config.get("replay"):
        lines.append(f"- Replay: {config['replay'].get('share')} of the rows are the base model's own answers.")
    if job_seconds:
        lines.append(f"- Wall time: {job_seconds / 60:.1f} minutes.")
    lines.append(f"- Data: {', '.join(_dataset_names(config)) or 'unknown'}.")
    return lines


def _evaluation_lines(report: ResultReport | None) -> list[str]:
    if report is None:
        return ["Not measured: the job held out no rows, so there is no result report (set `eval_fraction`)."]
    metric = METRIC_NAMES.get(report.metric, report.metric)
    lines = [
        f"On {report.held_out_rows} held-out rows never trained on ({report.held_out_source}), {metric}: "
        f"base {report.base} -> tuned {report.tuned}. Verdict: **{report.verdict}**. {report.metric_reason}",
    ]
    if report.retention is not None:
        r = report.retention
        lines.append(
            f"General knowledge (lmtuner's probe of {r.questions} questions): the base knew {r.known}, the tuned "
            f"model kept {r.kept} (forgetting {r.forgetting:.0%})."
        )
    loss = report.held_out_loss
    if loss.base is not None and loss.best is not None:
        lines.append(f"Held-out loss: {loss.base:.3f} before training, best {loss.best:.3f} at step {loss.best_step}.")
    if report.advice:
        lines += ["", "Advice from the report:", *[f"- {advice}" for advice in report.advice]]
    return lines


def _limitations(config: dict[str, Any], report: ResultReport | None) -> list[str]:
    lines = [
        "- Fine-tuned on a small task-specific set: expect it to do that task, not to be better in general.",
        "- It inherits the base model's limitations and biases; check its answers before relying on them.",
    ]
    if report is not None and report.regressions:
        lines.append(f"- {len(report.regressions)} held-out rows the base answered right are now wrong.")
    if report is not None and report.retention is not None and report.retention.forgetting > 0.1:
        lines.append(f"- It lost {report.retention.forgetting:.0%} of the general facts the base model knew.")
    return lines


def _usage(base: str, adapter: bool, gguf_file: str | None, rank: int | None) -> list[str]:
    """How to run it, with paths relative to this folder."""
    note = (
        []
        if HUB_ID.match(base)
        else [f"`{base}` is the base model's local name: put its folder or hub id in its place.", ""]
    )
    if gguf_file:
        return [
            *note,
            "```bash",
            "ollama create my-model -f Modelfile && ollama run my-model",
            f"llama-cli -m {gguf_file} -cnv",
            f"vllm serve ./{gguf_file} --tokenizer {base}",
            "```",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{gguf_file}")',
            f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf_file}")',
            "```",
        ]
    load = (
        [
            "from peft import PeftModel",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), ".")',
        ]
        if adapter
        else ['model = AutoModelForCausalLM.from_pretrained(".")']
    )
    serve = (
        f"vllm serve {base} --enable-lora --lora-modules tuned=. --max-lora-rank {_vllm_rank(rank)}"
        if adapter
        else "vllm serve ."
    )
    return [
        *note,
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained(".")',
        *load,
        'messages = [{"role": "user", "content": "Hello"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
        "print(tokenizer.decode(model.generate(inputs, max_new_tokens=64)[0][inputs.shape[1]:]))",
        "```",
        "```bash",
        f"{serve}   # OpenAI-compatible API on port 8000",
        "```",
        "Ollama: export a GGUF first (`lmtuner export` or the `export_model` tool), then "
        "`ollama create my-model -f Modelfile` in the export folder.",
    ]


def _vllm_rank(rank: int | None) -> int:
    """vLLM's --max-lora-rank takes 1, 8, 16, 32, 64, ...: the smallest that holds the adapter's rank."""
    accepted = [1, 8, 16, 32, 64, 128, 256, 320, 512]
    return next((a for a in accepted if a >= (rank or 8)), accepted[-1])


def model_card(
    config: dict[str, Any],
    report: ResultReport | None,
    *,
    adapter: bool,
    job_seconds: float | None = None,
    gguf_file: str | None = None,
    name: str | None = None,
    what: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """The card's text. `gguf_file`: the file name of an export (the card then describes that file); `what`: what the
    folder holds when it is derived from the trained model otherwise (merged, quantized), with its `tags`."""
    from huggingface_hub import ModelCard

    base = public_name(config.get("model"))
    name = name or f"{base.split('/')[-1]}-{config.get('method', 'tuned')}"
    library = "transformers" if gguf_file or what or not adapter else "peft"
    data = card_data(config, report, name, library, (["gguf"] if gguf_file else []) + list(tags or []))
    loads_as_adapter = adapter and not gguf_file and not what  # else the folder holds a whole model
    what = what or (f"the GGUF file `{gguf_file}`" if gguf_file else ("a LoRA adapter" if adapter else "a full model"))
    body = [
        f"# {name}",
        "",
        f"{what[0].upper() + what[1:]} fine-tuned from `{base}` with lmtuner ({config.get('stage', 'sft').upper()}).",
        "",
        "## How it was trained",
        "",
        *_training_lines(config, job_seconds),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(report),
        *(
            [
                "",
                "These scores were measured on the fine-tuned model before it became this folder's "
                f"{'file' if gguf_file else 'model'}; its own answers may differ slightly.",
            ]
            if report is not None and (gguf_file or what)
            else []
        ),
        "",
        "## Limitations",
        "",
        *_limitations(config, report),
        "",
        "## How to use",
        "",
        *_usage(base, loads_as_adapter, gguf_file, (config.get("lora") or {}).get("r")),
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def write_model_card(folder: Path, text: str) -> Path:
    path = folder / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path


def export_card(
    output: Path,
    model: str,
    adapter: Path | None,
    gguf_file: str | None = None,
    *,
    what: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Writes the card of a model derived from a trained one (a GGUF export, a merged or a quantized folder) into its
    folder: the training job's config and report when the adapter (or the full model) was trained by lmtuner (its
    marker names the run folder), else the base model alone."""
    trained = adapter if adapter is not None else Path(model)
    marker = read_json(trained / ARTIFACT_MARKER) if trained.is_dir() else None
    config: dict[str, Any] = {}
    report = None
    run_dir = (marker or {}).get("job_run_dir")
    if run_dir and Path(run_dir, "config.json").is_file():
        config = read_json(Path(run_dir) / "config.json") or {}
        report = read_report(Path(run_dir)) if Path(run_dir, REPORT_FILE).is_file() else None
    if not config:  # not trained here: describe the export of the model as it is
        config = {"model": model, "method": "none", "stage": "export"}
    name = Path(gguf_file).stem if gguf_file else output.name
    shown_file = Path(gguf_file).name if gguf_file else None
    adapted = adapter is not None
    text = model_card(config, report, adapter=adapted, gguf_file=shown_file, name=name, what=what, tags=tags)
    return write_model_card(output, text)

"""quantize: shrink a model (optionally with a LoRA-family adapter merged in first) for serving or sharing.

Methods:
- `bnb-nf4`: 4-bit NormalFloat with double quantization through transformers' BitsAndBytesConfig, saved with
  `save_pretrained` (reloads with transformers + bitsandbytes; runs on CPU with bitsandbytes ≥ 0.45). Compute
  dtype float32 on CPU, bfloat16 on a GPU that supports it (else float16).
- `bnb-int8`: LLM.int8() through the same path.
- `gptq-w4a16`: GPTQ with 4-bit symmetric integer weights in groups, 16-bit activations, saved in vLLM's
  compressed-tensors format (`pack-quantized`), the form `vllm serve DIR` loads directly.

Why llm-compressor, and why in its own interpreter. Checked 2026-11-29 against our stack (transformers 5.24,
torch 2.13.0+cpu): no llm-compressor release installs next to transformers 5.24 (0.14.0.1 pins transformers
≤ 5.17 and compressed-tensors 0.19.0; older ones pin older transformers), and vLLM's CPU wheel pins
compressed-tensors 0.17.0, so it does not fit the vLLM venv either. GPTQModel 7.7 needs torch ≥ 2.14.1 and
7.0-7.6 pin numpy 2.2.6 (a downgrade of the main venv) and build from source. llm-compressor 0.14.0.1 in a venv
of its own installs from wheels only (torch 2.13.0+cpu, transformers 5.17) and runs GPTQ on CPU; it is vLLM's
own project and writes compressed-tensors, vLLM's native quantized format. So the GPTQ step runs as a child
process in that interpreter (`make gptq-venv`; `LMTUNER_GPTQ_PYTHON` points at it), which also keeps the
calibration memory out of the server. The child gets only `_gptq_child` below (self-contained, standard library
and that venv's packages), never lmtuner itself, whose pins it does not share.

Group size: GPTQ groups split each Linear layer's input features, so the group size must divide every quantized
layer's in-features (compressed-tensors and vLLM's kernels refuse a remainder). 128 is the usual choice; a
small model (the tiny test model has hidden size 128 but other widths appear) gets the largest of 128/64/32
that divides all of them, unless the caller names one.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.models.export import folder_size
from lmtuner_core.reporting import ProgressFn

Method = Literal["bnb-nf4", "bnb-int8", "gptq-w4a16"]
METHODS: tuple[str, ...] = ("bnb-nf4", "bnb-int8", "gptq-w4a16")
GROUP_SIZES = (128, 64, 32)
GPTQ_PYTHON_ENV = "LMTUNER_GPTQ_PYTHON"
DEFAULT_GPTQ_VENV = Path.home() / ".cache" / "lmtuner" / "gptq-venv"
GPTQ_INSTALL_HINT = (
    "run `make gptq-venv` in the lmtuner checkout (a separate venv with llmcompressor==0.14.0.1, ~1.5 min), "
    f"or set {GPTQ_PYTHON_ENV} to a python that has llmcompressor installed"
)

# Hand-written, not from a library: a small, varied English sample for GPTQ calibration when the caller gives
# no dataset. Real rows from the user's own data calibrate better; this keeps the method usable without any.
BUILTIN_CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Question: What is 3 plus 4?\nAnswer: 3 plus 4 is 7.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise, then bake it for forty minutes.",
    "The patient reported a mild headache and a fever of 38 degrees; the doctor advised rest and fluids.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 9))",
    "In 1969 two astronauts walked on the Moon while a third orbited above them in the command module.",
    "Please summarize the following paragraph in one sentence for a busy reader.",
    "Water boils at 100 degrees Celsius at sea level, and at a lower temperature on a high mountain.",
    "User: Can you recommend a good book?\nAssistant: If you like mysteries, try a classic detective novel.",
    "The committee will meet on Tuesday to review the budget, the schedule and the list of open risks.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "Translate to French: The weather is nice today.\nLe temps est beau aujourd'hui.",
    "A train leaves the station at nine and travels at sixty miles per hour; when does it arrive 150 miles away?",
    "Remember to back up your files before you upgrade the operating system.",
    "The museum opens at ten, closes at six, and is free for children under twelve.",
    "Explain why the sky is blue: sunlight scatters off air molecules, and blue light scatters the most.",
)


class QuantizeResult(BaseModel):
    output_dir: str = Field(
        description="The quantized model folder (config.json with quantization_config, weights, tokenizer)."
    )
    method: str = Field(description="The method used: bnb-nf4, bnb-int8 or gptq-w4a16.")
    size_bytes: int = Field(description="Total size of the files written to output_dir.")
    source_size_bytes: int = Field(
        description="Size of the full-precision source (the merged model when an adapter was given): its top-level "
        "files (weights, config, tokenizer)."
    )
    ratio: float = Field(description="size_bytes / source_size_bytes; e.g. 0.3 means the output is 30% of the source.")
    seconds: float = Field(description="Wall time of the whole call, merging included.")
    format: str = Field(description="How the weights are stored: 'bitsandbytes' or 'compressed-tensors'.")
    loads_with: str = Field(description="What can load the output folder.")
    merged_adapter: str | None = Field(None, description="The adapter merged into the base before quantizing.")
    group_size: int | None = Field(None, description="gptq-w4a16: input features per quantization group.")
    calibration_samples: int | None = Field(
        None, description="gptq-w4a16: how many calibration texts GPTQ saw (from `dataset`, else a built-in sample)."
    )
    calibration_source: str | None = Field(None, description="gptq-w4a16: where the calibration texts came from.")
    model_card: str | None = Field(
        None, description="README.md in output_dir: the Hugging Face model card (training, evaluation, how to run it)."
    )


def _top_level_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def source_size(model_ref: str) -> int:
    """Bytes of a model's top-level files: a local folder, or a hub id's cached snapshot (0 if not cached)."""
    local = Path(model_ref).expanduser()
    if local.is_dir():
        return _top_level_size(local)
    try:
        from huggingface_hub import snapshot_download

        return _top_level_size(Path(snapshot_download(model_ref, local_files_only=True)))
    except Exception:  # not in the cache: the size is unknown rather than a guess
        return 0


def gptq_python() -> str:
    """The interpreter that runs the GPTQ step: $LMTUNER_GPTQ_PYTHON, else `make gptq-venv`'s, else this one if it
    has llmcompressor. Raises LmtunerError saying what to install when none is found."""
    configured = os.environ.get(GPTQ_PYTHON_ENV)
    if configured:
        if not Path(configured).is_file():
            raise LmtunerError(f"method: {GPTQ_PYTHON_ENV}={configured} does not exist; {GPTQ_INSTALL_HINT}")
        return configured
    default = DEFAULT_GPTQ_VENV / "bin" / "python"
    if default.is_file():
        return str(default)
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    raise LmtunerError(f"method: gptq-w4a16 needs llm-compressor, which is not installed; {GPTQ_INSTALL_HINT}")


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and group_size not in GROUP_SIZES:
        raise LmtunerError(
            f"group_size: {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))} or leave it "
            "out to pick the largest that divides every layer",
            field="group_size",
        )


def layer_widths(model_dir: str) -> list[int] | None:
    """The input widths of a decoder's Linear layers (attention output, MLP down projection, the rest take the
    hidden size) from config.json alone, or None when the config is not a plain decoder's."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return sorted({hidden, heads * head_dim, int(config["intermediate_size"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pick_group_size(model_dir: str, requested: int | None) -> int | None:
    """The requested group size, or the largest of 128/64/32 dividing every layer's input width; None leaves the
    choice to the GPTQ child (which sees the real modules) when config.json does not tell. Raises LmtunerError
    when the requested size does not fit."""
    widths = layer_widths(model_dir)
    if widths is None:
        return requested
    fitting = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    if (requested is not None and requested not in fitting) or not fitting:
        raise LmtunerError(
            f"group_size: {requested or 'none of 128/64/32'} does not divide every layer's input features "
            f"({', '.join(map(str, widths))}), so groups would straddle rows; "
            + (f"use {' or '.join(map(str, fitting))}" if fitting else "this model cannot use gptq-w4a16"),
            field="group_size",
        )
    return requested or fitting[0]


def quantize(
    model_ref: str,
    method: str,
    output_dir: Path,
    *,
    adapter: Path | None = None,
    calibration_texts: list[str] | None = None,
    calibration_source: str | None = None,
    group_size: int | None = None,
    max_seq_len: int = 512,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> QuantizeResult:
    """Merges `adapter` into the base when given, quantizes with `method`, writes output_dir (which must be new or
    empty) with the tokenizer, and reports sizes before and after."""
    started = time.monotonic()
    if method not in METHODS:
        raise LmtunerError(f"method: {shown(method)} is not supported; use one of {', '.join(METHODS)}", field="method")
    check_group_size(group_size)
    if method != "gptq-w4a16" and (calibration_texts is not None or group_size is not None):
        raise LmtunerError(
            f"dataset/group_size: only gptq-w4a16 uses calibration data and groups; {method} takes neither",
            field="dataset" if calibration_texts is not None else "group_size",
        )
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise LmtunerError(f"output_dir: {output_dir} already exists and is not empty; choose a new or empty folder",
                           field="output_dir")  # fmt: skip
    python = None
    if method == "gptq-w4a16":  # refuse before any slow work
        group_size = pick_group_size(model_ref, group_size)
        python = gptq_python()
    steps = 3 + (adapter is not None)

    def report(step: int, message: str) -> None:
        if progress:
            progress(step, steps, message)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lmtuner-quantize-", dir=output_dir.parent) as scratch:
        source = model_ref
        if adapter is not None:
            from lmtuner_core.models.export import merge_adapter

            report(0, f"merging adapter {adapter.name} into {model_ref}")
            source = merge_adapter(
                model_ref, adapter, Path(scratch) / "merged", trust_remote_code=trust_remote_code
            ).output_dir
        step = int(adapter is not None)
        try:
            if method == "gptq-w4a16":
                texts = calibration_texts or list(BUILTIN_CALIBRATION_TEXTS)
                details = _run_gptq(python or sys.executable, source, output_dir, texts, group_size, max_seq_len,
                                    Path(scratch), lambda message: report(step + 1, message),
                                    trust_remote_code)  # fmt: skip
                extra = {
                    "format": "compressed-tensors",
                    "loads_with": "vLLM; transformers + compressed-tensors (generate, evaluate)",
                    "group_size": details["group_size"],
                    "calibration_samples": details["samples"],
                    "calibration_source": calibration_source or "built-in sample texts",
                }
            else:
                report(step + 1, f"loading {source} with bitsandbytes {method.removeprefix('bnb-')}")
                _run_bnb(source, method, output_dir, trust_remote_code)
                extra = {"format": "bitsandbytes", "loads_with": "transformers + bitsandbytes (CPU or GPU)"}
            report(step + 2, "saving the tokenizer")
            _save_tokenizer(source, output_dir, trust_remote_code)
        except BaseException:
            if output_dir.exists():  # a half-written folder would look like a model
                shutil.rmtree(output_dir, ignore_errors=True)
            raise
        original = source_size(source)
    size = folder_size(output_dir)
    report(steps, f"done: {size / 2**20:.1f} MiB, {size / original:.0%} of the source" if original else "done")
    return QuantizeResult(
        output_dir=str(output_dir),
        method=method,
        size_bytes=size,
        source_size_bytes=original,
        ratio=round(size / original, 4) if original else 0.0,
        seconds=round(time.monotonic() - started, 2),
        merged_adapter=str(adapter) if adapter is not None else None,
        **extra,
    )


def _save_tokenizer(source: str, output_dir: Path, trust_remote_code: bool = False) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(str(output_dir))


def _run_bnb(source: str, method: str, output_dir: Path, trust_remote_code: bool = False) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    transformers.utils.logging.disable_progress_bar()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LmtunerError(
            f"method: {method} needs bitsandbytes; install it with `pip install 'bitsandbytes>=0.45'` "
            "(or `pip install -e '.[train]'`)",
            field="method",
        ) from None
    if torch.cuda.is_available():
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        device_map: dict[str, int] | str = {"": 0}
    else:  # bitsandbytes' CPU kernels compute in float32
        compute, device_map = torch.float32, "cpu"
    if method == "bnb-nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map=device_map, dtype=compute, trust_remote_code=trust_remote_code
    )
    model.save_pretrained(str(output_dir))


def _run_gptq(
    python: str,
    source: str,
    output_dir: Path,
    texts: list[str],
    group_size: int | None,
    max_seq_len: int,
    scratch: Path,
    report: Callable[[str], None],
    trust_remote_code: bool = False,
) -> dict:
    """Runs `_gptq_child` in `python`; returns its final record ({group_size, samples})."""
    job = scratch / "gptq-job.json"
    job.write_text(
        json.dumps({"model": source, "output_dir": str(output_dir), "texts": texts, "group_size": group_size,
                    "max_seq_len": max_seq_len, "trust_remote_code": trust_remote_code}),
        encoding="utf-8",
    )  # fmt: skip
    log = scratch / "gptq.log"
    code = inspect.getsource(_gptq_child) + "\n_gptq_child()\n"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the child has its own pins; nothing of ours may shadow them
    final: dict = {}
    with log.open("wb") as stderr:
        # -I: isolated mode (no user site, no PYTHONPATH, no cwd on sys.path). Argument list, never a shell.
        proc = subprocess.Popen(
            [python, "-I", "-c", code, str(job)], stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=scratch
        )  # cwd: any stray log folder lands in the scratch dir, not the server's working directory
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue  # a library printing to stdout; only our JSON objects matter
                if "progress" in record:
                    report(record["progress"])
                final = record
        except BaseException:  # the caller went away (cancelled call, failed progress report): stop the child too
            proc.kill()
            proc.wait()
            raise
        code_ = proc.wait()
    if "error" in final:
        raise LmtunerError(final["error"], field=final.get("field"))
    if code_ != 0 or "group_size" not in final:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise LmtunerError(
            f"gptq-w4a16 failed in {python} (exit code {code_}); last lines of its log:\n" + "\n".join(tail)
        )
    return final


def _gptq_child() -> None:  # pragma: no cover - runs in the llm-compressor interpreter, see the module docstring
    """GPTQ W4A16 with llm-compressor: reads the job file named in argv[1], prints JSON lines on stdout."""
    import json
    import sys
    from pathlib import Path

    def say(**record) -> None:
        print(json.dumps(record), flush=True)

    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    say(progress="loading the model and llm-compressor")
    import torch
    from compressed_tensors.quantization import preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = {"trust_remote_code": job.get("trust_remote_code", False)}
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto", **trust)
    tokenizer = AutoTokenizer.from_pretrained(job["model"], **trust)
    widths = sorted({m.in_features for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")})  # fmt: skip
    fitting = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)]
    group_size = job["group_size"] or (fitting[0] if fitting else None)
    if group_size is None or group_size not in fitting:
        say(
            error=f"group_size: {job['group_size'] or '128/64/32'} does not divide every layer's input features "
            f"({', '.join(map(str, widths))}); " + (f"use {' or '.join(map(str, fitting))}" if fitting else
                                                   "this model cannot be quantized with gptq-w4a16"),
            field="group_size",
        )  # fmt: skip
        sys.exit(3)
    encoded = [
        tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"), truncation=True,
                  max_length=job["max_seq_len"])
        for text in job["texts"]
    ]  # fmt: skip
    encoded = [e for e in encoded if len(e["input_ids"]) > 0]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in encoded],
                                 "attention_mask": [e["attention_mask"] for e in encoded]})  # fmt: skip
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = group_size
    say(progress=f"GPTQ on {len(encoded)} calibration samples, group size {group_size}")
    oneshot(
        model=model,
        dataset=dataset,
        recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        num_calibration_samples=len(encoded),
        max_seq_length=job["max_seq_len"],
        shuffle_calibration_samples=False,
    )
    say(progress="saving in compressed-tensors format")
    model.save_pretrained(job["output_dir"], save_compressed=True)
    say(group_size=group_size, samples=len(encoded))

"""export_model: a model (with an adapter merged in) as one GGUF file for llama.cpp, Ollama and LM Studio.

The GGUF is written by llama.cpp's own converter, `convert_hf_to_gguf.py` with its bundled gguf-py, run as a
subprocess from the llama-cpp-python source distribution (`make llamacpp-src`; LMTUNER_LLAMACPP_DIR overrides).
K-quants come from llama.cpp's C quantizer, `llama_model_quantize`, in the compiled llama-cpp-python venv
(`make llamacpp-venv`; LMTUNER_LLAMACPP_PYTHON overrides). Beside the file goes an Ollama Modelfile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError
from lmtuner_core.models.code_guard import REFUSAL
from lmtuner_core.reporting import ProgressFn

logger = logging.getLogger(__name__)

LLAMACPP_VERSION = "0.3.36"
LLAMACPP_DIR_ENV = "LMTUNER_LLAMACPP_DIR"
LLAMACPP_PYTHON_ENV = "LMTUNER_LLAMACPP_PYTHON"
DEFAULT_LLAMACPP_DIR = (
    Path.home() / ".cache/lmtuner/llamacpp-src" / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor/llama.cpp"
)
DEFAULT_LLAMACPP_PYTHON = Path.home() / ".cache/lmtuner/llamacpp-venv/bin/python"
# What the converter writes by itself, and what llama.cpp's quantizer makes from its f16 output.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
QUANTIZATIONS = (*CONVERTER_TYPES, *QUANTIZER_TYPES)
STEP_TIMEOUT_SECONDS = 3600


class ExportResult(BaseModel):
    gguf_file: str = Field(description="The written .gguf file (weights, tokenizer and chat template inside).")
    size_bytes: int = Field(description="Size of the .gguf file.")
    quantization: str = Field(description="The weight type: f16, bf16, q8_0 or q4_k_m.")
    modelfile: str = Field(description="The Ollama Modelfile beside it (FROM, TEMPLATE, stop parameters).")
    architecture: str = Field(description="The Hugging Face architecture converted. Example: 'LlamaForCausalLM'.")
    model: str = Field(description="The model folder exported (the base, when an adapter was merged in).")
    adapter: str | None = Field(None, description="The adapter merged in first, if any.")
    seconds: float = Field(description="Wall time of the export.")
    run_commands: dict[str, str] = Field(
        description="How to run it: {'ollama': ..., 'llama.cpp': ...}, to show the user."
    )
    model_card: str | None = Field(
        None, description="README.md beside it: the Hugging Face model card (training, evaluation, how to run it)."
    )


def converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, or an error saying how to get it."""
    configured = os.environ.get(LLAMACPP_DIR_ENV)
    script = Path(configured or DEFAULT_LLAMACPP_DIR) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LmtunerError(
            f"export_model needs llama.cpp's converter, not found at {script}: run `make llamacpp-src` (unpacks it "
            f"from the llama-cpp-python {LLAMACPP_VERSION} source distribution), or set {LLAMACPP_DIR_ENV} to a "
            "llama.cpp checkout"
        )
    return script


def llamacpp_python() -> str:
    """A python with llama-cpp-python (compiled llama.cpp), or an error saying how to get one."""
    python = os.environ.get(LLAMACPP_PYTHON_ENV) or str(DEFAULT_LLAMACPP_PYTHON)
    if not Path(python).is_file():
        raise LmtunerError(
            f"quantization: q4_k_m comes from llama.cpp's quantizer, which needs llama-cpp-python at {python}: run "
            f"`make llamacpp-venv` (compiles llama.cpp, ≈15 min on 2 cores) or set {LLAMACPP_PYTHON_ENV} to a python "
            "that has it; or use q8_0 or f16, which need only the converter",
            field="quantization",
        )
    return python


def export_model(
    model_ref: str,
    output_dir: Path,
    quantization: str,
    adapter: Path | None = None,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Merges the adapter (if any), converts with llama.cpp's converter, K-quantizes if asked, writes the
    Modelfile. Returns what was written and how to run it."""
    from lmtuner_core.models.export import merge_adapter

    started = time.monotonic()
    if quantization not in QUANTIZATIONS:
        raise LmtunerError(
            f"quantization: {quantization!r} is not offered; use one of {', '.join(QUANTIZATIONS)}",
            field="quantization",
        )
    if output_dir.exists() and any(output_dir.iterdir()):
        raise LmtunerError(f"output_dir: {output_dir} already holds files; choose an empty or new folder")
    model_ref = local_model_folder(model_ref)
    script = converter_script()
    quantizer = llamacpp_python() if quantization in QUANTIZER_TYPES else None
    architecture = model_architecture(Path(model_ref))
    steps = 2 + (adapter is not None) + (quantizer is not None)
    done = 0

    def report(message: str) -> None:
        nonlocal done
        if progress:
            progress(done, steps, message)
        done += 1

    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=output_dir))
    try:
        source = Path(model_ref)
        if adapter is not None:
            report("merging the adapter into the base")
            source = Path(merge_adapter(model_ref, adapter, scratch / "merged").output_dir)
        name = ollama_name(output_dir.name)
        gguf_file = output_dir / f"{name}-{quantization}.gguf"
        report("converting with llama.cpp's convert_hf_to_gguf.py")
        converted = scratch / "model-f16.gguf" if quantizer else scratch / gguf_file.name
        outtype = "f16" if quantizer else quantization
        run_converter(script, source, converted, outtype, architecture, trust_remote_code=trust_remote_code)
        if quantizer:
            report(f"quantizing to {quantization} with llama.cpp")
            run_quantizer(quantizer, converted, scratch / gguf_file.name, QUANTIZER_TYPES[quantization])
        os.replace(scratch / gguf_file.name, gguf_file)
        report("writing the Ollama Modelfile")
        modelfile = output_dir / "Modelfile"
        modelfile.write_text(ollama_modelfile(source, gguf_file.name), encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report("done")
    return ExportResult(
        gguf_file=str(gguf_file),
        size_bytes=gguf_file.stat().st_size,
        quantization=quantization,
        modelfile=str(modelfile),
        architecture=architecture,
        model=model_ref,
        adapter=str(adapter) if adapter else None,
        seconds=round(time.monotonic() - started, 1),
        run_commands=run_commands(output_dir, gguf_file, name),
    )


def run_commands(output_dir: Path, gguf_file: Path, name: str) -> dict[str, str]:
    """Shell commands to show the user: every path quoted (a folder may be named `a;touch X`)."""
    folder, model, name = shlex.quote(str(output_dir)), shlex.quote(str(gguf_file)), shlex.quote(name)
    return {
        "ollama": f"cd {folder} && ollama create {name} -f Modelfile && ollama run {name}",
        "llama.cpp": f"llama-cli -m {model} -cnv",
        "llama-cpp-python": f"python -m llama_cpp.server --model {model}",
    }


def local_model_folder(model_ref: str) -> str:
    """The folder of a local model, or of a hub id's snapshot in the Hugging Face cache (the converter reads files)."""
    if Path(model_ref).is_dir():
        return model_ref
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model_ref, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise LmtunerError(
            f"model: {model_ref!r} is not in the Hugging Face cache; export_model converts local files: download it "
            "first (`hf download MODEL`), or give a local model folder or a .gguf file",
            field="model",
        ) from None


def model_architecture(model_dir: Path) -> str:
    """The folder's architecture, from config.json. (Whether its own code may run was decided by check_model_code
    when the tool resolved the folder; run_converter enforces it in the child as well.)"""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LmtunerError(f"model: {model_dir}/config.json is not readable ({exc})", field="model") from None
    return str((config.get("architectures") or ["unknown"])[0])


def run_converter(
    script: Path, model_dir: Path, outfile: Path, outtype: str, architecture: str, *, trust_remote_code: bool = False
) -> None:
    """llama.cpp's convert_hf_to_gguf.py in our interpreter (it needs torch, transformers and sentencepiece);
    it puts its bundled gguf-py ahead of any installed gguf by itself. Without trust_remote_code it runs under
    code_guard: the converter asks transformers for some tokenizers with trust_remote_code=True, whatever we say."""
    guard = [] if trust_remote_code else ["-m", "lmtuner_core.models.code_guard", "--deny", str(model_dir), "--"]
    command = [sys.executable, *guard, str(script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    proc = _run(command, "llama.cpp's converter")
    if proc.returncode == 0 and outfile.is_file():
        return
    if REFUSAL in proc.stderr:
        logger.warning("llama.cpp's converter stopped by code_guard:\n%s", _tail(proc.stderr))
        raise LmtunerError(
            f"trust_remote_code: converting {model_dir} would run code shipped with the model (llama.cpp's converter "
            "loads this tokenizer with its own code); nothing of it was run. If you trust its author, call "
            "export_model again with trust_remote_code: true",
            field="trust_remote_code",
        )
    if "is not supported" in proc.stderr:
        supported = _run([sys.executable, str(script), "--print-supported-models"], "llama.cpp's converter")
        text_models = supported.stderr.partition("TEXT models:")[2].partition("MMPROJ models:")[0]
        names = re.findall(r"-\s+(\S+)", text_models)
        raise LmtunerError(
            f"model: llama.cpp's converter cannot map the architecture {architecture}; it converts "
            f"{', '.join(names) or 'other architectures'}",
            field="model",
        )
    if "pre-tokenizer was not recognized" in proc.stderr:
        raise LmtunerError(
            "model: llama.cpp's converter does not know this model's BPE pre-tokenizer (it recognises the "
            "tokenizers of published model families by a hash); a model fine-tuned from a published base converts, "
            "one with a tokenizer of its own needs llama.cpp's convert_hf_to_gguf_update.py first",
            field="model",
        )
    raise _failed("llama.cpp's converter", proc)


def run_quantizer(python: str, source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's llama_model_quantize through llama-cpp-python's ctypes binding, in its own venv."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "params = llama_cpp.llama_model_quantize_default_params()\n"
        f"params.ftype = llama_cpp.{ftype}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))\n"
    )
    proc = _run([python, "-I", "-c", code, str(source), str(target)], "llama.cpp's quantizer")
    if proc.returncode != 0 or not target.is_file():
        raise _failed("llama.cpp's quantizer", proc)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise LmtunerError(f"{what} did not finish in {STEP_TIMEOUT_SECONDS} s") from None


def _failed(what: str, proc: subprocess.CompletedProcess) -> LmtunerError:
    """The error for a failed step: its output (library paths, tracebacks) goes to server.log, not to the caller."""
    logger.warning("%s failed (exit code %s):\n%s", what, proc.returncode, _tail(proc.stderr, 40))
    return LmtunerError(f"{what} failed (exit code {proc.returncode}); its output is in server.log")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ollama_name(text: str) -> str:
    """A model name Ollama accepts (lower case letters, digits, '-', '_', '.')."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


# Markers rendered through the model's own chat template to find the text around each part of a turn.
SYSTEM, PROMPT, RESPONSE = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01RESPONSE\x01"


def ollama_modelfile(model_dir: Path, gguf_name: str) -> str:
    """FROM, TEMPLATE and stop parameters for Ollama. No library translates a Jinja chat template into Ollama's
    Go template, so this one is derived by hand: the model's own template is rendered with marker strings for
    the system prompt, the user's prompt and the answer, and the text between them becomes the Go template's
    literal text (with the template's default system prompt when the user gives none)."""
    from transformers import AutoTokenizer

    from lmtuner_core.data.template_bounds import bound_chat_templates

    bound_chat_templates()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lines = [f"FROM ./{gguf_name}"]
    if not tokenizer.chat_template:
        return "\n".join(lines) + "\n"

    # A tokenizer that adds BOS when encoding gets it from llama.cpp and Ollama too: the template must not repeat it.
    ids = tokenizer("x").input_ids
    added_bos = tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else None

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text.removeprefix(added_bos) if added_bos else text

    turn = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    plain = render(turn)
    prompt_at, response_at = plain.index(PROMPT), plain.index(RESPONSE)
    without_system = _go_text(plain[:prompt_at])
    after_prompt = _go_text(plain[prompt_at + len(PROMPT) : response_at])
    after_response = plain[response_at + len(RESPONSE) :]
    try:
        with_system = render([{"role": "system", "content": SYSTEM}, *turn])
    except Exception:  # a template that refuses system messages
        with_system = ""
    if SYSTEM in with_system and PROMPT in with_system:
        system_at, prompt_at = with_system.index(SYSTEM), with_system.index(PROMPT)
        head = (
            f"{{{{ if .System }}}}{_go_text(with_system[:system_at])}{{{{ .System }}}}"
            f"{_go_text(with_system[system_at + len(SYSTEM) : prompt_at])}{{{{ else }}}}{without_system}{{{{ end }}}}"
        )
    else:
        head = without_system
    template = f"{head}{{{{ .Prompt }}}}{after_prompt}{{{{ .Response }}}}{_go_text(after_response)}"
    lines.append(f'TEMPLATE """{template}"""')
    stops = [after_response.strip(), tokenizer.eos_token]
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def _go_text(text: str) -> str:
    """Literal text inside a Go template in a Modelfile's TEMPLATE block (between triple quotes): '{{' starts an
    action, and a double quote could close the block (a chat template printing three quotes, a newline and
    SYSTEM would write directives of its own into the Modelfile). Each becomes an action printing it, so no quote
    is left in the literal text."""
    return re.sub(r'\{\{|"', lambda m: '{{ "{{" }}' if m.group() == "{{" else '{{ "\\"" }}', text)

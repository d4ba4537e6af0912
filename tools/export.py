"""export_model: a model or a fine-tuned adapter as a GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmtuner_core.models.gguf_export import ExportResult
from lmtuner_core.models.gguf_export import export_model as run_export
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.report.model_card import export_card
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext


def export_model(
    ctx: ToolContext,
    model: Annotated[
        str,
        Field(description="Base model: local folder, .gguf file or cached hub id. Example: './models/tiny'."),
    ],
    output_dir: Annotated[
        str, Field(description="A new or empty folder for the .gguf file and its Modelfile. Example: 'export'.")
    ],
    adapter: Annotated[
        str | None, Field(description="A trained adapter folder (a job's output_dir), merged into the base first.")
    ] = None,
    format: Annotated[Literal["gguf"], Field(description="The file format. Only 'gguf' for now.")] = "gguf",
    quantization: Annotated[
        Literal["f16", "bf16", "q8_0", "q4_k_m"],
        Field(
            description="Weight type: 'f16' (exact, largest), 'bf16', 'q8_0' (about half of f16, near lossless), "
            "'q4_k_m' (about a third of f16; what most Ollama users pull)."
        ),
    ] = "q8_0",
    trust_remote_code: Annotated[
        bool, Field(description="Allow a model that ships its own Python code to run it during the conversion.")
    ] = False,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Export a model, with a fine-tuned adapter merged in, as one GGUF file (weights, tokenizer and chat
    template) for llama.cpp, Ollama and LM Studio, written by llama.cpp's own converter and quantizer, plus an
    Ollama Modelfile and a README.md model card beside it. Returns the paths, the size and the commands to run
    it: show those to the user."""
    adapter_path = ctx.adapter_folder(adapter, trust_remote_code) if adapter else None
    output = ctx.output_folder(output_dir)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    result = run_export(
        model_ref, output, quantization, adapter=adapter_path, trust_remote_code=trust_remote_code, progress=progress
    )
    result.model_card = str(export_card(output, model_ref, adapter_path, result.gguf_file))
    return result

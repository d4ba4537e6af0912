"""analyze_dataset: look at the data before training on it."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lmtuner_core.config import DatasetSpec, dataset_spec
from lmtuner_core.data.analysis import DatasetAnalysis
from lmtuner_core.data.analysis import analyze_dataset as analyze
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext


def analyze_dataset(
    ctx: ToolContext,
    dataset: Annotated[
        str | DatasetSpec,
        Field(
            description="A data file path, a dataset_info.json entry name, or a dataset object as in TrainConfig. "
            "Example: 'data/train.jsonl'."
        ),
    ],
    model: Annotated[
        str | None,
        Field(
            description="Model whose tokenizer and chat template count the tokens (exact). Without it, lengths "
            "are estimated from characters. Example: 'Qwen/Qwen2.5-0.5B-Instruct'."
        ),
    ] = None,
    progress: ProgressFn | None = None,
) -> DatasetAnalysis:
    """Read a dataset the way training would and report: rows, detected format, token lengths (p50/p95/max, with
    the model's chat template), how many rows each max_seq_len would cut, the share of tokens that are trained
    on, malformed and duplicate rows, and problems in plain sentences. Use it to pick max_seq_len (about p95)
    and to catch data errors before spending GPU time."""
    spec = dataset_spec(dataset)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=None) if model else None  # the tokenizer only
    return analyze(spec, ctx.roots, model_ref, progress)

"""evaluate: score a model (or adapter, or a file of existing predictions) against reference answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from lmtuner_core.config import DatasetSpec, dataset_spec
from lmtuner_core.data.datasets import iter_rows, load_examples
from lmtuner_core.data.preference import data_shape
from lmtuner_core.errors import LmtunerError, remote_code_explained, shown
from lmtuner_core.graders.specs import GraderList
from lmtuner_core.models.inference import generate as run_generation
from lmtuner_core.models.metrics import Scores, score
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.reporting import ProgressFn
from tools.context import ToolContext, TrustRemoteCode

MetricName = Literal["bleu_2", "bleu_4", "meteor", "nist_2", "nist_4", "rouge_l"]
PREDICTION_KEYS = ("prediction", "predict", "output", "text")  # ours, LLaMA-Factory's, LMTuner's, plain


class Sample(BaseModel):
    prompt: str
    reference: str
    prediction: str
    grader_score: float | None = Field(None, description="With graders: this answer's weighted grader score, 0-1.")


class GradedScores(Scores):
    """Scores, and with graders the graders' mean score. Rows without reference answers (prompts only) have no
    BLEU/ROUGE/…: those are then null."""

    bleu_2: float | None = Field(description="Corpus BLEU with 1-2-grams, 0-100 (sacrebleu); null without references.")
    bleu_4: float | None = Field(description="Corpus BLEU with 1-4-grams, 0-100 (sacrebleu); null without references.")
    meteor: float | None = Field(description="Mean sentence METEOR, 0-1; null without references.")
    nist_2: float | None = Field(description="Corpus NIST with 1-2-grams; null without references.")
    nist_4: float | None = Field(description="Corpus NIST with 1-4-grams; null without references.")
    rouge_l: float | None = Field(description="Mean ROUGE-L F1, 0-1; null without references.")
    grader_score: float | None = Field(
        None, description="With graders: the mean over the rows of each answer's weighted grader score, 0-1."
    )
    grader_means: list[float] | None = Field(
        None, description="With graders: each grader's mean score over the rows, in the order given."
    )


class EvaluateResult(GradedScores):
    base: GradedScores | None = Field(None, description="The base model's scores on the same rows (compare_base).")
    preference_accuracy: float | None = Field(
        None,
        description="For preference pairs (prompt/chosen/rejected): share of the pairs on which the model prefers "
        "the chosen answer, by the summed log-probability of the answer given the prompt (0-1; 0.5 = chance). The "
        "text metrics above compare its generated answers with `chosen`. Example: 0.91.",
    )
    base_preference_accuracy: float | None = Field(
        None, description="The same for the base model without the adapter (compare_base). Example: 0.19."
    )
    source: str = Field(description="Where predictions came from: the model (+adapter) or a predictions file.")
    samples: list[Sample] = Field(default_factory=list, description="The first three rows, to read side by side.")


def _text(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def _pairs(
    spec: DatasetSpec, ctx: ToolContext, max_samples: int
) -> tuple[list[list[dict]], list[str], list[str], list[dict]]:
    """(conversations up to the last answer, prompt texts, reference answers, preference pairs) from a chat-like
    dataset; for preference pairs the reference is the chosen answer, and the pairs come back too."""
    loaded = load_examples(spec.model_copy(update={"max_rows": max_samples}), ctx.roots)
    if loaded.format == "text":
        raise LmtunerError("dataset: evaluate needs prompt/answer rows (alpaca, sharegpt, messages), not plain text")
    if data_shape(loaded.format) == "unpaired":
        raise LmtunerError("dataset: KTO rows (prompt/completion/label) have no reference answer or pair to score; "
                           "give held-out preference pairs or prompt/answer rows", field="dataset")  # fmt: skip
    if data_shape(loaded.format) == "pairs":
        pairs = loaded.examples
        # A plain (text) prompt is asked as one user turn: generation goes through the chat template.
        conversations = [p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
                         for p in pairs]  # fmt: skip
        prompts = ["\n".join(m["content"] for m in c if m["role"] == "user") for c in conversations]
        return conversations, prompts, [_text(p["chosen"]) for p in pairs], pairs
    conversations, prompts, references = [], [], []
    for example in loaded.examples:
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        conversations.append(messages[:last])
        prompts.append("\n".join(m["content"] for m in messages[:last] if m["role"] == "user"))
        references.append(messages[last]["content"])
    return conversations, prompts, references, []


def _refuse_reward_model(model_ref: str, adapter: str | None) -> None:
    """A reward model (stage 'reward') is a classifier: it has no answers to generate."""
    for folder in (adapter, model_ref):
        marker = Path(folder) / "lmtuner_artifact.json" if folder else None
        if marker is not None and marker.is_file():
            try:
                stage = json.loads(marker.read_text(encoding="utf-8")).get("stage")
            except (OSError, ValueError, AttributeError):
                stage = None
            if stage == "reward":
                raise LmtunerError(
                    f"{'adapter' if folder == adapter else 'model'}: {folder} is a reward model (stage 'reward'): it "
                    "scores answers and generates none; its held-out preference accuracy is in its job's report",
                    field="adapter" if folder == adapter else "model",
                )


def _preference_accuracy(model_ref: str, adapter: str | None, pairs: list[dict], trust_remote_code: bool) -> float:
    from lmtuner_core.models.inference import loaded_model
    from lmtuner_core.models.preference_scoring import preference_accuracy

    with loaded_model(model_ref, adapter, trust_remote_code) as (model, tokenizer):
        return round(preference_accuracy(model, tokenizer, pairs).accuracy, 4)


def _read_predictions(ctx: ToolContext, path: str, n: int) -> tuple[list[str], list[str] | None]:
    resolved = ctx.roots.resolve(path, "predictions")
    if not resolved.is_file():
        raise LmtunerError(f"predictions: file {shown(path)} not found", field="predictions")
    texts, prompts = [], []
    for number, row in iter_rows(resolved):
        if isinstance(row, Exception) or not isinstance(row, dict):
            raise LmtunerError(f"predictions {resolved.name} row {number}: not a JSON object", field="predictions")
        key = next((k for k in PREDICTION_KEYS if isinstance(row.get(k), str)), None)
        if key is None:
            raise LmtunerError(
                f"predictions {resolved.name} row {number}: no text field; expected one of "
                f"{', '.join(PREDICTION_KEYS)}",
                field="predictions",
            )
        texts.append(row[key])
        prompts.append(row.get("input") or row.get("prompt") or "")
        if len(texts) == n:
            break
    return texts, prompts if any(prompts) else None


def evaluate(
    ctx: ToolContext,
    model: Annotated[str, Field(description="Base model (local folder or hub id). Example: './models/tiny'.")],
    dataset: Annotated[
        str | DatasetSpec,
        Field(
            description="Rows with reference answers: a held-out file, e.g. 'data/test.jsonl' (never the training "
            "file)."
        ),
    ],
    adapter: Annotated[str | None, Field(description="Adapter to evaluate: a LoRA-family job's output_dir.")] = None,
    predictions: Annotated[
        str | None,
        Field(
            description="Score this file of existing predictions (jsonl, field prediction/predict/output/text, "
            "row by row with the dataset) instead of generating."
        ),
    ] = None,
    max_samples: Annotated[int, Field(ge=1, le=5000, description="Rows to score (the first N).")] = 50,
    compare_base: Annotated[bool, Field(description="Also score the base model without the adapter.")] = False,
    strip_prompt: Annotated[
        bool, Field(description="Score a prediction that starts by repeating its prompt on the answer only.")
    ] = True,
    max_new_tokens: Annotated[int, Field(ge=1, le=4096, description="Longest generated answer.")] = 128,
    metrics: Annotated[
        list[MetricName] | None, Field(description="Accepted for the contract; all six metrics are always returned.")
    ] = None,
    graders: Annotated[
        GraderList | None,
        Field(
            description="Also score every answer with these graders (as TrainConfig.graders; python graders need "
            "trust_remote_code) and return grader_score. The dataset may then be prompts only: rows {'prompt': …, "
            "plus the columns the graders read}. Example: [{'type': 'regex', 'pattern': '^\\d+$'}]."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    progress: ProgressFn | None = None,
) -> EvaluateResult:
    """Score answers against references with BLEU-2/4, METEOR (WordNet synonyms), NIST-2/4 and ROUGE-L, on words
    (the result names the tokenization). Generates with the model (+adapter, greedy) for the first max_samples
    rows of a held-out dataset, or scores a file of existing predictions. compare_base scores the base model
    too, so the user sees what fine-tuning changed. With graders, also grader_score: how the graders (e.g. a GRPO
    job's) score the answers to held-out prompts. On preference pairs (prompt/chosen/rejected) the reference is
    `chosen`, and preference_accuracy says how often the model prefers `chosen` to `rejected`."""
    spec = dataset_spec(dataset)
    if graders:
        return _evaluate_graded(ctx, model, spec, graders, adapter, predictions, max_samples, compare_base,
                                max_new_tokens, trust_remote_code, progress)  # fmt: skip
    conversations, prompts, references, preference_pairs = _pairs(spec, ctx, max_samples)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    adapter_path = str(ctx.adapter_folder(adapter, trust_remote_code)) if adapter else None
    _refuse_reward_model(model_ref, adapter_path)

    def scored(texts: list[str], prompt_texts: list[str] | None) -> Scores:
        return score(texts, references[: len(texts)], home=ctx.home, prompts=prompt_texts, strip_prompt=strip_prompt)

    if predictions:
        texts, file_prompts = _read_predictions(ctx, predictions, len(references))
        result = scored(texts, file_prompts or prompts[: len(texts)])
        source = f"predictions file {predictions}"
    else:
        with remote_code_explained(model_ref, "evaluate"):
            generated = run_generation(model_ref, conversations, adapter=adapter_path, max_new_tokens=max_new_tokens,
                                       trust_remote_code=trust_remote_code, progress=progress)  # fmt: skip
        texts = [o.text for o in generated.outputs]
        result = scored(texts, prompts)
        source = f"{model_ref}" + (f" + adapter {adapter_path}" if adapter_path else "") + " (greedy, transformers)"
    base = None
    if compare_base and adapter_path and not predictions:
        base_outputs = run_generation(
            model_ref, conversations, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code
        )
        base = GradedScores(**scored([o.text for o in base_outputs.outputs], prompts).model_dump())
    samples = [
        Sample(prompt=prompts[i], reference=references[i], prediction=texts[i]) for i in range(min(3, len(texts)))
    ]
    preference = base_preference = None
    if preference_pairs:
        preference = _preference_accuracy(model_ref, adapter_path, preference_pairs, trust_remote_code)
        if compare_base and adapter_path:
            base_preference = _preference_accuracy(model_ref, None, preference_pairs, trust_remote_code)
    return EvaluateResult(**result.model_dump(), base=base, source=source, samples=samples,
                          preference_accuracy=preference, base_preference_accuracy=base_preference)  # fmt: skip


def _evaluate_graded(
    ctx: ToolContext, model: str, spec: DatasetSpec, graders: list, adapter: str | None, predictions: str | None,
    max_samples: int, compare_base: bool, max_new_tokens: int, trust_remote_code: bool, progress: ProgressFn | None,
) -> EvaluateResult:  # fmt: skip
    """evaluate with graders: prompts (and any reference answers) from prompt rows or chat rows, scored by both."""
    from lmtuner_core.data.prompt_rows import load_prompt_rows
    from lmtuner_core.graders.scoring import GraderSet

    rows = load_prompt_rows(spec.model_copy(update={"max_rows": max_samples}), ctx.roots, graders).rows
    grader_set = GraderSet(graders, ctx.roots, trust_remote_code)  # before any generation: a bad grader fails fast
    conversations = [row["prompt"] for row in rows]
    prompts = ["\n".join(t["content"] for t in c if t["role"] == "user") for c in conversations]
    references = [row.get("answer") for row in rows]
    has_references = all(isinstance(r, str) for r in references)
    model_ref = resolve_model(model, ctx.roots, trust_remote_code=trust_remote_code)
    adapter_path = str(ctx.adapter_folder(adapter, trust_remote_code)) if adapter else None

    def scored(texts: list[str]) -> tuple[GradedScores, list[float]]:
        per_answer = [grader_set.score(text, row) for text, row in zip(texts, rows, strict=False)]
        n = len(per_answer)
        means = [round(sum(a.graders[i].score for a in per_answer) / n, 4) for i in range(len(graders))]
        grades = {"grader_score": round(sum(a.score for a in per_answer) / n, 4), "grader_means": means}
        if has_references:
            metrics = score(texts, references[:n], home=ctx.home, prompts=prompts[:n]).model_dump()
        else:
            metrics = {key: None for key in ("bleu_2", "bleu_4", "meteor", "nist_2", "nist_4", "rouge_l")}
            metrics |= {"n": n, "tokenization": "none: the rows have no reference answers"}
        return GradedScores(**metrics, **grades), [a.score for a in per_answer]

    if predictions:
        texts, _ = _read_predictions(ctx, predictions, len(rows))
        source = f"predictions file {predictions}"
    else:
        with remote_code_explained(model_ref, "evaluate"):
            generated = run_generation(model_ref, conversations, adapter=adapter_path, max_new_tokens=max_new_tokens,
                                       trust_remote_code=trust_remote_code, progress=progress)  # fmt: skip
        texts = [o.text for o in generated.outputs]
        source = f"{model_ref}" + (f" + adapter {adapter_path}" if adapter_path else "") + " (greedy, transformers)"
    result, per_answer = scored(texts)
    base = None
    if compare_base and adapter_path and not predictions:
        base_outputs = run_generation(
            model_ref, conversations, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code
        )
        base = scored([o.text for o in base_outputs.outputs])[0]
    samples = [
        Sample(prompt=prompts[i], reference=references[i] or "", prediction=texts[i], grader_score=per_answer[i])
        for i in range(min(3, len(texts)))
    ]
    return EvaluateResult(**result.model_dump(), base=base, source=source, samples=samples)

"""analyze_dataset: what a dataset holds before any GPU time is spent on it — rows, format, token lengths as
the model will see them (its chat template included), what a max_seq_len would cut, and problems."""

from __future__ import annotations

import hashlib
import json
import math

from pydantic import BaseModel, Field

from lmtuner_core.config import DatasetSpec
from lmtuner_core.data.chat_template import ensure_chat_template
from lmtuner_core.data.datasets import (
    example_chars,
    has_generation_markers,
    iter_rows,
    load_examples,
    resolve_dataset,
    tokenize_chat,
    tokenize_text,
)
from lmtuner_core.data.preference import as_conversations, data_shape, is_prompts_only, preference_chars
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.reporting import ProgressFn

CUT_POINTS = (256, 512, 1024, 2048, 4096, 8192)
MAX_TOKENIZED_ROWS = 20_000  # beyond this, an even sample keeps the call to seconds; the result says so
MAX_TOKENIZED_CHARS = 8_000_000  # characters tokenized per call (~2 µs each on a busy core): the same, by size
MAX_READ_CHARS = 200_000_000  # rows read per call (a few hundred MB in memory); a larger file is read up to here
ROW_CHARS_TOKENIZED = 65_536  # a longer row is measured on its start (well past the largest cut point) and scaled
CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English BPE, used only when no model is given


class TokenLengths(BaseModel):
    p50: int = Field(description="Median row length in tokens.")
    p95: int = Field(description="95th percentile row length: a good max_seq_len.")
    max: int = Field(description="Longest row in tokens.")
    mean: float = Field(description="Mean row length in tokens.")


class DatasetAnalysis(BaseModel):
    rows: int = Field(description="Usable rows.")
    format: str = Field(
        description="Detected format: alpaca, sharegpt, messages or text; preference pairs: preference (TRL), "
        "alpaca-ranking or sharegpt-ranking (LLaMA-Factory); kto (single answers with a desirable label); prompts "
        "(prompts only, with the columns graders read: stage grpo)."
    )
    stages: list[str] = Field(
        default_factory=list,
        description="Training stages these rows can train (TrainConfig `stage`), the usual one first. Example: "
        "['dpo', 'orpo', 'simpo', 'kto', 'reward'] for preference pairs.",
    )
    source: str = Field(description="Which file(s) were read.")
    tokenizer: str = Field(description="How tokens were counted: the model's tokenizer, or an estimate.")
    token_lengths: TokenLengths = Field(
        description="Row lengths in tokens (chat template included); for a preference row, its longer sequence "
        "(prompt + chosen or prompt + rejected)."
    )
    truncated_at: dict[str, int] = Field(
        description="For each candidate max_seq_len, how many rows are longer and would be cut. Example: "
        "{'1024': 12, '2048': 0}."
    )
    trained_token_share: float | None = Field(
        None, description="Share of tokens the loss covers (assistant turns) for chat data; 1.0 for text."
    )
    skipped_rows: int = Field(0, description="Malformed rows (training would fail on the first unless skipped).")
    duplicates: int = Field(0, description="Rows that repeat an earlier row exactly.")
    sampled: bool = Field(
        False,
        description=f"True when only part of the data was measured: an even sample of the rows was tokenized (over "
        f"{MAX_TOKENIZED_ROWS} rows, or over {MAX_TOKENIZED_CHARS:,} characters), or a file over "
        f"{MAX_READ_CHARS:,} characters was read only that far; problems says which.",
    )
    estimated_rows: int = Field(
        0,
        description=f"Rows longer than {ROW_CHARS_TOKENIZED:,} characters: tokenized on their start and scaled up, "
        "so their lengths are estimates.",
    )
    problems: list[str] = Field(default_factory=list, description="What to fix or know, in plain sentences.")


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[max(0, index)]


def _estimate_tokens(example: dict) -> tuple[int, int]:
    if "text" in example:
        n = math.ceil(len(example["text"]) / CHARS_PER_TOKEN)
        return n, n
    total = trained = 0
    for message in example["messages"]:
        chars = len(message.get("content") or "") + len(json.dumps(message.get("tool_calls") or ""))
        n = math.ceil(chars / CHARS_PER_TOKEN) + 4  # role markers
        total += n
        trained += n if message["role"] == "assistant" else 0
    return total, trained


def analyze_dataset(
    spec: DatasetSpec, roots: AllowedRoots, model: str | None = None, progress: ProgressFn | None = None
) -> DatasetAnalysis:
    """Reads every row (bad ones counted, not fatal; a file over MAX_READ_CHARS only that far) and measures token
    lengths with the model's tokenizer, on a bounded sample of rows and of each row's characters."""
    source = resolve_dataset(spec, roots)
    if source.format == "auto" and not source.columns and is_prompts_only(_first_row(source.files)):
        return _analyze_prompt_rows(spec, roots, model, progress)
    loaded = load_examples(spec.model_copy(update={"skip_bad_rows": True}), roots, source, max_chars=MAX_READ_CHARS)
    examples = loaded.examples
    problems: list[str] = []
    if not loaded.complete:
        problems.append(
            f"large dataset: only its first {loaded.rows_read} rows ({MAX_READ_CHARS:,} characters) were read; rows, "
            "duplicates and lengths describe those (start_training still checks every row)"
        )
    if loaded.skipped:
        problems.append(
            f"{len(loaded.skipped)} malformed rows; training fails on the first unless dataset.skip_bad_rows is "
            f"true. First: {loaded.skipped[0]}"
        )
    duplicates = _repeats(examples)
    if duplicates:
        problems.append(f"{duplicates} rows repeat an earlier row exactly; duplicates weigh those examples double")
    problems += preference_problems(examples, loaded.format)

    # Bounded work per call: at most MAX_TOKENIZED_ROWS rows and MAX_TOKENIZED_CHARS characters, an even sample
    # beyond that; at most ROW_CHARS_TOKENIZED characters of any one row.
    sizes = [example_chars(e) for e in examples]
    stride = math.ceil(
        max(len(examples) / MAX_TOKENIZED_ROWS, sum(min(n, ROW_CHARS_TOKENIZED) for n in sizes) / MAX_TOKENIZED_CHARS)
    )
    sampled = stride > 1 or not loaded.complete
    measured = list(zip(examples[::stride], sizes[::stride], strict=True))
    if stride > 1:
        problems.append(
            f"large dataset: token lengths come from an even sample of {len(measured)} of {len(examples)} rows "
            "(every row read was checked)"
        )
    lengths: list[int] = []
    trained_tokens = 0
    if model:
        tokenizer = _load_tokenizer(model)
        native = has_generation_markers(tokenizer)
        label = f"the tokenizer of {model}" + (
            "" if tokenizer.chat_template or loaded.format == "text" else " (ChatML)"
        )
    else:
        label = f"estimate: characters / {CHARS_PER_TOKEN:g} (pass model for exact counts)"
    step = max(1, len(measured) // 10)
    estimated, longest = 0, 0
    for i, (example, chars) in enumerate(measured):
        if model:
            scale = 1.0
            if chars > ROW_CHARS_TOKENIZED:
                example, scale = _clipped(example, chars), chars / ROW_CHARS_TOKENIZED
                estimated, longest = estimated + 1, max(longest, chars)
            n, trained = 0, 0
            for sequence in as_conversations(example) if "prompt" in example else [example]:
                if "text" in sequence:
                    ids = tokenize_text(sequence, tokenizer)["input_ids"]
                    length, learned = len(ids), len(ids)
                else:
                    out = tokenize_chat(sequence, tokenizer, True, native)
                    length, learned = len(out["input_ids"]), sum(out["assistant_masks"])
                n, trained = max(n, length), max(trained, learned)  # a pair's longer sequence
            n, trained = round(n * scale), round(trained * scale)
        else:
            sequences = as_conversations(example) if "prompt" in example else [example]
            n, trained = max(_estimate_tokens(sequence) for sequence in sequences)
        lengths.append(n)
        trained_tokens += trained
        if progress and ((i + 1) % step == 0 or i + 1 == len(measured)):
            progress(i + 1, len(measured), f"measured {i + 1} of {len(measured)} rows")
    if estimated:
        problems.append(
            f"{estimated} rows are longer than {ROW_CHARS_TOKENIZED:,} characters (the longest {longest:,}): their "
            "lengths are estimated from their start; rows that long are mostly cut away by max_seq_len"
        )
    ordered = sorted(lengths)
    if ordered and ordered[-1] > 4 * _percentile(ordered, 0.95):
        problems.append(
            f"the longest row ({ordered[-1]} tokens) is over 4x the 95th percentile ({_percentile(ordered, 0.95)}): "
            "check it is not a concatenation or a data error"
        )
    total_tokens = sum(lengths)
    share = round(trained_tokens / total_tokens, 4) if total_tokens else None
    if share is not None and loaded.format != "text" and share < 0.05:
        problems.append(
            f"only {share:.1%} of tokens are assistant answers: the model learns from very little of each row"
        )
    return DatasetAnalysis(
        rows=len(examples),
        format=loaded.format,
        stages=stages_for(loaded.format),
        source=loaded.source.label,
        tokenizer=label,
        token_lengths=_token_lengths(ordered),
        truncated_at=_truncated_at(ordered),
        trained_token_share=share,
        skipped_rows=len(loaded.skipped),
        duplicates=duplicates,
        sampled=sampled,
        estimated_rows=estimated,
        problems=problems,
    )


def _repeats(rows: list[dict]) -> int:
    """Rows that repeat an earlier row exactly."""
    seen: set[str] = set()
    repeats = 0
    for row in rows:
        digest = hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()
        repeats += digest in seen
        seen.add(digest)
    return repeats


def _token_lengths(ordered: list[int]) -> TokenLengths:
    """The summary of row lengths sorted ascending."""
    return TokenLengths(
        p50=_percentile(ordered, 0.5),
        p95=_percentile(ordered, 0.95),
        max=ordered[-1] if ordered else 0,
        mean=round(sum(ordered) / len(ordered), 1) if ordered else 0.0,
    )


def _truncated_at(ordered: list[int]) -> dict[str, int]:
    return {str(cut): sum(n > cut for n in ordered) for cut in CUT_POINTS}


def _first_row(files) -> object:
    for path in files:
        for _number, row in iter_rows(path):
            return row
    return None


def _analyze_prompt_rows(
    spec: DatasetSpec, roots: AllowedRoots, model: str | None, progress: ProgressFn | None
) -> DatasetAnalysis:
    """Prompts-only rows (GRPO's): read with the reader GRPO trains from, so a bad row is named as training would name
    it; lengths are of the prompt as the model sees it (template and generation prompt included), since the answers
    are sampled while training (their room is grpo.max_completion_length)."""
    from lmtuner_core.data.prompt_rows import load_prompt_rows

    loaded = load_prompt_rows(spec.model_copy(update={"skip_bad_rows": True}), roots)
    rows = loaded.rows
    problems: list[str] = []
    if loaded.skipped:
        problems.append(
            f"{len(loaded.skipped)} malformed rows; training fails on the first unless dataset.skip_bad_rows is "
            f"true. First: {loaded.skipped[0]}"
        )
    columns = sorted({key for row in rows for key in row} - {"prompt"})
    problems.append(
        "prompts only: these train stage 'grpo', whose answers are sampled while training and scored by `graders`"
        + (f"; columns graders can compare with: {', '.join(columns)}" if columns else "; no column besides the prompt"
           ", so only graders without a reference (regex, length) can score them")
    )  # fmt: skip
    measured = rows[:: math.ceil(len(rows) / MAX_TOKENIZED_ROWS)]
    if model:
        tokenizer = _load_tokenizer(model)
        label = f"the tokenizer of {model}"

        def count(prompt: list[dict]) -> int:
            return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])  # fmt: skip
    else:
        label = f"estimate: characters / {CHARS_PER_TOKEN:g} (pass model for exact counts)"

        def count(prompt: list[dict]) -> int:
            return sum(math.ceil(len(turn["content"]) / CHARS_PER_TOKEN) + 4 for turn in prompt) + 3

    lengths = []
    for i, row in enumerate(measured):
        lengths.append(count([{**t, "content": t["content"][:ROW_CHARS_TOKENIZED]} for t in row["prompt"]]))
        if progress and (i + 1) % max(1, len(measured) // 10) == 0:
            progress(i + 1, len(measured), f"measured {i + 1} of {len(measured)} prompts")
    ordered = sorted(lengths)
    duplicates = _repeats(rows)
    if duplicates:
        problems.append(f"{duplicates} rows repeat an earlier row exactly; duplicates weigh those prompts double")
    return DatasetAnalysis(
        rows=len(rows), format="prompts", stages=stages_for("prompts"), source=loaded.label, tokenizer=label,
        token_lengths=_token_lengths(ordered), truncated_at=_truncated_at(ordered),
        skipped_rows=len(loaded.skipped), duplicates=duplicates, sampled=len(measured) < len(rows),
        problems=problems,
    )  # fmt: skip


def stages_for(fmt: str) -> list[str]:
    """The stages rows of this format can train, the usual one first (plain text trains sft only)."""
    from lmtuner_core.stages import STAGES

    shape = data_shape(fmt)
    usual = {"pairs": ["dpo", "orpo", "simpo", "kto", "reward"], "unpaired": ["kto"], "sft": ["sft"],
             "prompts": ["grpo"]}[shape]  # fmt: skip
    return [name for name in usual if name in STAGES and not STAGES[name].not_yet]


def preference_problems(examples: list[dict], fmt: str) -> list[str]:
    """What to know about preference pairs before training on them: a length bias, identical prompts, one-sided
    KTO labels."""
    problems: list[str] = []
    if data_shape(fmt) == "pairs" and examples:
        longer = sum(preference_chars({"chosen": e["chosen"]}) > preference_chars({"rejected": e["rejected"]})
                     for e in examples)  # fmt: skip
        share = longer / len(examples)
        if len(examples) >= 10 and (share >= 0.9 or share <= 0.1):
            side = "longer" if share >= 0.9 else "shorter"
            problems.append(
                f"the chosen answer is {side} than the rejected one in {max(share, 1 - share):.0%} of pairs: DPO may "
                "learn length rather than quality; add pairs where the better answer is the "
                f"{'shorter' if side == 'longer' else 'longer'} one, or use stage 'simpo' (length-normalized)"
            )
    if data_shape(fmt) == "unpaired" and examples:
        desirable = sum(bool(e["label"]) for e in examples)
        if desirable in (0, len(examples)):
            kind = "desirable" if desirable else "undesirable"
            problems.append(f"every row is labelled {kind}: KTO needs both desirable and undesirable answers")
    return problems


def _clipped(example: dict, chars: int) -> dict:
    """The example with every text cut in proportion, to about ROW_CHARS_TOKENIZED characters in all."""
    keep = ROW_CHARS_TOKENIZED / chars
    if "prompt" in example:  # preference rows: each text cut alike
        return {key: _cut(value, keep) if key in ("prompt", "chosen", "rejected", "completion") else value
                for key, value in example.items()}  # fmt: skip
    if "text" in example:
        return {"text": example["text"][:ROW_CHARS_TOKENIZED]}
    messages = [{**m, "content": m["content"][: math.ceil(len(m["content"]) * keep)]} for m in example["messages"]]
    return {**example, "messages": messages}


def _cut(value, keep: float):
    if isinstance(value, str):
        return value[: math.ceil(len(value) * keep)]
    return [{**m, "content": m["content"][: math.ceil(len(m["content"]) * keep)]} for m in value]


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise LmtunerError(f"model: cannot load the tokenizer of {shown(model)} ({exc})", field="model") from None
    ensure_chat_template(tokenizer)  # what training would use for chat data
    return tokenizer

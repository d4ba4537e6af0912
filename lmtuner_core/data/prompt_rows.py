"""Prompts-only rows, for GRPO and for scoring answers with graders: `prompt` (a string, or a conversation of
{role, content} turns ending on a user turn) plus the columns graders read (e.g. `answer`).

Written here, not in `datasets`: those normalise rows to conversations with answers, which these rows do not have.
Chat rows (`messages` ending on an assistant turn) are also read: the turns before the last answer are the prompt
and the last answer becomes the column `answer`, so a held-out SFT file can be graded too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmtuner_core.config import DatasetSpec
from lmtuner_core.data.datasets import DatasetError, iter_rows, resolve_dataset
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.paths import AllowedRoots

ROLES = ("system", "user", "assistant")


@dataclass
class PromptRows:
    rows: list[dict[str, Any]]  # each with 'prompt' (a conversation) and its other columns
    label: str
    skipped: list[str] = field(default_factory=list)

    @property
    def examples(self) -> list[dict[str, Any]]:  # as LoadedData names its rows
        return self.rows


def _conversation(value: Any) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("`prompt` is empty")
        return [{"role": "user", "content": value}]  # a plain prompt is one user turn, as an instruct model expects
    if not isinstance(value, list) or not value:
        raise ValueError("`prompt` must be a string or a list of {role, content} turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"`prompt` turn {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}")
    if value[-1]["role"] != "user":
        raise ValueError("`prompt` must end on a user turn (the model answers it)")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def prompt_row(row: Any, needed: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row as {'prompt': conversation, other columns…}; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object with a `prompt`")
    if "prompt" in row:
        converted = {**row, "prompt": _conversation(row["prompt"])}
    elif isinstance(row.get("messages"), list) and row["messages"]:
        turns = row["messages"]
        last = max((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "assistant"), default=-1)
        if last < 0:
            converted = {k: v for k, v in row.items() if k != "messages"} | {"prompt": _conversation(turns)}
        else:
            converted = {k: v for k, v in row.items() if k != "messages"}
            converted |= {"prompt": _conversation(turns[:last]), "answer": turns[last].get("content")}
    else:
        raise ValueError(f"no `prompt` (columns: {', '.join(map(str, row)) or 'none'})")
    missing = [c for c in needed if c not in converted]
    if missing:
        raise ValueError(
            f"no column {', '.join(map(repr, missing))}, which the graders read (columns: "
            f"{', '.join(map(str, converted))})"
        )
    return converted


def reference_columns(graders: list | None) -> tuple[str, ...]:
    """The row columns the graders compare with."""
    return tuple(dict.fromkeys(g.reference for g in graders or () if getattr(g, "reference", None)))


def load_prompt_rows(spec: DatasetSpec, roots: AllowedRoots, graders: list | None = None) -> PromptRows:
    """Reads and checks every row; a bad one raises DatasetError naming file and line (or is skipped and counted
    with skip_bad_rows)."""
    source = resolve_dataset(spec, roots)
    needed = reference_columns(graders)
    rows: list[dict] = []
    skipped: list[str] = []
    for path in source.files:
        for number, row in iter_rows(path):
            try:
                if isinstance(row, Exception):
                    raise ValueError(str(row))
                rows.append(prompt_row(row, needed))
            except ValueError as exc:
                where = f"dataset {path.name} row {number}"
                if not spec.skip_bad_rows:
                    raise DatasetError(
                        f"{where}: {exc}; GRPO rows are {{'prompt': …, plus the columns the graders read}}: fix or "
                        "remove that row, or set dataset.skip_bad_rows: true",
                        field="dataset",
                    ) from None
                skipped.append(f"{where}: {exc}")
            if spec.max_rows and len(rows) >= spec.max_rows:
                break
        if spec.max_rows and len(rows) >= spec.max_rows:
            break
    if not rows:
        raise DatasetError(f"dataset {shown(source.label)}: no usable prompt rows", field="dataset")
    return PromptRows(rows, source.label, skipped)


def reference_chars(spec: DatasetSpec, roots: AllowedRoots, graders: list | None) -> int | None:
    """The longest reference answer (characters) in the columns the graders compare with, or None when they compare
    with none: how long the sampled answers need to be. A grader naming a column no row has is refused by name."""
    columns = reference_columns(graders)
    if not columns:
        return None
    rows = load_prompt_rows(spec.model_copy(update={"skip_bad_rows": True}), roots).rows
    present = {key for row in rows for key in row}
    for i, grader in enumerate(graders or ()):
        column = getattr(grader, "reference", None)
        if column and column not in present:
            raise LmtunerError(
                f"graders[{i}].reference: no row has the column {shown(column)} (columns: "
                f"{', '.join(sorted(present - {'prompt'})) or 'none besides the prompt'})",
                field=f"graders[{i}].reference",
            )
    return max((len(str(row[c])) for row in rows for c in columns if row.get(c) is not None), default=None)

"""Preference data: rows that say which answer is better, in the forms people already have, read into TRL's own.

- TRL's preference rows: `prompt` / `chosen` / `rejected`, plain (text) or conversational (lists of role/content
  turns), or with the prompt implicit (`chosen` and `rejected` as whole conversations that share their start).
- LLaMA-Factory's ranking rows (`dataset_info.json` entries with `ranking: true`, or rows with these keys):
  alpaca style `instruction` / `input` / `chosen` / `rejected` (+ `system`, `history`), and sharegpt style
  `conversations` (ending on the user's turn) with `chosen` / `rejected` as one `{from, value}` turn each.
- TRL's unpaired (KTO) rows: `prompt` / `completion` / `label` (true = a desirable answer).

The normal forms are TRL's: a pair is {'prompt', 'chosen', 'rejected', 'tools'} with the prompt a list of turns and
each answer a list of assistant turns (conversational), or all three text (plain); an unpaired row is {'prompt',
'completion', 'label', 'tools'}. TRL's trainers tokenize them with the model's chat template. Written here: TRL reads
neither LLaMA-Factory's forms nor reports which row is malformed.
"""

from __future__ import annotations

from typing import Any

from lmtuner_core.errors import shown

PAIR_FORMATS = ("preference", "alpaca-ranking", "sharegpt-ranking")
UNPAIRED_FORMATS = ("kto",)
PROMPTS_FORMAT = "prompts"  # GRPO's rows: a prompt and the columns graders read (data/prompt_rows.py reads them)
ANSWER_KEYS = ("chosen", "rejected", "completion", "response", "output", "messages", "conversations", "text")
ROLES = ("system", "user", "assistant", "tool")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


class PreferenceRowError(ValueError):
    """One preference row is malformed (the reader turns it into its RowError with the file and line)."""


def data_shape(fmt: str) -> str:
    """What a format's rows train: 'pairs', 'unpaired' (KTO), 'prompts' (GRPO) or 'sft' (demonstrations and text)."""
    if fmt == PROMPTS_FORMAT:
        return "prompts"
    if fmt in PAIR_FORMATS:
        return "pairs"
    if fmt in UNPAIRED_FORMATS:
        return "unpaired"
    return "sft"


def is_prompts_only(row: Any) -> bool:
    """A row with a `prompt` and no answer of any known format: GRPO's prompts (answers are sampled in training)."""
    return isinstance(row, dict) and "prompt" in row and not any(key in row for key in ANSWER_KEYS)


def detect_preference_format(row: dict, columns: dict[str, str]) -> str | None:
    """The preference format of a row from its keys, or None when it is not preference data."""
    keys = set(row)
    chosen, rejected = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    if chosen in keys and rejected in keys:
        if columns.get("messages", "conversations") in keys or "conversations" in keys:
            return "sharegpt-ranking"
        if columns.get("prompt", "instruction") in keys or "instruction" in keys or "input" in keys:
            return "alpaca-ranking"
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    return None


def _turns(value: Any, field: str, *, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """A list of {role, content} turns, checked; the field named in the error."""
    if not isinstance(value, list) or not value:
        raise PreferenceRowError(f"{shown(field)} must be text or a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or "role" not in turn:
            raise PreferenceRowError(f"{shown(field)} turn {i} must be an object with 'role' and 'content'")
        role = {"developer": "system", "human": "user", "gpt": "assistant"}.get(turn["role"], turn["role"])
        if role not in roles:
            raise PreferenceRowError(
                f"{shown(field)} turn {i} has role {shown(turn['role'])}; accepted here: {', '.join(roles)}"
            )
        content = turn.get("content")
        if not isinstance(content, str):
            raise PreferenceRowError(f"{shown(field)} turn {i}: 'content' must be text")
        out.append({"role": role, "content": content})
    return out


def _answer(value: Any, field: str, conversational: bool) -> str | list[dict]:
    """One answer: text (plain rows), or assistant turns (conversational rows; text becomes one turn)."""
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceRowError(f"{shown(field)} is empty; a preference row needs both answers")
        return [{"role": "assistant", "content": value}] if conversational else value
    if isinstance(value, dict):  # one turn given as an object
        value = [value]
    if not conversational:
        raise PreferenceRowError(
            f"the prompt is text but {shown(field)} is {type(value).__name__}; give prompt and answers both as text "
            "(plain) or both as lists of {role, content} turns (conversational)"
        )
    turns = _turns(value, field, roles=("assistant",))
    if not any(t["content"].strip() for t in turns):
        raise PreferenceRowError(f"{shown(field)} is empty; a preference row needs both answers")
    return turns


def _pair(prompt: str | list[dict], chosen: Any, rejected: Any, names: tuple[str, str], tools: Any = None) -> dict:
    conversational = isinstance(prompt, list)
    good = _answer(chosen, names[0], conversational)
    bad = _answer(rejected, names[1], conversational)
    if good == bad:
        raise PreferenceRowError(
            f"{shown(names[0])} and {shown(names[1])} are the same answer; a pair must say which of two different "
            "answers is better"
        )
    return {"prompt": prompt, "chosen": good, "rejected": bad, "tools": tools}


def _prompt(value: Any, field: str) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceRowError(f"{shown(field)} is empty; the answers need a prompt to answer")
        return value
    turns = _turns(value, field)
    if turns[-1]["role"] == "assistant":
        raise PreferenceRowError(f"{shown(field)} ends on an assistant turn; it must end on the turn being answered")
    return turns


def trl_pair(row: dict, columns: dict[str, str]) -> dict:
    """TRL's explicit (`prompt`) or implicit prompt rows, plain or conversational."""
    names = (columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    prompt_key = columns.get("prompt", "prompt")
    chosen, rejected = row.get(names[0]), row.get(names[1])
    if chosen is None or rejected is None:
        missing = names[0] if chosen is None else names[1]
        raise PreferenceRowError(f"missing {shown(missing)}; a preference row has prompt, chosen and rejected")
    if prompt_key in row and row[prompt_key] is not None:
        return _pair(_prompt(row[prompt_key], prompt_key), chosen, rejected, names, row.get("tools"))
    # Implicit prompt (TRL): both answers are whole conversations; the prompt is the turns they share.
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise PreferenceRowError(
            f"missing {shown(prompt_key)}: with text answers the row needs a prompt (or give chosen and rejected as "
            "whole conversations that start with the same turns)"
        )
    good, bad = _turns(chosen, names[0]), _turns(rejected, names[1])
    shared = 0
    while shared < min(len(good), len(bad)) and good[shared] == bad[shared]:
        shared += 1
    if shared == 0 or good[shared - 1]["role"] == "assistant":
        raise PreferenceRowError(
            f"missing {shown(prompt_key)}, and {shown(names[0])} and {shown(names[1])} do not start with the same "
            "user turn(s) to take it from; add a prompt column"
        )
    return _pair(good[:shared], good[shared:], bad[shared:], names, row.get("tools"))


def alpaca_ranking_pair(row: dict, columns: dict[str, str], user_turns: list[dict]) -> dict:
    """LLaMA-Factory alpaca ranking: the prompt turns (built like an alpaca row's) and two text answers."""
    names = (columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    for name in names:
        if not isinstance(row.get(name), str):
            raise PreferenceRowError(f"{shown(name)} must be the answer's text (LLaMA-Factory ranking, alpaca style)")
    return _pair(user_turns, row[names[0]], row[names[1]], names)


def sharegpt_ranking_pair(row: dict, columns: dict[str, str], tags: dict[str, str], prompt: list[dict]) -> dict:
    """LLaMA-Factory sharegpt ranking: conversations ending on the user's turn; chosen/rejected one turn each."""
    names = (columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise PreferenceRowError("the conversation must end on the user's turn (the one chosen and rejected answer)")
    answers = []
    for name in names:
        turn = row.get(name)
        if isinstance(turn, str):
            answers.append(turn)
            continue
        if not isinstance(turn, dict) or not isinstance(turn.get(tags["content_tag"]), str):
            raise PreferenceRowError(
                f"{shown(name)} must be one turn {{{tags['role_tag']!r}: {tags['assistant_tag']!r}, "
                f"{tags['content_tag']!r}: '...'}}"
            )
        if turn.get(tags["role_tag"], tags["assistant_tag"]) != tags["assistant_tag"]:
            raise PreferenceRowError(
                f"{shown(name)} is a {shown(turn.get(tags['role_tag']))} turn; it must be the assistant's "
                f"({tags['role_tag']!r}: {tags['assistant_tag']!r})"
            )
        answers.append(turn[tags["content_tag"]])
    return _pair(prompt, answers[0], answers[1], names)


def kto_row(row: dict, columns: dict[str, str]) -> dict:
    """TRL's unpaired rows: prompt, completion, label (true = desirable)."""
    prompt_key = columns.get("prompt", "prompt")
    if row.get(prompt_key) is None:
        raise PreferenceRowError(f"missing {shown(prompt_key)}; a KTO row has prompt, completion and label")
    prompt = _prompt(row[prompt_key], prompt_key)
    completion = _answer(row.get("completion"), "completion", isinstance(prompt, list))
    return {"prompt": prompt, "completion": completion, "label": _label(row.get("label")), "tools": row.get("tools")}


def kto_conversation(turns: list[dict], label: Any) -> dict:
    """LLaMA-Factory's KTO rows: a conversation whose last turn is the assistant's answer, and its `kto_tag`."""
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise PreferenceRowError("the conversation must end on the assistant's answer (the one the label judges)")
    answer = [{"role": "assistant", "content": turns[-1]["content"]}]
    return {"prompt": turns[:-1], "completion": answer, "label": _label(label, "kto_tag"), "tools": None}


def _label(value: Any, field: str = "label") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:  # CSV cells are text
        return value.strip().lower() in TRUE_WORDS
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise PreferenceRowError(
        f"{shown(field)} is {shown(value)}; it must be true (a desirable answer) or false (an undesirable one)"
    )


def unpaired_from_pairs(pairs: list[dict]) -> list[dict]:
    """KTO on pair data: each pair gives its chosen answer as desirable and its rejected one as not."""
    rows = []
    for pair in pairs:
        for key, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "completion": pair[key], "label": label, "tools": pair.get("tools")})
    return rows


def preference_chars(example: dict) -> int:
    """Characters of a preference or unpaired row, as the tokenizer will see them."""
    total = 0
    for key in ("prompt", "chosen", "rejected", "completion"):
        value = example.get(key)
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(t.get("content") or "") for t in value)
    return total


def as_conversations(example: dict) -> list[dict]:
    """The sequences a preference or unpaired row trains on, as SFT examples ({'messages'} or {'text'}), with the
    answer as the part that is learned: for measuring lengths (analyze_dataset) and the report's loss."""
    prompt = example["prompt"]
    answers = [example[k] for k in ("chosen", "rejected", "completion") if k in example]
    if isinstance(prompt, str):
        return [{"text": prompt + answer} for answer in answers]
    return [{"messages": [*prompt, *answer], "tools": example.get("tools")} for answer in answers]

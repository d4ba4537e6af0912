"""Tests for lmtuner_core.data.datasets: reading, checking and normalising rows, tokenizing them with assistant masks.

The shared LLaMA-Factory and LMTuner files are read as they are; edge cases are small files in tmp_path.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from lmtuner_core.config import DatasetSpec
from lmtuner_core.data.datasets import (
    DatasetError,
    RowError,
    _tokenize_by_prefixes,
    detect_format,
    has_generation_markers,
    held_out_count,
    load_examples,
    resolve_dataset,
    split_eval,
    tokenize_chat,
    tokenize_examples,
    tokenize_text,
)
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots

ANYWHERE = AllowedRoots(None)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def load(path: Path | str, roots: AllowedRoots = ANYWHERE, **spec):
    return load_examples(DatasetSpec(path=str(path), **spec), roots)


def load_error(path: Path | str, roots: AllowedRoots = ANYWHERE, **spec) -> str:
    with pytest.raises(DatasetError) as info:
        load(path, roots, **spec)
    return str(info.value)


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


@pytest.fixture(scope="module")
def llamafactory(shared_data: Path) -> Path:
    return shared_data / "llamafactory"


@pytest.fixture(scope="module")
def shared_roots(shared_data: Path) -> AllowedRoots:
    return AllowedRoots([shared_data])


# ---------------------------------------------------------------------------------------------- shared files


def test_alpaca_demo_loads_every_row_as_one_exchange(llamafactory, shared_roots):
    raw = json.loads((llamafactory / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    data = load(llamafactory / "alpaca_en_demo.json", shared_roots)
    assert data.format == "alpaca"
    assert len(data.examples) == data.rows_read == len(raw) == 999
    assert data.skipped == []
    assert data.examples[0] == {
        "messages": chat(("user", raw[0]["instruction"]), ("assistant", raw[0]["output"])),
        "tools": None,
    }
    # Row 6 has an input: it follows the instruction after a blank line.
    assert raw[5]["input"]
    assert data.examples[5]["messages"][0] == {
        "role": "user",
        "content": f"{raw[5]['instruction']}\n\n{raw[5]['input']}",
    }
    for example, row in zip(data.examples, raw, strict=True):
        assert [m["role"] for m in example["messages"]] == ["user", "assistant"]
        assert example["messages"][1]["content"] == row["output"]


def test_identity_keeps_its_placeholders(llamafactory, shared_roots):
    data = load(llamafactory / "identity.json", shared_roots)
    assert data.format == "alpaca"
    assert len(data.examples) == 91
    assert data.examples[0]["messages"] == chat(
        ("user", "hi"),
        ("assistant", "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"),
    )


def test_glaive_sharegpt_becomes_messages_with_tool_calls_and_tool_results(llamafactory, shared_roots):
    raw = json.loads((llamafactory / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    data = load(llamafactory / "glaive_toolcall_en_demo.json", shared_roots)
    assert data.format == "sharegpt"
    assert len(data.examples) == 300
    first = data.examples[0]
    assert [m["role"] for m in first["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    call = first["messages"][3]
    assert call == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "search_recipes",
                    "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]},
                },
            }
        ],
    }
    assert first["messages"][4]["content"] == raw[0]["conversations"][4]["value"]
    assert json.loads(first["messages"][4]["content"])["recipes"][0]["name"] == "Chicken and Bell Pepper Stir Fry"
    assert first["tools"] == json.loads(raw[0]["tools"])
    assert isinstance(first["tools"], list) and first["tools"][0]["name"] == "search_recipes"

    def count(role_from: str) -> int:
        return sum(t["from"] == role_from for row in raw for t in row["conversations"])

    messages = [m for e in data.examples for m in e["messages"]]
    assert sum(m["role"] == "tool" for m in messages) == count("observation") == 211
    assert sum(bool(m.get("tool_calls")) for m in messages) == count("function_call") == 211
    assert sum(m["role"] == "user" for m in messages) == count("human")
    assert all(isinstance(c["function"]["arguments"], dict) for m in messages for c in m.get("tool_calls", []))
    # Rows that store "[]" have no tools: the normal form is None, not an empty list.
    no_tools = [e for e, row in zip(data.examples, raw, strict=True) if json.loads(row["tools"]) == []]
    assert no_tools and all(e["tools"] is None for e in no_tools)
    assert all(isinstance(e["tools"], list) and e["tools"] for e in data.examples if e not in no_tools)


def test_c4_jsonl_is_text(llamafactory, shared_roots):
    raw = [json.loads(line) for line in (llamafactory / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    data = load(llamafactory / "c4_demo.jsonl", shared_roots)
    assert data.format == "text"
    assert data.examples == [{"text": row["text"]} for row in raw]
    assert len(data.examples) == 300


def test_medical_input_output_is_detected_as_alpaca(shared_data, shared_roots):
    path = shared_data / "lmtuner-medical" / "train.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = load(path, shared_roots)
    assert data.format == "alpaca"
    assert len(data.examples) == len(raw) == 482
    assert data.examples[0] == {
        "messages": chat(("user", raw[0]["input"]), ("assistant", raw[0]["output"])),
        "tools": None,
    }
    assert data.examples[0]["messages"][0]["content"].startswith("patient:")


def test_max_rows_stops_early(llamafactory, shared_roots):
    data = load(llamafactory / "alpaca_en_demo.json", shared_roots, max_rows=7)
    assert len(data.examples) == 7
    assert data.rows_read == 7


# ---------------------------------------------------------------------------------------------- dataset_info.json


def test_registry_entry_glaive_uses_its_sharegpt_columns(llamafactory, shared_roots):
    spec = DatasetSpec(name="glaive_toolcall_en_demo", dataset_dir=str(llamafactory))
    source = resolve_dataset(spec, shared_roots)
    assert source.format == "sharegpt"
    assert source.columns == {"messages": "conversations", "tools": "tools"}
    assert source.files == [(llamafactory / "glaive_toolcall_en_demo.json").resolve()]
    assert source.registry_dir == llamafactory.resolve()
    assert "glaive_toolcall_en_demo" in source.label
    by_name = load_examples(spec, shared_roots)
    by_path = load(llamafactory / "glaive_toolcall_en_demo.json", shared_roots)
    assert by_name.examples == by_path.examples
    assert by_name.format == "sharegpt"


def test_registry_entry_c4_becomes_text(llamafactory, shared_roots):
    spec = DatasetSpec(name="c4_demo", dataset_dir=str(llamafactory))
    source = resolve_dataset(spec, shared_roots)
    assert source.format == "text"
    assert source.columns == {"text": "text"}
    data = load_examples(spec, shared_roots)
    assert data.format == "text"
    assert len(data.examples) == 300
    assert all(set(e) == {"text"} and e["text"].strip() for e in data.examples)


def test_registry_entry_alpaca_is_the_default_formatting(llamafactory, shared_roots):
    data = load_examples(DatasetSpec(name="alpaca_en_demo", dataset_dir=str(llamafactory)), shared_roots)
    assert data.format == "alpaca"
    assert len(data.examples) == 999


def test_entry_name_given_as_path_falls_back_to_the_registry(llamafactory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    roots = AllowedRoots([tmp_path, llamafactory])
    data = load_examples(DatasetSpec(path="identity", dataset_dir=str(llamafactory)), roots)
    assert len(data.examples) == 91


def test_default_dataset_dir_is_data_then_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "mine.jsonl", [{"text": "hello world"}])
    write_json(
        tmp_path / "data" / "dataset_info.json", {"mine": {"file_name": "mine.jsonl", "columns": {"prompt": "text"}}}
    )
    data = load_examples(DatasetSpec(name="mine"), AllowedRoots([tmp_path]))
    assert data.examples == [{"text": "hello world"}]


def test_unknown_entry_lists_similar_entries(llamafactory, shared_roots):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(DatasetSpec(name="toolcall", dataset_dir=str(llamafactory)), shared_roots)
    message = str(info.value)
    assert "has no entry 'toolcall'" in message
    assert "glaive_toolcall_en_demo" in message
    assert info.value.field == "dataset.name"


def test_unknown_entry_without_similar_names_lists_some_entries(llamafactory, shared_roots):
    with pytest.raises(DatasetError, match=r"entries include: identity, alpaca_en_demo"):
        resolve_dataset(DatasetSpec(name="qqqq", dataset_dir=str(llamafactory)), shared_roots)


@pytest.mark.parametrize("name", ["alpaca_en", "glaive_toolcall_en"])
def test_hub_only_entries_are_refused(llamafactory, shared_roots, name):
    with pytest.raises(DatasetError, match=r"loads from a hub \(hf_hub_url\); lmtuner reads local files only"):
        resolve_dataset(DatasetSpec(name=name, dataset_dir=str(llamafactory)), shared_roots)


def test_preference_entries_are_read_as_ranking_pairs(llamafactory, shared_roots):
    # ranking: true entries are preference pairs now (tests/test_preference_data.py reads them); this one's file is
    # not in the shared folder, and that is what is said.
    with pytest.raises(DatasetError, match=r"names 'dpo_en_demo.json', which is not in"):
        resolve_dataset(DatasetSpec(name="dpo_en_demo", dataset_dir=str(llamafactory)), shared_roots)


def test_entry_whose_file_is_missing_is_refused(llamafactory, shared_roots):
    with pytest.raises(DatasetError, match=r"names 'alpaca_zh_demo.json', which is not in"):
        resolve_dataset(DatasetSpec(name="alpaca_zh_demo", dataset_dir=str(llamafactory)), shared_roots)


def test_folder_without_registry_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"no dataset_info\.json was found in") as info:
        resolve_dataset(DatasetSpec(name="anything", dataset_dir=str(tmp_path)), ANYWHERE)
    assert "dataset.dataset_dir" in str(info.value)


def test_broken_registry_is_refused(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match="cannot read"):
        resolve_dataset(DatasetSpec(name="x", dataset_dir=str(tmp_path)), ANYWHERE)


@pytest.mark.parametrize("entry", [{"formatting": "sharegpt"}, "data.json", {}])
def test_registry_entry_without_file_name_is_refused(tmp_path, entry):
    write_json(tmp_path / "dataset_info.json", {"broken": entry})
    with pytest.raises(DatasetError, match=r"'broken' .* has no file_name"):
        resolve_dataset(DatasetSpec(name="broken", dataset_dir=str(tmp_path)), ANYWHERE)


def test_registry_entry_with_unknown_formatting_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    write_json(tmp_path / "dataset_info.json", {"a": {"file_name": "a.jsonl", "formatting": "openai"}})
    with pytest.raises(DatasetError, match="formatting 'openai'; accepted: alpaca, sharegpt"):
        resolve_dataset(DatasetSpec(name="a", dataset_dir=str(tmp_path)), ANYWHERE)


def test_registry_tags_and_columns_are_applied(tmp_path):
    rows = [
        {
            "msgs": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"},
            ],
            "sys": "be kind",
        }
    ]
    write_json(tmp_path / "chat.json", rows)
    entry = {
        "file_name": "chat.json",
        "formatting": "sharegpt",
        "columns": {"messages": "msgs", "system": "sys"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
    write_json(tmp_path / "dataset_info.json", {"chat": entry})
    data = load_examples(DatasetSpec(name="chat", dataset_dir=str(tmp_path)), AllowedRoots([tmp_path]))
    assert data.examples == [
        {"messages": chat(("system", "be kind"), ("user", "hello"), ("assistant", "hi there")), "tools": None}
    ]


def test_spec_columns_override_registry_columns(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4", "answer": "four"}])
    entry = {"file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a"}}
    write_json(tmp_path / "dataset_info.json", {"qa": entry})
    spec = DatasetSpec(name="qa", dataset_dir=str(tmp_path), columns={"response": "answer"})
    data = load_examples(spec, ANYWHERE)
    assert data.examples[0]["messages"] == chat(("user", "2+2?"), ("assistant", "four"))


def test_registry_file_name_cannot_escape_the_allowed_roots(tmp_path):
    registry = tmp_path / "reg"
    registry.mkdir()
    write_jsonl(tmp_path / "secret.jsonl", [{"text": "secret"}])
    write_json(registry / "dataset_info.json", {"leak": {"file_name": "../secret.jsonl"}})
    with pytest.raises(LmtunerError, match="outside the allowed folders") as info:
        resolve_dataset(DatasetSpec(name="leak", dataset_dir=str(registry)), AllowedRoots([registry]))
    assert info.value.field == "dataset.file_name"


# ---------------------------------------------------------------------------------------------- paths


def test_file_outside_allowed_roots_is_refused(tmp_path, llamafactory):
    with pytest.raises(LmtunerError, match="outside the allowed folders") as info:
        load(llamafactory / "identity.json", AllowedRoots([tmp_path]))
    assert info.value.field == "dataset.path"


def test_symlink_out_of_the_allowed_roots_is_refused(tmp_path, llamafactory):
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "link.json").symlink_to(llamafactory / "identity.json")
    with pytest.raises(LmtunerError, match="outside the allowed folders"):
        load(inside / "link.json", AllowedRoots([inside]))


def test_dataset_dir_outside_allowed_roots_is_refused(tmp_path, llamafactory):
    with pytest.raises(LmtunerError, match="outside the allowed folders") as info:
        resolve_dataset(DatasetSpec(name="identity", dataset_dir=str(llamafactory)), AllowedRoots([tmp_path]))
    assert info.value.field == "dataset.dataset_dir"


def test_path_that_looks_like_an_option_is_refused(tmp_path):
    with pytest.raises(LmtunerError, match="starts with '-'"):
        load("-rf.jsonl", AllowedRoots([tmp_path]))
    with pytest.raises(LmtunerError, match="starts with '-'"):
        load("--help", ANYWHERE)


def test_missing_file_is_refused_with_accepted_suffixes(tmp_path):
    message = load_error(tmp_path / "missing.jsonl")
    assert "not found" in message
    assert ".json, .jsonl, .csv or .parquet" in message


def test_unsupported_suffix_is_refused(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n", encoding="utf-8")
    message = load_error(tmp_path / "rows.txt")
    assert "suffix '.txt'" in message
    assert ".jsonl" in message and ".parquet" in message


def test_folder_reads_its_data_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    data = load(tmp_path)
    assert data.examples == [{"text": "first"}, {"text": "second"}]
    assert [p.name for p in data.source.files] == ["a.jsonl", "b.jsonl"]


def test_folder_without_data_files_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("nothing here", encoding="utf-8")
    assert "holds no .json, .jsonl, .csv, .parquet files" in load_error(tmp_path)


# ---------------------------------------------------------------------------------------------- reading


def bad_line_3(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    good = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(4)]
    path.write_text("\n".join([good[0], good[1], "{'instruction': 'single quotes'}", good[2], good[3]]) + "\n")
    return path


def test_jsonl_bad_line_is_named(tmp_path):
    message = load_error(bad_line_3(tmp_path))
    assert "dataset train.jsonl line 3: not JSON" in message
    assert "skip_bad_rows" in message


def test_jsonl_bad_line_is_skipped_and_counted(tmp_path):
    data = load(bad_line_3(tmp_path), skip_bad_rows=True)
    assert len(data.examples) == 4
    assert data.rows_read == 5
    assert len(data.skipped) == 1
    assert data.skipped[0].startswith("dataset train.jsonl line 3: not JSON")
    assert [e["messages"][0]["content"] for e in data.examples] == ["q0", "q1", "q2", "q3"]


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "a"}\n\n\n{"text": ""}\n', encoding="utf-8")
    assert "line 4: 'text' is empty" in load_error(path)


def test_jsonl_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    assert "line 2: not UTF-8" in load_error(path)


def test_all_rows_bad_is_refused_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": ""}, {"instruction": "q"}])
    message = load_error(path, skip_bad_rows=True)
    assert "no usable rows (2 rows skipped as malformed; first: dataset bad.jsonl line 1" in message


def test_json_array_rows_are_numbered_from_one(tmp_path):
    path = write_json(
        tmp_path / "rows.json", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": " "}]
    )
    message = load_error(path)
    assert "dataset rows.json row 2: 'output' is empty" in message
    assert "fix or remove that row" in message


def test_empty_output_is_refused_with_its_line(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"instruction": "q1", "output": "a1"},
            {"instruction": "q2", "output": "a2"},
            {"instruction": "q3", "output": ""},
        ],
    )
    assert "dataset train.jsonl line 3: 'output' is empty" in load_error(path)


def test_missing_output_column_is_refused(tmp_path):
    path = write_json(tmp_path / "rows.json", [{"instruction": "q", "output": "a"}, {"instruction": "q", "input": "x"}])
    assert "row 2: missing 'output'" in load_error(path)


def test_row_that_is_not_an_object_is_refused(tmp_path):
    path = write_json(tmp_path / "rows.json", [{"text": "a"}, ["text", "b"]])
    assert "row 2: a row must be an object, got list" in load_error(path)


def test_json_lines_saved_as_json_are_read_by_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": ""}\n', encoding="utf-8")
    assert "dataset rows.json line 3: 'text' is empty" in load_error(path)
    assert load(path, skip_bad_rows=True).examples == [{"text": "a"}, {"text": "b"}]


def test_json_wrapped_in_an_object_is_unwrapped(tmp_path):
    path = write_json(tmp_path / "wrapped.json", {"version": 2, "data": [{"text": "a"}, {"text": "b"}]})
    assert load(path).examples == [{"text": "a"}, {"text": "b"}]


def test_json_object_with_two_lists_is_refused(tmp_path):
    path = write_json(tmp_path / "splits.json", {"train": [{"text": "a"}], "test": [{"text": "b"}]})
    assert "the top level is an object, not a list of rows" in load_error(path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    assert "broken.json: not valid JSON at line 3" in load_error(path)


def test_csv_rows_load_with_line_numbers(tmp_path):
    path = tmp_path / "train.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Add the numbers.", "2 and 3", "5"])
        writer.writerow(["Write two lines.", "", "line one\nline two"])  # a quoted field over two lines
        writer.writerow(["Say nothing.", "", ""])
    message = load_error(path)
    # The multi-line field moves the last row to line 5 of the file.
    assert "dataset train.csv line 5: 'output' is empty" in message
    data = load(path, skip_bad_rows=True)
    assert data.format == "alpaca"
    assert data.examples == [
        {"messages": chat(("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")), "tools": None},
        {"messages": chat(("user", "Write two lines."), ("assistant", "line one\nline two")), "tools": None},
    ]


def test_csv_row_with_extra_fields_is_refused(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\nq,a\nq,a,extra\n", encoding="utf-8")
    assert "line 3: more fields than the header has columns" in load_error(path)


def test_csv_with_byte_order_mark_reads_its_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,output\nSay hi.,hi\n")
    data = load(path)
    assert data.examples[0]["messages"] == chat(("user", "Say hi."), ("assistant", "hi"))


def test_jsonl_and_json_with_byte_order_mark_load(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "b.json").write_bytes(b'\xef\xbb\xbf[{"text": "c"}]')
    assert load(tmp_path / "a.jsonl").examples == [{"text": "a"}, {"text": "b"}]
    assert load(tmp_path / "b.json").examples == [{"text": "c"}]


def test_parquet_rows_load(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    conversations = [
        [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}],
        [{"from": "human", "value": "bye"}, {"from": "gpt", "value": ""}],
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"conversations": conversations}), path)
    message = load_error(path)
    assert "dataset chat.parquet row 2: no assistant turn with content" in message
    data = load(path, skip_bad_rows=True)
    assert data.format == "sharegpt"
    assert data.examples == [{"messages": chat(("user", "hello"), ("assistant", "hi")), "tools": None}]


def test_damaged_parquet_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert "not a readable parquet file" in load_error(path)


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"input": "q", "output": "a"}, "alpaca"),
        ({"prompt": "q", "completion": "a"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "q"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages"),
        ({"text": "plain"}, "text"),
        ({"text": "plain", "meta": 1}, "text"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row, {}) == expected


def test_detect_format_uses_the_column_mapping():
    assert detect_format({"dialog": [{"from": "human", "value": "x"}]}, {"messages": "dialog"}) == "sharegpt"
    assert detect_format({"body": "x"}, {"text": "body"}) == "text"
    assert detect_format({"q": "x", "a": "y"}, {"prompt": "q", "response": "a"}) == "alpaca"


def test_detect_format_error_lists_the_accepted_formats():
    with pytest.raises(RowError) as info:
        detect_format({"question": "q", "answer": "a"}, {})
    message = str(info.value)
    assert "['answer', 'question']" in message
    for fmt in ("alpaca", "sharegpt", "messages", "text"):
        assert fmt in message
    assert "dataset.format" in message and "dataset.columns" in message


def test_detect_format_refuses_non_objects():
    with pytest.raises(RowError, match="must be an object, got str"):
        detect_format("just text", {})


def test_unknown_format_in_a_file_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    message = load_error(path)
    assert "qa.jsonl line 1: cannot tell the format" in message


def test_alpaca_with_system_history_and_input(tmp_path):
    row = {
        "instruction": "Translate to French.",
        "input": "good night",
        "output": "bonne nuit",
        "system": "You are a translator.",
        "history": [["Translate to French: hello", "bonjour"], ["And: thanks", "merci"]],
    }
    data = load(write_json(tmp_path / "a.json", [row]))
    assert data.examples[0] == {
        "messages": chat(
            ("system", "You are a translator."),
            ("user", "Translate to French: hello"),
            ("assistant", "bonjour"),
            ("user", "And: thanks"),
            ("assistant", "merci"),
            ("user", "Translate to French.\n\ngood night"),
            ("assistant", "bonne nuit"),
        ),
        "tools": None,
    }


@pytest.mark.parametrize("history", ["not a list", [["only one"]], [["q", 5]]])
def test_alpaca_bad_history_is_refused(tmp_path, history):
    path = write_json(tmp_path / "a.json", [{"instruction": "q", "output": "a", "history": history}])
    assert "row 1: 'history' must be a list of [prompt, response] pairs" in load_error(path)


def test_alpaca_needs_a_prompt(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "", "input": "", "output": "a"}])
    assert "both 'instruction' and 'input' are empty" in load_error(path)


def test_alpaca_numbers_become_text_and_other_types_are_refused(tmp_path):
    assert load(write_json(tmp_path / "n.json", [{"instruction": "2+2?", "output": 4}])).examples[0]["messages"][1] == {
        "role": "assistant",
        "content": "4",
    }
    path = write_json(tmp_path / "b.json", [{"instruction": "q", "output": ["a"]}])
    assert "'output' (column 'output') must be text, got list" in load_error(path)


def test_prompt_completion_rows(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}])
    data = load(path)
    assert data.format == "alpaca"
    assert data.examples[0]["messages"] == chat(("user", "Capital of France?"), ("assistant", "Paris"))


def test_alpaca_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because.", "persona": "Be terse."}])
    data = load(path, format="alpaca", columns={"prompt": "question", "response": "answer", "system": "persona"})
    assert data.examples[0]["messages"] == chat(("system", "Be terse."), ("user", "Why?"), ("assistant", "Because."))


def test_sharegpt_system_turns_and_columns(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    data = load(write_json(tmp_path / "s.json", [row]))
    assert data.examples[0]["messages"] == chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello"))
    row = {"conversations": row["conversations"][1:], "system": "From a column."}
    data = load(write_json(tmp_path / "t.json", [row]))
    assert data.examples[0]["messages"][0] == {"role": "system", "content": "From a column."}


def test_sharegpt_several_calls_and_string_arguments(tmp_path):
    calls = [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "get_time", "arguments": "in Paris"},
    ]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather and time in Paris?"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "sunny; 14:00"},
            {"from": "gpt", "value": "Sunny, and it is 14:00."},
        ],
        "tools": {"name": "get_weather", "parameters": {}},
    }
    example = load(write_json(tmp_path / "s.json", [row])).examples[0]
    assert example["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_time", "arguments": "in Paris"}},
    ]
    assert example["messages"][2] == {"role": "tool", "content": "sunny; 14:00"}
    assert example["tools"] == [{"name": "get_weather", "parameters": {}}]


@pytest.mark.parametrize(
    ("turns", "tools", "expected"),
    [
        ([{"from": "bot", "value": "x"}], None, "turn 1 has 'from' = 'bot'; accepted: 'human', 'gpt'"),
        ([{"from": "human", "value": 3}], None, "turn 1: 'value' must be text"),
        ([{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather()"}], None, "not JSON"),
        ([{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"args": {}}'}], None, '{"name": ...'),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], None, "no assistant turn with content"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "[{broken", "'tools' is not valid JSON"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '["f"]', "'tools' must be a list"),
        ([], None, "'conversations' must be a non-empty list"),
    ],
)
def test_sharegpt_bad_rows_are_refused(tmp_path, turns, tools, expected):
    row = {"conversations": turns, **({"tools": tools} if tools is not None else {})}
    path = write_json(tmp_path / "s.json", [row])
    message = load_error(path, format="sharegpt")
    assert message.startswith("dataset s.json row 1: ")
    assert expected in message


def test_messages_rows_keep_tool_fields_and_map_role_aliases(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
    row = {
        "messages": [
            {"role": "developer", "content": "Be helpful."},
            {"role": "user", "content": "Look up x."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "x = 1", "tool_call_id": "c1", "name": "lookup"},
            {"role": "assistant", "content": "x is 1."},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "lookup"}}]),
    }
    example = load(write_jsonl(tmp_path / "m.jsonl", [row])).examples[0]
    assert example["messages"] == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Look up x."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "x = 1", "tool_call_id": "c1", "name": "lookup"},
        {"role": "assistant", "content": "x is 1."},
    ]
    assert example["tools"] == [{"type": "function", "function": {"name": "lookup"}}]


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        ([{"role": "narrator", "content": "x"}], "turn 1 has role 'narrator'; accepted: system, user, assistant, tool"),
        ([{"content": "x"}], "turn 1 must be an object with 'role' and 'content'"),
        ([{"role": "user", "content": ["parts"]}], "turn 1: 'content' must be text"),
        ([{"role": "user", "content": "q"}], "no assistant turn with content"),
    ],
)
def test_messages_bad_rows_are_refused(tmp_path, turns, expected):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    assert expected in load_error(path)


def test_text_rows_need_text(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "   "}])
    assert "line 2: 'text' is empty" in load_error(path)


def test_format_given_in_the_spec_is_used(tmp_path):
    # Detection would say alpaca; the spec says the 'output' column is plain text.
    path = write_jsonl(tmp_path / "o.jsonl", [{"output": "just text"}])
    data = load(path, format="text", columns={"text": "output"})
    assert data.format == "text"
    assert data.examples == [{"text": "just text"}]


# ---------------------------------------------------------------------------------------------- eval split


def test_split_eval_is_deterministic_disjoint_and_complete():
    examples = [{"text": f"row {i}"} for i in range(100)]
    train, held = split_eval(examples, 0.1, seed=42)
    again = split_eval(examples, 0.1, seed=42)
    assert (train, held) == again
    assert len(held) == 10 and len(train) == 90
    texts_train = {e["text"] for e in train}
    texts_held = {e["text"] for e in held}
    assert not texts_train & texts_held
    assert texts_train | texts_held == {e["text"] for e in examples}
    # Both sides keep the original order.
    assert held == sorted(held, key=lambda e: int(e["text"].split()[1]))
    assert train == sorted(train, key=lambda e: int(e["text"].split()[1]))
    assert split_eval(examples, 0.1, seed=7)[1] != held


def test_split_eval_edge_cases():
    examples = [{"text": str(i)} for i in range(3)]
    assert split_eval(examples, 0.0, seed=1) == (examples, [])
    assert split_eval(examples[:1], 0.5, seed=1) == (examples[:1], [])
    train, held = split_eval(examples[:2], 0.01, seed=1)
    assert len(train) == 1 and len(held) == 1  # at least one row each side
    train, held = split_eval(examples, 0.5, seed=1)
    assert len(held) == 2 and len(train) == 1


@pytest.mark.parametrize(
    ("rows", "held"),
    [(1, 0), (17, 0), (18, 4), (20, 4), (30, 6), (40, 8), (96, 10), (150, 15), (1000, 100), (5000, 200)],
)
def test_auto_hold_out_has_a_floor_a_share_cap_and_a_ceiling(rows, held):
    assert held_out_count(rows, "auto") == held
    train, held_rows = split_eval([{"text": str(i)} for i in range(rows)], "auto", seed=3)
    assert len(held_rows) == held and len(train) == rows - held


# ---------------------------------------------------------------------------------------------- tokenizing


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model: Path):
    """The same tokenizer with a template that has no {% generation %} markers, like most hub templates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", tok.chat_template)
    return tok


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded text of each contiguous run of masked tokens."""
    runs, current = [], []
    for token, on in zip(ids, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


MULTI_TURN = chat(
    ("system", "You are a cook."),
    ("user", "How long do I boil an egg?"),
    ("assistant", "About nine minutes for a hard egg."),
    ("user", "And a soft one?"),
    ("assistant", "Six minutes, then cold water."),
)


def test_template_markers_are_detected(tokenizer, plain_tokenizer):
    assert has_generation_markers(tokenizer)
    assert not has_generation_markers(plain_tokenizer)
    assert "endgeneration" in tokenizer.chat_template
    assert "endgeneration" not in plain_tokenizer.chat_template


def test_native_masks_cover_exactly_the_assistant_turns(tokenizer):
    row = tokenize_chat({"messages": MULTI_TURN, "tools": None}, tokenizer, assistant_only=True, native_masks=True)
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert len(ids) == len(mask)
    assert masked_runs(tokenizer, ids, mask) == [
        "About nine minutes for a hard egg.<|im_end|>",
        "Six minutes, then cold water.<|im_end|>",
    ]
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "How long do I boil an egg?" in unmasked and "You are a cook." in unmasked
    assert "nine minutes" not in unmasked
    assert ids == tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=True)["input_ids"]


def test_prefix_fallback_gives_the_native_mask(tokenizer, plain_tokenizer):
    native = tokenize_chat({"messages": MULTI_TURN, "tools": None}, tokenizer, True, native_masks=True)
    fallback = _tokenize_by_prefixes(MULTI_TURN, None, plain_tokenizer)
    assert fallback["input_ids"] == native["input_ids"]
    assert fallback["assistant_masks"] == native["assistant_masks"]
    assert masked_runs(plain_tokenizer, fallback["input_ids"], fallback["assistant_masks"]) == [
        "About nine minutes for a hard egg.<|im_end|>",
        "Six minutes, then cold water.<|im_end|>",
    ]


def test_prefix_fallback_matches_native_on_tool_calls(llamafactory, shared_roots, tokenizer, plain_tokenizer):
    examples = load(llamafactory / "glaive_toolcall_en_demo.json", shared_roots, max_rows=8).examples
    native = tokenize_examples(examples, tokenizer)
    fallback = tokenize_examples(examples, plain_tokenizer)  # no markers: tokenize_examples takes the fallback
    assert native["input_ids"] == fallback["input_ids"]
    assert native["assistant_masks"] == fallback["assistant_masks"]
    runs = masked_runs(tokenizer, native["input_ids"][0], native["assistant_masks"][0])
    assert runs[1] == (
        '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}'
        "\n</tool_call><|im_end|>"
    )
    assert len(runs) == sum(m["role"] == "assistant" for m in examples[0]["messages"])
    decoded = tokenizer.decode(native["input_ids"][0])
    assert "# Tools" in decoded and "search_recipes" in decoded.split("<|im_start|>user")[0]


def test_prefix_fallback_refuses_templates_that_rewrite_earlier_turns(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Marks the last message: a turn renders differently once a later turn follows it.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RowError, match="renders earlier turns differently"):
        _tokenize_by_prefixes(MULTI_TURN, None, tok)


def test_tokenize_examples_chat_dataset(llamafactory, shared_roots, tokenizer):
    examples = load(llamafactory / "alpaca_en_demo.json", shared_roots, max_rows=5).examples
    dataset = tokenize_examples(examples, tokenizer)
    assert len(dataset) == 5
    assert set(dataset.column_names) == {"input_ids", "assistant_masks"}
    for example, ids, mask in zip(examples, dataset["input_ids"], dataset["assistant_masks"], strict=True):
        assert masked_runs(tokenizer, ids, mask) == [example["messages"][-1]["content"] + "<|im_end|>"]


def test_tokenize_without_assistant_only_learns_every_token(tokenizer, plain_tokenizer):
    example = {"messages": MULTI_TURN, "tools": None}
    for tok in (tokenizer, plain_tokenizer):
        row = tokenize_chat(example, tok, assistant_only=False, native_masks=has_generation_markers(tok))
        assert row["assistant_masks"] == [1] * len(row["input_ids"])
        assert row["input_ids"] == tokenize_chat(example, tokenizer, True, True)["input_ids"]


def test_text_rows_get_bos_and_eos_and_no_mask(tokenizer):
    examples = [{"text": "Plain text for continued pre-training."}, {"text": "A second document."}]
    dataset = tokenize_examples(examples, tokenizer)
    assert dataset.column_names == ["input_ids"]
    for example, ids in zip(examples, dataset["input_ids"], strict=True):
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[1:-1]) == example["text"]
        assert tokenizer.bos_token_id not in ids[1:] and tokenizer.eos_token_id not in ids[:-1]
    assert tokenize_text(examples[0], tokenizer)["input_ids"] == dataset["input_ids"][0]


def test_text_rows_from_c4_tokenize(llamafactory, shared_roots, tokenizer):
    examples = load(llamafactory / "c4_demo.jsonl", shared_roots, max_rows=3).examples
    dataset = tokenize_examples(examples, tokenizer)
    assert len(dataset) == 3
    for example, ids in zip(examples, dataset["input_ids"], strict=True):
        assert tokenizer.decode(ids) == f"{tokenizer.bos_token}{example['text']}{tokenizer.eos_token}"


def test_tokenize_no_examples_gives_an_empty_dataset(tokenizer):
    dataset = tokenize_examples([], tokenizer)
    assert len(dataset) == 0
    assert dataset.column_names == ["input_ids"]

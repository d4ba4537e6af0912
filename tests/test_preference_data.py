"""Preference data in the forms people have (TRL's, LLaMA-Factory's ranking and KTO entries), what analyze_dataset
says about it, and every new field and format refused by name when it is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtuner_core.config import DatasetSpec, parse_train_config
from lmtuner_core.data.analysis import analyze_dataset
from lmtuner_core.data.datasets import DatasetError, load_examples
from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import AllowedRoots

USER = [{"role": "user", "content": "2+2?"}]
GOOD, BAD = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
PAIR = {"prompt": USER, "chosen": GOOD, "rejected": BAD, "tools": None}


def load(tmp_path: Path, rows: list, name: str = "rows.jsonl", **spec) -> object:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_examples(DatasetSpec(path=str(path), **spec), AllowedRoots([tmp_path]))


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"prompt": USER, "chosen": GOOD, "rejected": BAD}, "preference", PAIR),
        ({"prompt": "2+2=", "chosen": "4", "rejected": "5"},
         "preference", {"prompt": "2+2=", "chosen": "4", "rejected": "5", "tools": None}),
        ({"chosen": USER + GOOD, "rejected": USER + BAD}, "preference", PAIR),  # TRL's implicit prompt
        ({"instruction": "2+2?", "chosen": "4", "rejected": "5"}, "alpaca-ranking", PAIR),
        ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
          "rejected": {"from": "gpt", "value": "5"}}, "sharegpt-ranking", PAIR),
        ({"prompt": "2+2=", "completion": "4", "label": True},
         "kto", {"prompt": "2+2=", "completion": "4", "label": True, "tools": None}),
        ({"prompt": USER, "completion": GOOD, "label": "false"},
         "kto", {"prompt": USER, "completion": GOOD, "label": False, "tools": None}),
    ],
)  # fmt: skip
def test_each_preference_form_reads_into_trl_normal_form(tmp_path, row, fmt, expected):
    loaded = load(tmp_path, [row, row])
    assert loaded.format == fmt
    assert loaded.examples[0] == expected


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "2+2=", "chosen": "4", "rejected": "4"}, "'chosen' and 'rejected' are the same answer"),
        ({"prompt": "2+2=", "chosen": GOOD, "rejected": "5"}, "the prompt is text but 'chosen' is list"),
        ({"prompt": "2+2=", "chosen": " ", "rejected": "5"}, "'chosen' is empty"),
        ({"prompt": "2+2=", "chosen": "4", "rejected": None}, "missing 'rejected'"),
        ({"prompt": "", "chosen": "4", "rejected": "5"}, "'prompt' is empty"),
        ({"prompt": USER + GOOD, "chosen": GOOD, "rejected": BAD}, "'prompt' ends on an assistant turn"),
        ({"prompt": USER, "chosen": [{"role": "user", "content": "4"}], "rejected": BAD},
         "'chosen' turn 1 has role 'user'; accepted here: assistant"),
        ({"chosen": "4", "rejected": "5"}, "missing 'prompt'"),
        ({"chosen": [{"role": "user", "content": "a"}, *GOOD], "rejected": [{"role": "user", "content": "b"}, *BAD]},
         "do not start with the same user turn"),
        ({"instruction": "2+2?", "chosen": ["4"], "rejected": "5"}, "'chosen' must be the answer's text"),
        ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "human", "value": "4"},
          "rejected": {"from": "gpt", "value": "5"}}, "'chosen' is a 'human' turn; it must be the assistant's"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
          "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
         "must end on the user's turn"),
        ({"prompt": "2+2=", "completion": "4", "label": "maybe"}, "'label' is 'maybe'; it must be true"),
        ({"prompt": "2+2=", "completion": "", "label": True}, "'completion' is empty"),
    ],
)  # fmt: skip
def test_a_bad_preference_row_is_named_with_its_line_and_field(tmp_path, row, message):
    with pytest.raises(DatasetError) as caught:
        load(tmp_path, [row, row])  # the format is read from the first row's keys, as for every format
    text = str(caught.value)
    assert "rows.jsonl line 1" in text and message in text, text


def test_a_bad_row_can_be_skipped_and_counted(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}]
    loaded = load(tmp_path, rows, skip_bad_rows=True)
    assert len(loaded.examples) == 1 and "same answer" in loaded.skipped[0]


def llamafactory_folder(tmp_path: Path) -> Path:
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}], "chosen": {"from": "gpt", "value": "yes"},
             "rejected": {"from": "gpt", "value": "no"}} for i in range(3)]  # fmt: skip
    kto = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": i % 2 == 0}
           for i in range(4)]  # fmt: skip
    alpaca = [{"instruction": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    (tmp_path / "dpo.json").write_text(json.dumps(rows))
    (tmp_path / "kto.json").write_text(json.dumps(kto))
    (tmp_path / "rank.json").write_text(json.dumps(alpaca))
    info = {  # as LLaMA-Factory's data/dataset_info.json writes these entries
        "dpo_demo": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_demo": {"file_name": "kto.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}},
        "rank_demo": {"file_name": "rank.json", "ranking": True,
                      "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


@pytest.mark.parametrize(
    ("name", "fmt"), [("dpo_demo", "sharegpt-ranking"), ("kto_demo", "kto"), ("rank_demo", "alpaca-ranking")]
)
def test_llamafactory_preference_entries_read_by_name(tmp_path, name, fmt):
    folder = llamafactory_folder(tmp_path)
    loaded = load_examples(DatasetSpec(name=name, dataset_dir=str(folder)), AllowedRoots([tmp_path]))
    assert loaded.format == fmt
    first = loaded.examples[0]
    assert first["prompt"][0]["role"] == "user"
    if fmt == "kto":
        assert first["completion"] == [{"role": "assistant", "content": "a"}] and first["label"] is True
    else:
        assert first["chosen"] == [{"role": "assistant", "content": "yes"}]


def test_analysis_names_the_format_the_stages_and_a_length_bias(tmp_path, tiny_model):
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "chosen": [{"role": "assistant", "content": "ok"}],
             "rejected": [{"role": "assistant", "content": f"well, {i} is a number I could say at length"}]}
            for i in range(12)]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    analysis = analyze_dataset(DatasetSpec(path=str(path)), AllowedRoots([tmp_path]), str(tiny_model))
    assert analysis.format == "preference" and analysis.rows == 12
    assert analysis.stages[0] == "dpo" and "reward" in analysis.stages and "sft" not in analysis.stages
    assert analysis.token_lengths.max > analysis.token_lengths.p50 > 10  # the longer (rejected) sequence
    assert any("shorter than the rejected one in 100% of pairs" in p for p in analysis.problems), analysis.problems
    kto = tmp_path / "kto.jsonl"
    kto.write_text("".join(json.dumps({"prompt": "q", "completion": f"a{i}", "label": True}) + "\n" for i in range(4)))
    one_sided = analyze_dataset(DatasetSpec(path=str(kto)), AllowedRoots([tmp_path]))
    assert one_sided.stages == ["kto"] and any("every row is labelled desirable" in p for p in one_sided.problems)


BASE = {"model": "m", "dataset": "d.jsonl"}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"stage": "dpo", "preference": {"beta": 0}}, ["preference.beta", "greater than 0"]),
        ({"stage": "dpo", "preference": {"beta": "high"}}, ["preference.beta"]),
        ({"stage": "dpo", "preference": {"loss_type": "dpo"}}, ["preference.loss_type", "'sigmoid'", "'ipo'"]),
        ({"stage": "orpo", "preference": {"loss_type": "ipo"}}, ["preference.loss_type applies to stage dpo"]),
        ({"stage": "dpo", "preference": {"simpo_gamma": 1}}, ["preference.simpo_gamma applies to stage simpo"]),
        ({"stage": "simpo", "preference": {"simpo_gamma": -1}}, ["preference.simpo_gamma"]),
        ({"stage": "dpo", "preference": {"desirable_weight": 2}}, ["preference.desirable_weight applies to stage kto"]),
        ({"stage": "kto", "preference": {"undesirable_weight": 0}}, ["preference.undesirable_weight"]),
        ({"stage": "sft", "preference": {"beta": 0.1}}, ["preference.beta applies to stage", "not 'sft'"]),
        ({"stage": "dpo", "preference": {"betta": 0.1}}, ["unknown key 'betta'", "did you mean 'beta'"]),
        ({"stage": "DPO"}, ["stage", "'dpo'"]),
        ({"stage": "reward", "method": "freeze"}, ["stage:", "'reward' cannot train with 'freeze'", "use one of"]),
        ({"dataset": {"path": "d.jsonl", "format": "ranking"}}, ["dataset.format", "'preference'", "'kto'"]),
        ({"dataset": {"path": "d.jsonl", "columns": {"chosen": 3}}}, ["dataset.columns"]),
    ],
)  # fmt: skip
def test_bad_preference_settings_are_refused_naming_the_field(overrides, words):
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({**BASE, **overrides})
    message = str(caught.value)
    for word in words:
        assert word in message, message

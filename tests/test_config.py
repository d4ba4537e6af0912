"""Tests for lmtuner_core.config: the TrainConfig schema and the two ways configs come in (dicts and files)."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from lmtuner_core.config import (
    DatasetSpec,
    DeepSpeedSettings,
    LoraSettings,
    RopeScaling,
    TrainConfig,
    load_train_config_file,
    parse_train_config,
)
from lmtuner_core.errors import LmtunerError
from lmtuner_core.methods import METHODS

MINIMAL = {"model": "./models/tiny", "dataset": "data/train.jsonl"}


def config(**overrides) -> TrainConfig:
    return parse_train_config({**MINIMAL, **overrides})


def config_error(data) -> str:
    with pytest.raises(LmtunerError) as info:
        parse_train_config(data)
    return str(info.value)


# ------------------------------------------------------------------------------------------- defaults


def test_minimal_config_gets_practitioner_defaults():
    cfg = parse_train_config(dict(MINIMAL))
    assert cfg.method == "lora"
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.lora == LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    assert cfg.dataset == DatasetSpec(path="data/train.jsonl")
    assert cfg.dataset.format == "auto"
    assert cfg.deepspeed is None and cfg.rope_scaling is None
    assert cfg.report_to == []
    assert cfg.assistant_only_loss is True
    assert cfg.trust_remote_code is False


@pytest.mark.parametrize("method", sorted(METHODS))
def test_learning_rate_default_depends_on_method(method):
    assert config(method=method).learning_rate == pytest.approx(METHODS[method].learning_rate)


def test_method_defaults_differ_between_full_and_lora():
    assert config(method="full").learning_rate == pytest.approx(2e-5)
    assert config(method="lora").learning_rate == pytest.approx(2e-4)
    assert config(method="freeze").learning_rate == pytest.approx(5e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_explicit_learning_rate_is_kept(method):
    assert config(method=method, learning_rate=3e-6).learning_rate == pytest.approx(3e-6)


def test_explicit_null_learning_rate_means_default():
    assert config(method="full", learning_rate=None).learning_rate == pytest.approx(2e-5)


def test_json_round_trip_is_identical():
    cfg = config(
        method="dora",
        dataset={"path": "d.jsonl", "format": "sharegpt", "eval_fraction": 0.1, "columns": {"messages": "conv"}},
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        deepspeed={"stage": 3, "offload_params": True},
        rope_scaling={"type": "yarn", "factor": 4},
        report_to="tensorboard",
        max_steps=10,
    )
    again = parse_train_config(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.learning_rate == pytest.approx(2e-4)
    assert json.loads(cfg.to_json())["dataset"]["columns"] == {"messages": "conv"}


# ------------------------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_is_named_with_accepted_keys_and_a_suggestion():
    message = config_error({**MINIMAL, "learning_rte": 1e-4})
    assert "unknown key 'learning_rte'" in message
    assert "did you mean 'learning_rate'?" in message
    accepted = message.split("accepted keys:")[1]
    for key in TrainConfig.model_fields:
        assert key in accepted


def test_unknown_key_without_close_match_has_no_suggestion():
    message = config_error({**MINIMAL, "zzzzzz": 1})
    assert "unknown key 'zzzzzz'" in message
    assert "did you mean" not in message


def test_unknown_nested_key_names_the_section_and_its_keys():
    message = config_error({**MINIMAL, "lora": {"rank": 4}})
    assert message.startswith("invalid config: lora: unknown key 'rank'")
    assert "accepted keys: r, alpha, dropout, target_modules" in message


def test_unknown_dataset_key_lists_dataset_keys():
    message = config_error({**MINIMAL, "dataset": {"path": "a.jsonl", "split": "train"}})
    assert "dataset: unknown key 'split'" in message
    for key in DatasetSpec.model_fields:
        assert key in message


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (LoraSettings, {"rank": 1}),
        (DeepSpeedSettings, {"zero": 2}),
        (RopeScaling, {"type": "yarn", "factor": 2, "original": 4096}),
        (DatasetSpec, {"path": "x", "fmt": "alpaca"}),
    ],
)
def test_every_section_rejects_unknown_keys(model: type[BaseModel], data):
    with pytest.raises(ValidationError, match="accepted keys"):
        model.model_validate(data)


@pytest.mark.parametrize("model", [TrainConfig, DatasetSpec, LoraSettings, DeepSpeedSettings, RopeScaling])
def test_every_field_has_a_description(model: type[BaseModel]):
    missing = [name for name, info in model.model_fields.items() if not info.description]
    assert missing == []


# ------------------------------------------------------------------------------------------- shorthands


def test_dataset_string_is_a_path():
    cfg = config(dataset="some/file.csv")
    assert cfg.dataset.path == "some/file.csv"
    assert cfg.dataset.name is None


def test_dataset_object_keeps_its_settings():
    cfg = config(dataset={"name": "alpaca_en_demo", "dataset_dir": "data", "eval_fraction": 0.05, "max_rows": 10})
    assert cfg.dataset.name == "alpaca_en_demo"
    assert cfg.dataset.path is None
    assert cfg.dataset.dataset_dir == "data"
    assert cfg.dataset.eval_fraction == 0.05
    assert cfg.dataset.max_rows == 10


def test_dataset_of_wrong_type_is_refused_naming_dataset():
    assert config_error({**MINIMAL, "dataset": 5}).startswith("invalid config: dataset:")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("wandb", ["wandb"]), ("tensorboard", ["tensorboard"]), ("none", []), (None, []), ([], [])],
)
def test_report_to_shorthand(value, expected):
    assert config(report_to=value).report_to == expected


def test_report_to_list_is_kept():
    assert config(report_to=["wandb", "tensorboard"]).report_to == ["wandb", "tensorboard"]


def test_report_to_unknown_tracker_is_refused():
    message = config_error({**MINIMAL, "report_to": "mlflow"})
    assert "report_to" in message
    assert "'wandb' or 'tensorboard'" in message


# ------------------------------------------------------------------------------------------- cross-field rules


def test_dataset_needs_path_or_name():
    message = config_error({**MINIMAL, "dataset": {"format": "alpaca"}})
    assert "dataset: give exactly one of `path`" in message


def test_dataset_refuses_both_path_and_name():
    message = config_error({**MINIMAL, "dataset": {"path": "a.json", "name": "alpaca_en_demo"}})
    assert "dataset: give exactly one of `path`" in message
    with pytest.raises(ValidationError):
        DatasetSpec(path="a.json", name="b")


def test_offload_params_needs_stage_3():
    message = config_error({**MINIMAL, "deepspeed": {"stage": 2, "offload_params": True}})
    assert "deepspeed: offload_params needs stage 3" in message
    cfg = config(deepspeed={"stage": 3, "offload_params": True, "offload_optimizer": True})
    assert cfg.deepspeed == DeepSpeedSettings(stage=3, offload_params=True, offload_optimizer=True)


def test_offload_optimizer_works_at_any_stage():
    assert config(deepspeed={"stage": 1, "offload_optimizer": True}).deepspeed.offload_optimizer is True


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"method": "lora-4bit"}, "method"),
        ({"precision": "int8"}, "precision"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"max_seq_len": 8}, "max_seq_len"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"seed": -1}, "seed"),
        ({"deepspeed": {"stage": 4}}, "deepspeed.stage"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"target_modules": "all"}}, "lora.target_modules"),
        ({"rope_scaling": {"type": "yarn", "factor": 1.0}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "longrope", "factor": 2}}, "rope_scaling.type"),
        ({"rope_scaling": {"factor": 2}}, "rope_scaling.type"),
        ({"dataset": {"path": "a", "format": "csv"}}, "dataset.format"),
        ({"dataset": {"path": "a", "eval_fraction": 0.9}}, "dataset.eval_fraction"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides, field):
    message = config_error({**MINIMAL, **overrides})
    assert message.startswith(f"invalid config: {field}")
    assert "https://" not in message  # no pydantic URLs in user-facing messages


def test_missing_required_fields_are_named():
    message = config_error({"method": "lora"})
    assert "model: Field required" in message
    assert "dataset: Field required" in message


def test_several_problems_are_reported_together():
    message = config_error({**MINIMAL, "batch_size": 0, "precision": "int8"})
    assert "batch_size:" in message
    assert "precision:" in message


def test_rejected_values_are_not_echoed():
    # hide_input_in_errors: a secret pasted into the wrong field must not end up in logs.
    message = config_error({**MINIMAL, "precision": "sk-secret-token-value"})
    assert "sk-secret-token-value" not in message


def test_non_object_config_is_refused():
    with pytest.raises(LmtunerError, match="must be an object"):
        parse_train_config(["model", "dataset"])
    with pytest.raises(LmtunerError, match=r"start_training\.config must be an object"):
        parse_train_config("model: x", source="start_training.config")


def test_source_names_where_the_config_came_from():
    with pytest.raises(LmtunerError, match=r"^invalid tool input: model: Field required"):
        parse_train_config({"dataset": "d.jsonl"}, source="tool input")


# ------------------------------------------------------------------------------------------- files


def test_load_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**MINIMAL, "method": "full", "max_steps": 5}), encoding="utf-8")
    cfg = load_train_config_file(path)
    assert cfg.method == "full"
    assert cfg.max_steps == 5
    assert cfg.learning_rate == pytest.approx(2e-5)


def test_load_yaml_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: ./models/tiny\n"
        "dataset:\n  path: data/train.jsonl\n  eval_fraction: 0.1\n"
        "method: qlora\n"
        "report_to: wandb\n"
        "deepspeed:\n  stage: 3\n  offload_params: true\n",
        encoding="utf-8",
    )
    cfg = load_train_config_file(str(path))
    assert cfg.dataset.eval_fraction == 0.1
    assert cfg.method == "qlora"
    assert cfg.report_to == ["wandb"]
    assert cfg.deepspeed.offload_params is True


def test_yml_suffix_is_yaml_too(tmp_path):
    path = tmp_path / "train.yml"
    path.write_text("model: m\ndataset: d.jsonl\n", encoding="utf-8")
    assert load_train_config_file(path).dataset.path == "d.jsonl"


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(LmtunerError, match="cannot read config file") as info:
        load_train_config_file(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{\n  "model": "m",\n  "dataset": "d.jsonl",\n}\n', encoding="utf-8")
    with pytest.raises(LmtunerError, match=r"not valid JSON \(line 4"):
        load_train_config_file(path)


def test_invalid_yaml_is_refused(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: [unclosed\ndataset: d\n", encoding="utf-8")
    with pytest.raises(LmtunerError, match="is not valid YAML"):
        load_train_config_file(path)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("- model\n- dataset\n", encoding="utf-8")
    with pytest.raises(LmtunerError, match="must be an object") as info:
        load_train_config_file(path)
    assert str(path) in str(info.value)


def test_file_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**MINIMAL, "lora": {"r": 8, "alph": 16}}), encoding="utf-8")
    with pytest.raises(LmtunerError) as info:
        load_train_config_file(path)
    message = str(info.value)
    assert message.startswith(f"invalid config file {path}: lora: unknown key 'alph'")
    assert "did you mean 'alpha'?" in message

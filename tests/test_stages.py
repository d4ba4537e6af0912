"""The stage registry: TrainConfig's `stage`, its defaults and refusals, and the dispatch to each stage's recipe."""

from __future__ import annotations

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.errors import LmtunerError
from lmtuner_core.methods import METHOD_NAMES
from lmtuner_core.stages import STAGE_NAMES, STAGES, recipe_class, stage_refusal

BASE = {"model": "m", "dataset": "d.jsonl"}
GRADERS = {"grpo": {"graders": [{"type": "length", "max_chars": 20}]}}  # what a stage needs beyond model and data


def test_stage_defaults_to_sft_with_the_method_learning_rate():
    config = parse_train_config(BASE)
    assert config.stage == "sft"
    assert config.learning_rate == 2e-4


def test_every_stage_named_in_the_contract_is_in_the_schema():
    assert set(STAGE_NAMES) >= {"sft", "dpo", "orpo", "kto", "simpo", "grpo", "reward"}


def test_unknown_stage_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({**BASE, "stage": "ppo"})
    message = str(caught.value)
    assert "stage" in message and "'dpo'" in message and "'sft'" in message


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_stage_has_a_recipe_class_or_says_why_not(stage):
    spec = STAGES[stage]
    if spec.not_yet:
        with pytest.raises(LmtunerError, match=f"stage: '{stage}' is not available"):
            parse_train_config({**BASE, "stage": stage})
        return
    cls = recipe_class(stage)
    for step in ("setup", "train", "save", "report"):
        assert callable(getattr(cls, step)), f"{cls.__name__} lacks {step}()"


@pytest.mark.parametrize("stage", STAGE_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_refused_combination_names_stage_method_and_what_to_use(stage, method):
    refusal = stage_refusal(stage, method)
    if refusal is None:
        parse_train_config({**BASE, **GRADERS.get(stage, {}), "stage": stage, "method": method})
        return
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({**BASE, **GRADERS.get(stage, {}), "stage": stage, "method": method})
    message = str(caught.value)
    assert "stage:" in message and repr(stage) in message
    if not STAGES[stage].not_yet:
        assert repr(method) in message and "use one of" in message

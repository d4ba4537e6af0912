"""The search space of a sweep: which recipe settings it may vary, checked against the centre config before
anything starts, and each trial's config built from the centre and the values Ray Tune drew.

Standard library and pydantic only: the server checks a sweep without importing Ray. A space is a mapping of
parameter (dotted for nested settings: `lora.r`) to a list of values (drawn uniformly) or a range
{min, max, log}; `ray_space` turns it into Ray Tune's sampling functions inside the sweep's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lmtuner_core.config import TrainConfig, format_validation_error
from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.methods import METHODS


@dataclass(frozen=True)
class Searchable:
    kind: type  # float, int, bool, str, or list (target modules): ranges only for int and float
    adapter_only: bool = False  # LoRA-family settings: refused for methods without an adapter
    about: str = ""


SEARCHABLE: dict[str, Searchable] = {
    "learning_rate": Searchable(float, about="peak learning rate"),
    "num_epochs": Searchable(float, about="passes over the data"),
    "max_steps": Searchable(int, about="optimizer steps (instead of num_epochs)"),
    "lora.r": Searchable(int, True, "LoRA rank; alpha follows it at the centre's alpha/r unless searched too"),
    "lora.alpha": Searchable(int, True, "LoRA alpha"),
    "lora.dropout": Searchable(float, True, "LoRA dropout"),
    "lora.target_modules": Searchable(list, True, "'all-linear' or a list of module names"),
    "assistant_only_loss": Searchable(bool, about="learn only the assistant's turns"),
    "warmup_ratio": Searchable(float),
    "weight_decay": Searchable(float),
    "lr_scheduler": Searchable(str),
    "batch_size": Searchable(int),
    "gradient_accumulation_steps": Searchable(int),
    "replay.share": Searchable(float, about="self-distillation replay share; 0 = no replay"),
}
MAX_VALUES = 64


def accepted_keys() -> str:
    return ", ".join(SEARCHABLE)


def centre_value(config: dict, key: str) -> Any:
    """The centre config's value of a (dotted) parameter; replay.share of a config without replay is 0."""
    if key == "replay.share":
        return (config.get("replay") or {}).get("share", 0.0)
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def apply_values(config: dict, values: dict[str, Any]) -> dict:
    """The config (a TrainConfig dump) with a trial's values set. LoRA alpha follows a searched rank at the centre's
    alpha/r ratio when alpha is not searched itself; max_steps and num_epochs are exclusive as in TrainConfig."""
    out = {**config, "lora": dict(config.get("lora") or {})}
    for key, value in values.items():
        if key == "replay.share":
            out["replay"] = None if not value else {**(config.get("replay") or {}), "share": value}
        elif key.startswith("lora."):
            out["lora"][key.removeprefix("lora.")] = value
        else:
            out[key] = value
    if "lora.r" in values and "lora.alpha" not in values and config.get("lora"):
        ratio = config["lora"]["alpha"] / config["lora"]["r"]
        out["lora"]["alpha"] = max(1, round(values["lora.r"] * ratio))
    if "num_epochs" in values and "max_steps" not in values:
        out["max_steps"] = None  # searching epochs means training by epochs
    return out


def _check_value(centre: dict, key: str, value: Any, field: str) -> Any:
    """The value as the trial's TrainConfig holds it, or a LmtunerError naming `field`."""
    spec = SEARCHABLE[key]
    if spec.kind is bool and not isinstance(value, bool):
        raise LmtunerError(f"{field}: {shown(value)} is not true or false", field=field)
    if spec.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise LmtunerError(f"{field}: {shown(value)} is not a number", field=field)
    if spec.kind is int and isinstance(value, float):
        if not value.is_integer():
            raise LmtunerError(f"{field}: {shown(value)} is not a whole number", field=field)
        value = int(value)
    if key == "replay.share" and value == 0:
        return 0.0
    try:
        TrainConfig.model_validate(apply_values(centre, {key: value}))
    except ValidationError as exc:
        raise LmtunerError(f"{field}: {shown(value)} is refused: {format_validation_error(exc)}", field=field) from None
    return value


def check_search(search: dict[str, Any] | None, centre: TrainConfig) -> dict[str, Any]:
    """The search space, each value checked against what TrainConfig accepts with the centre's other settings;
    a default space around the centre when none is given."""
    config = centre.model_dump()
    adapter = METHODS[centre.method].adapter
    if not search:
        search = default_search(centre)
    if not isinstance(search, dict):
        raise LmtunerError(
            f"search: expected an object of parameter -> values or range; accepted parameters: {accepted_keys()}",
            field="search",
        )
    checked: dict[str, Any] = {}
    for key, values in search.items():
        field = f"search.{key}"
        if key not in SEARCHABLE:
            raise LmtunerError(f"{field}: not a setting a sweep varies; accepted: {accepted_keys()}", field=field)
        spec = SEARCHABLE[key]
        if spec.adapter_only and not adapter:
            raise LmtunerError(
                f"{field}: method {centre.method!r} trains no LoRA adapter; search lora.* with a LoRA-family "
                "method (lora, dora, qlora, lora-8bit) or remove it",
                field=field,
            )
        if key == "max_steps" and "num_epochs" in search:
            raise LmtunerError(f"{field}: search max_steps or num_epochs, not both", field=field)
        if key == "num_epochs" and centre.max_steps:
            raise LmtunerError(
                f"{field}: the config trains by max_steps ({centre.max_steps}), which overrides epochs; search "
                "max_steps instead, or remove max_steps from the config",
                field=field,
            )
        if isinstance(values, list):
            if not values or len(values) > MAX_VALUES:
                raise LmtunerError(f"{field}: give 1 to {MAX_VALUES} values, e.g. [8, 16, 32]", field=field)
            checked[key] = [_check_value(config, key, v, f"{field}[{i}]") for i, v in enumerate(values)]
        elif isinstance(values, dict):
            checked[key] = _check_range(config, key, values, field)
        else:
            example = "{'min': 1e-5, 'max': 1e-3, 'log': true}" if spec.kind in (int, float) else "[true, false]"
            raise LmtunerError(
                f"{field}: {shown(values)} is neither a list of values nor a range; e.g. {example}", field=field
            )
    return checked


def _check_range(config: dict, key: str, values: dict, field: str) -> dict:
    spec = SEARCHABLE[key]
    if spec.kind not in (int, float):
        raise LmtunerError(f"{field}: a range needs a numeric setting; give a list of values instead", field=field)
    unknown = set(values) - {"min", "max", "log"}
    if unknown or "min" not in values or "max" not in values:
        raise LmtunerError(
            f"{field}: a range is {{'min': ..., 'max': ..., 'log': true|false}}"
            + (f"; unknown key {sorted(unknown)[0]!r}" if unknown else "; give min and max"),
            field=field,
        )
    low = _check_value(config, key, values["min"], f"{field}.min")
    high = _check_value(config, key, values["max"], f"{field}.max")
    log = values.get("log", False)
    if not isinstance(log, bool):
        raise LmtunerError(f"{field}.log: {shown(log)} is not true or false", field=f"{field}.log")
    if not low < high:
        raise LmtunerError(f"{field}: min ({low}) must be below max ({high})", field=field)
    if log and low <= 0:
        raise LmtunerError(f"{field}: a log range needs min above 0 (got {low})", field=field)
    return {"min": low, "max": high, "log": log}


def default_search(centre: TrainConfig) -> dict[str, Any]:
    """Around the centre: learning rate from a quarter to 4x (log scale), half to twice the epochs (or steps), and
    for LoRA ranks 8, 16 and 32 on the centre's modules or every linear layer."""
    lr = centre.learning_rate or 1e-4
    space: dict[str, Any] = {"learning_rate": {"min": lr / 4, "max": min(lr * 4, 1.0), "log": True}}
    if centre.max_steps:
        space["max_steps"] = sorted({max(1, centre.max_steps // 2), centre.max_steps, centre.max_steps * 2})
    else:
        space["num_epochs"] = sorted({centre.num_epochs / 2, centre.num_epochs, centre.num_epochs * 2})
    if METHODS[centre.method].adapter:
        space["lora.r"] = [8, 16, 32]
        modules = centre.lora.target_modules
        space["lora.target_modules"] = [modules] if modules == "all-linear" else [modules, "all-linear"]
    return space


def ray_space(search: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's sampling functions for a checked space (imports Ray: the sweep's process only)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, values in search.items():
        if isinstance(values, list):
            space[key] = tune.choice(values)
        elif SEARCHABLE[key].kind is int:
            # randint's upper bound is exclusive
            space[key] = (tune.lograndint if values["log"] else tune.randint)(values["min"], values["max"] + 1)
        else:
            space[key] = (tune.loguniform if values["log"] else tune.uniform)(values["min"], values["max"])
    return space


def centre_point(search: dict[str, Any], centre: TrainConfig) -> dict[str, Any]:
    """The centre config's values of the searched settings: the sweep's first trial."""
    config = centre.model_dump()
    point = {}
    for key in search:
        point[key] = centre_value(config, key)
    return point

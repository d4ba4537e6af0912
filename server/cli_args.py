"""A CLI command's options, built from its tool's signature: each parameter's name, type, choices, default and
help exist once, in the tool function, and the values are checked by the same argument model the MCP SDK builds
from that signature (so the CLI refuses exactly what an agent's call would be refused). argparse does the
parsing; this only translates the signature for it, which no library does for pydantic-annotated functions."""

from __future__ import annotations

import argparse
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lmtuner_core.errors import LmtunerError, format_validation_error

NOT_OPTIONS = ("ctx", "progress")  # filled in by the caller, never typed by the user
POSITIONAL = "_positional"  # where the parsed Namespace remembers which parameters were positional


def _unwrap(annotation: Any) -> tuple[Any, FieldInfo | None]:
    """(the type without Annotated and without None, the Field that describes it)."""
    info = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        info = next((e for e in extras if isinstance(e, FieldInfo)), None)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return annotation, info


def _is_model(annotation: Any) -> bool:
    """A pydantic model, or a union/list that holds one: given on the command line as JSON."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_is_model(a) for a in typing.get_args(annotation))


def _json_or_text(value: str) -> Any:
    """JSON for a model-typed option (`{…}` or `[…]`); anything else stays text (a path, say)."""
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    return value


def _name_value(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE, e.g. medical=runs/JOB/final")
    return name, rest


def _help(info: FieldInfo | None, default: Any) -> str:
    text = (info.description if info and info.description else "").replace("%", "%%")
    if default not in (inspect.Parameter.empty, None, False):
        text += f" (default: {default})"
    return text


def add_tool_arguments(
    parser: argparse.ArgumentParser,
    fn: Callable[..., Any],
    *,
    positional: tuple[str, ...] = (),
    aliases: dict[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """Adds one argument per parameter of the tool `fn`: `positional` ones in that order, the rest as
    --dashed-names (plus an older spelling from `aliases`, kept so existing scripts go on working). Values
    are left as typed: `tool_arguments` validates them."""
    aliases = aliases or {}
    signature = inspect.signature(fn, eval_str=True)
    parser.set_defaults(**{POSITIONAL: positional})
    for name in positional:
        annotation, info = _unwrap(signature.parameters[name].annotation)
        parser.add_argument(name, help=_help(info, inspect.Parameter.empty), type=_json_or_text)
    for name, param in signature.parameters.items():
        if name in NOT_OPTIONS or name in positional or name in exclude:
            continue
        annotation, info = _unwrap(param.annotation)
        flags = ["--" + name.replace("_", "-"), *([aliases[name]] if name in aliases else [])]
        spec: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(info, param.default)}
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if annotation is bool:
            spec["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            spec["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is dict:
            spec.update(action="append", type=_name_value, metavar="NAME=VALUE")
        elif item is not None and not _is_model(item):
            spec.update(action="append", metavar=name.rstrip("s").upper())
            if typing.get_origin(_unwrap(item)[0]) is Literal:
                spec["choices"] = list(typing.get_args(_unwrap(item)[0]))
        elif _is_model(annotation):
            spec.update(type=_json_or_text, metavar="JSON" if annotation is not str else None)
            if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # str | Model: a path or JSON
                spec["metavar"] = "PATH|JSON"
        if param.default is inspect.Parameter.empty:
            spec["required"] = True
        parser.add_argument(*flags, **spec)


def tool_arguments(fn: Callable[..., Any], args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for `fn` from parsed `args`, validated by the MCP SDK's argument model for `fn`
    (its Field limits included); a refusal names the option and what it accepts."""
    from mcp.server.mcpserver.utilities.func_metadata import func_metadata

    signature = inspect.signature(fn, eval_str=True)
    positional = getattr(args, POSITIONAL, ())
    given = {}
    for name in signature.parameters:
        if name in NOT_OPTIONS or not hasattr(args, name):
            continue
        value = getattr(args, name)
        given[name] = dict(value) if isinstance(value, list) and value and isinstance(value[0], tuple) else value
    arg_model = func_metadata(fn, skip_names=NOT_OPTIONS).arg_model
    try:
        validated = arg_model.model_validate(given)
    except ValidationError as exc:
        message = format_validation_error(exc, prefix="\0")
        for name in given:  # name each value as the user typed it: --max-new-tokens, or the positional's name
            option = name if name in positional else "--" + name.replace("_", "-")
            message = message.replace(f"\0{name}", option)
        raise LmtunerError(message.replace("\0", "--")) from None
    return {name: value for name, value in validated.model_dump_one_level().items() if name in given}

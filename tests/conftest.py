"""Shared fixtures: a tiny model built once per session, a private $LMTUNER_HOME per test, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer with a chat template (built offline, ~0.1 s after imports)."""
    from lmtuner_core.training.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def lmtuner_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LMTUNER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared reference data not found at {SHARED_DATA} (it sits beside the repository)")
    return SHARED_DATA


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYDANTIC_ERRORS_INCLUDE_URL", "0")
    # The tool listing every server start reads (server/tool_cache.py) is kept for this session only: built by the
    # first start, shared by the servers of every test after it (as by a user's homes), never the user's own.
    import tempfile

    os.environ["LMTUNER_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmtuner-test-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.get("LMTUNER_CACHE_DIR", ""), ignore_errors=True)

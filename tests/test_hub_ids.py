"""Hub ids through a real MCP client with downloads off: a cached model works, an uncached one is refused with
the way out (the Hugging Face cache layout is built here from the tiny model, as `hf download` would leave it)."""

from __future__ import annotations

import shutil

import anyio

from tests.helpers import call_error, call_ok, stdio_client


def test_offline_hub_ids_resolve_through_the_cache_or_say_how_to_fix_it(
    tmp_path, lmtuner_home, tiny_model, monkeypatch
):
    cache = tmp_path / "hub"
    repo = cache / "models--lmtuner-test--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    async def scenario():
        async with stdio_client(lmtuner_home, [tmp_path]) as client:
            cached = await call_ok(
                client,
                "generate",
                {"model": "lmtuner-test/tiny", "prompts": ["What is 3 plus 4?"], "max_new_tokens": 4},
            )
            missing = await call_error(client, "generate", {"model": "lmtuner-test/absent", "prompts": ["hi"]})
            return cached, missing

    cached, missing = anyio.run(scenario)
    assert cached["outputs"][0]["text"] is not None
    assert "'lmtuner-test/absent' is not in the Hugging Face cache" in missing and str(cache) in missing, missing
    assert "HF_HUB_OFFLINE" in missing and ".gguf" in missing and "local model folder" in missing, missing

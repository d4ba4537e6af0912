"""Generation throughput (issue #8): the embedded transformers engine vs our vLLM server (serve_model) on CPU,
at batch 1 and 32, greedy float32, for the tiny model and a ~21M-parameter random Llama built locally.

Both engines get the same prompts through lmtuner's own code paths (lmtuner_core.models.inference.generate and
generate_with_server); tokens/s counts generated tokens over the wall time of the whole batch.

    LMTUNER_VLLM_PYTHON=~/.cache/lmtuner/vllm-venv/bin/python .venv/bin/python bench/generate.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtuner_core.models.inference import generate, generate_with_server
from lmtuner_core.models.serving import ServerService
from lmtuner_core.paths import AllowedRoots
from lmtuner_core.training.tiny_model import make_tiny_model

SHAPES = {
    "tiny-0.6m": {},
    "small-21m": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4},
}
TOPICS = ["the sea", "bread", "rivers", "a red bicycle", "winter", "mathematics", "cats", "the moon"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, part {i}."}] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    if not os.environ.get("LMTUNER_VLLM_PYTHON"):
        print("note: LMTUNER_VLLM_PYTHON is unset; vLLM must then import in this interpreter", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="lmtuner-bench-generate-"))
    (work / "home").mkdir()
    services = ServerService(work / "home", AllowedRoots(None))
    rows = []
    for name, shape in SHAPES.items():
        model = str(make_tiny_model(work / name, **shape))
        generate(model, prompts(1), max_new_tokens=4)  # load and warm up outside the timings
        started = time.perf_counter()
        server = services.start(model, max_model_len=512, kv_cache_mib=256, dtype="float32")
        print(f"{name}: vLLM server ready in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            generate_with_server(server.base_url, server.served_model_name, prompts(1), model_ref=model,
                                 max_new_tokens=4)  # fmt: skip
            for batch in args.batches:
                convs = prompts(batch)
                local = generate(model, convs, max_new_tokens=args.new_tokens, batch_size=batch)
                served = generate_with_server(server.base_url, server.served_model_name, convs, model_ref=model,
                                              max_new_tokens=args.new_tokens, concurrency=batch)  # fmt: skip
                same = sum(a.text == b.text for a, b in zip(local.outputs, served.outputs, strict=True))
                rows.append((name, batch, local.tokens_per_second, served.tokens_per_second, same))
                print(f"  batch {batch}: done", flush=True)
        finally:
            services.stop(server.server_id)
    print(
        f"\n{'model':<11} {'batch':>5} {'transformers tok/s':>19} {'vLLM tok/s':>11} {'vLLM/HF':>8} {'same text':>10}"
    )
    for name, batch, hf, vl, same in rows:
        print(f"{name:<11} {batch:>5} {hf:>19.1f} {vl:>11.1f} {vl / hf:>8.2f} {same:>6}/{batch:<3}")


if __name__ == "__main__":
    main()

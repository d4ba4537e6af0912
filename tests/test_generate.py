"""generate: the embedded transformers engine, base and adapter, prompts and conversations."""

from __future__ import annotations

import time

import anyio
import mcp
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.paths import AllowedRoots
from server.app import build_server
from tests.helpers import call_error, call_ok, quick_config
from tools import training
from tools.context import ToolContext


def test_greedy_output_equals_plain_transformers_generate(tiny_model, lmtuner_home):
    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tiny_model])) as client:
            args = {"model": str(tiny_model), "prompts": ["What is 3 plus 4?", "Add 2 and 9."], "max_new_tokens": 12}
            return await call_ok(client, "generate", args)

    result = anyio.run(scenario)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        reference = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    ends = set(model.generation_config.eos_token_id)
    cut = next((i for i, t in enumerate(reference.tolist()) if t in ends), len(reference))
    assert result["outputs"][0]["text"] == tokenizer.decode(reference[:cut], skip_special_tokens=True)
    assert len(result["outputs"]) == 2 and result["engine"] == "transformers" and result["tokens_per_second"] > 0


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """(home, work folder, finished job status) of a 30-step LoRA job, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("work")
    home = tmp_path_factory.mktemp("home")
    data = write_demo_dataset(tmp_path / "demo.jsonl", n=64)
    ctx = ToolContext(home=home, roots=AllowedRoots([tmp_path, tiny_model]))
    job = training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, max_steps=30)))
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        time.sleep(0.1)
    assert status.status == "completed", status.error
    return home, tmp_path, status


def test_adapter_changes_the_answers_and_bad_requests_are_refused(tiny_model, trained):
    lmtuner_home, tmp_path, status = trained
    conversation = [{"role": "system", "content": "You are a patient maths tutor."},
                    {"role": "user", "content": "What is 3 plus 4?"}]  # fmt: skip

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            base = await call_ok(client, "generate", {"model": str(tiny_model), "messages": [conversation],
                                                      "max_new_tokens": 16})  # fmt: skip
            tuned = await call_ok(client, "generate", {"model": str(tiny_model), "messages": [conversation],
                                                       "adapter": status.output_dir, "max_new_tokens": 16})  # fmt: skip
            both = await call_error(client, "generate", {"model": str(tiny_model), "prompts": ["a"],
                                                         "messages": [conversation]})  # fmt: skip
            vllm = await call_error(client, "generate", {"model": str(tiny_model), "prompts": ["a"], "engine": "vllm"})
            not_adapter = await call_error(client, "generate", {"model": str(tiny_model), "prompts": ["a"],
                                                                "adapter": str(tiny_model)})  # fmt: skip
            return base, tuned, both, vllm, not_adapter

    base, tuned, both, vllm, not_adapter = anyio.run(scenario)
    assert tuned["adapter"] == status.output_dir
    assert base["outputs"][0]["text"] != tuned["outputs"][0]["text"]
    assert "exactly one of `prompts`" in both
    assert "engine: 'vllm' needs a running server" in vllm and "serve_model" in vllm
    assert "no adapter_config.json" in not_adapter


def test_merged_model_equals_base_plus_adapter(tiny_model, trained):
    from peft import PeftModel

    lmtuner_home, tmp_path, status = trained
    output = tmp_path / "merged"

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[tmp_path, tiny_model])) as client:
            args = {"model": str(tiny_model), "adapter": status.output_dir, "output_dir": str(output)}
            merged = await call_ok(client, "merge_adapter", args)
            again = await call_error(client, "merge_adapter", args)
            return merged, again

    merged, again = anyio.run(scenario)
    assert merged["output_dir"] == str(output) and merged["size_bytes"] > 1_000_000
    assert "already holds files" in again
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), status.output_dir)(ids)
        actual = AutoModelForCausalLM.from_pretrained(output)(ids)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert not (output / "adapter_config.json").exists()

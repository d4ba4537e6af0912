"""propose_config scenarios through the MCP client, on config.json files written from published dimensions;
every proposal is accepted by start_training's dry run as it is; the pre-flight refuses what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import mcp
import pytest

from lmtuner_core.data.sample_data import write_demo_dataset
from server.app import build_server
from tests.helpers import call_error, call_ok

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "architectures": ["LlamaForCausalLM"],
}  # fmt: skip
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}  # fmt: skip
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "architectures": ["Qwen2ForCausalLM"],
}  # fmt: skip


def gpu(name: str, mib: int, index: int = 0) -> dict:
    return {"index": index, "name": name, "memory_total_mib": mib, "memory_free_mib": mib,
            "compute_capability": "8.9", "bf16_supported": True}  # fmt: skip


@pytest.fixture
def workspace(tmp_path) -> Path:
    for name, config in {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "qwen2.5-0.5b": QWEN25_05B}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    write_demo_dataset(tmp_path / "train.jsonl", n=200)
    return tmp_path


SCENARIOS = {
    "8b-on-24gb": ("llama3-8b", {"gpus": [gpu("RTX 4090", 24564)]}, {}),
    "70b-on-80gb": ("llama3-70b", {"gpus": [gpu("H100 80GB", 81559)]}, {}),
    "70b-on-16gb": ("llama3-70b", {"gpus": [gpu("T4-class 16GB", 16384)]}, {}),
    "8b-full-on-8x80gb": ("llama3-8b", {"gpus": [gpu("H100 80GB", 81559, i) for i in range(8)]}, {"method": "full"}),
    "0.5b-on-cpu": ("qwen2.5-0.5b", {"gpus": [], "memory_total_mib": 32768}, {}),
    "8b-target-context-4x": ("llama3-8b", {"gpus": [gpu("A100 80GB", 81920)]}, {"target_context": 32768}),
}


def propose_and_dry_run(home, workspace, model, hardware, extra):
    async def scenario():
        async with mcp.Client(build_server(home=home, roots=[workspace])) as client:
            args = {"model": str(workspace / model), "dataset": str(workspace / "train.jsonl"), "hardware": hardware}
            plan = await call_ok(client, "propose_config", {**args, **extra})
            # The plan is for `hardware`, not this machine, where a real start (and so a dry run) would refuse it.
            check = {"config": plan["config"], "dry_run": True, "force": True}
            dry = await call_ok(client, "start_training", check)
            return plan, dry

    return anyio.run(scenario)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name, workspace, lmtuner_home):
    model, hardware, extra = SCENARIOS[name]
    plan, dry = propose_and_dry_run(lmtuner_home, workspace, model, hardware, extra)
    config, memory = plan["config"], plan["memory"]
    assert dry["status"] == "dry_run" and dry["config"]["method"] == config["method"]
    assert plan["rationale"] and all(isinstance(line, str) and line for line in plan["rationale"])
    assert plan["fits"] == (memory["per_gpu_gib"] <= memory["budget_gib"])  # fits means the estimate is in budget
    terms = ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib", "logits_gib", "overhead_gib")
    # every byte is in some term (overlap: gradients and activations are never held at once)
    assert memory["per_gpu_gib"] == pytest.approx(sum(memory[t] for t in terms) - memory["overlap_gib"])
    if name == "8b-on-24gb":
        assert plan["fits"] and config["method"] in ("lora", "qlora") and config["precision"] == "bf16"
        assert memory["per_gpu_gib"] <= memory["budget_gib"] < 24
    elif name == "70b-on-80gb":
        assert plan["fits"] and config["method"] == "qlora"
    elif name == "70b-on-16gb":
        assert not plan["fits"] and memory["per_gpu_gib"] > memory["budget_gib"]
        assert any("would fit" in w for w in plan["warnings"])
    elif name == "8b-full-on-8x80gb":
        assert plan["fits"] and config["method"] == "full"
        assert config["batch_size"] * config["gradient_accumulation_steps"] * 8 >= 16
    elif name == "0.5b-on-cpu":
        assert plan["fits"] and config["precision"] == "fp32" and config["method"] == "lora"
        assert memory["runtime_gib"] < 1 and memory["cpu_offload_gib"] == 0  # a CPU process, not a CUDA context
    elif name == "8b-target-context-4x":
        assert config["rope_scaling"] == {"type": "yarn", "factor": 4.0}
        assert any("YaRN" in line for line in plan["rationale"])
    for alternative in plan["alternatives"]:
        assert alternative["per_gpu_gib"] > 0


def test_start_training_refuses_a_job_that_cannot_fit_unless_forced(workspace, lmtuner_home):
    config = {"model": str(workspace / "llama3-70b"), "dataset": str(workspace / "train.jsonl"), "method": "full"}

    async def scenario():
        async with mcp.Client(build_server(home=lmtuner_home, roots=[workspace])) as client:
            refused = await call_error(client, "start_training", {"config": config})
            dry_refused = await call_error(client, "start_training", {"config": config, "dry_run": True})
            dry = await call_ok(client, "start_training", {"config": config, "dry_run": True, "force": True})
            jobs = await call_ok(client, "list_jobs", {})
            return refused, dry_refused, dry, jobs

    refused, dry_refused, dry, jobs = anyio.run(scenario)
    assert "memory: this job needs about" in refused and "force: true" in refused and "propose_config" in refused
    assert dry_refused == refused  # a dry run answers as the real start would
    assert any(w.startswith("memory: this job needs") for w in dry["warnings"])
    assert jobs["jobs"] == []


def test_the_cli_can_force_what_the_memory_check_refuses(workspace, lmtuner_home):
    """The refusal names how to override it; `lmtuner train --force` is that override on the command line."""
    from tests.test_cli import run_cli

    config_file = workspace / "job.json"
    config_file.write_text(json.dumps({
        "model": str(workspace / "llama3-70b"), "dataset": str(workspace / "train.jsonl"), "method": "full",
    }))  # fmt: skip
    refused = run_cli("train", str(config_file), "--dry-run", home=lmtuner_home, check=False)
    assert refused.returncode == 2 and "lmtuner train --force" in refused.stderr, refused.stderr
    forced = run_cli("--json", "train", str(config_file), "--dry-run", "--force", home=lmtuner_home)
    assert json.loads(forced.stdout)["status"] == "dry_run"
    assert "memory: this job needs" in forced.stderr


@pytest.mark.parametrize("task", ["capitals", "dates_iso", "classify", "extract_json", "persona"])
def test_the_training_recipe_follows_what_the_answers_look_like(task, workspace, lmtuner_home):
    """The recipe (rate, epochs, LoRA shape, replay) comes from the measured table for the kind of answer the rows
    hold (docs/TUNING.md), and the rationale says so; a config as proposed is accepted by start_training."""
    from lmtuner_core.data.study_tasks import TASKS, write_task
    from lmtuner_core.planning.hyperparameters import RECIPES, answer_profile

    train, _ = write_task(task, TASKS[task].sizes[0], workspace / task)
    kind = answer_profile([json.loads(line) for line in train.read_text().splitlines()]).kind
    assert kind == {"capitals": "short", "dates_iso": "short", "classify": "labels", "extract_json": "json",
                    "persona": "long"}[task]  # fmt: skip
    recipe = RECIPES[kind]
    hardware = {"gpus": [gpu("RTX 4090", 24564)]}
    (workspace / "train.jsonl").write_text(train.read_text())
    plan, dry = propose_and_dry_run(lmtuner_home, workspace, "llama3-8b", hardware, {"goal": TASKS[task].goal})
    config = plan["config"]
    assert dry["status"] == "dry_run"
    assert config["learning_rate"] == recipe.learning_rate and config["num_epochs"] == recipe.epochs
    assert config["lora"]["r"] == recipe.r and config["lora"]["target_modules"] == recipe.lora()["target_modules"]
    if recipe.replay:
        assert config["replay"]["share"] == recipe.replay and config["replay"]["prompts"] == recipe.replay_prompts
    else:
        assert config["replay"] is None
    line = next(line for line in plan["rationale"] if line.startswith("The answers are"))
    assert recipe.evidence in line and "docs/TUNING.md" in recipe.evidence

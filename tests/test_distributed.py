"""DeepSpeed ZeRO 2/3 (+ CPU offload), two processes (DDP, gloo) and two "nodes" on 127.0.0.1, on the CPU.

Every job trains the tiny model for 6 steps at the same seed with the same global batch (4 rows per step), so
its per-step losses can be compared with the plain single-process run. The first ZeRO job JIT-builds
DeepSpeed's CPU ops (≈2 min on 2 cores); TORCH_EXTENSIONS_DIR points at one folder for the whole session so
that happens once (set it in the environment to keep the build between sessions).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.errors import LmtunerError
from lmtuner_core.jobs.distributed import deepspeed_config, launch_command, launch_environment
from lmtuner_core.jobs.service import JobService
from lmtuner_core.paths import AllowedRoots
from tests.helpers import TERMINAL, free_port, quick_config, read_losses

# Measured (2 cores, tiny model, 6 steps): ZeRO-2 and ZeRO-3 losses equal the plain run's exactly, ZeRO-3 with
# CPU offload (DeepSpeed's CPU Adam) within 4.8e-7. Two processes see the same 4 rows per step, but each
# averages the loss over its own row's tokens before the gradients are averaged, so per-step losses differ
# from one process's token-weighted mean: by at most 4.9e-3 here (final step 1e-3).
ZERO_TOLERANCE = 1e-4
DDP_TOLERANCE = 0.02
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def extensions_dir(tmp_path_factory):
    """One TORCH_EXTENSIONS_DIR for every job of this module: DeepSpeed's ops are compiled once."""
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not previous:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    yield Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if not previous:
        del os.environ["TORCH_EXTENSIONS_DIR"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", n=32)


def job_config(model: Path, data: Path, **overrides) -> dict:
    return quick_config(
        model, data, **{"max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 2, **overrides}
    )


def submit(home: Path, roots: list[Path], config: dict):
    service = JobService(home, AllowedRoots(roots))
    record, _, _ = service.submit(parse_train_config(config))
    return service, record.job_id


def wait(service: JobService, job_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(job_id)
        if record.status in TERMINAL:
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout}s")


def run_job(home: Path, roots: list[Path], config: dict):
    service, job_id = submit(home, roots, config)
    record = wait(service, job_id)
    log = Path(record.run_dir, "train.log").read_text()
    assert record.status == "completed", f"{record.error}\n{log[-3000:]}"
    return record, read_losses(record.run_dir)


@pytest.fixture(scope="module")
def baseline(tiny_model, data, tmp_path_factory) -> list[float]:
    home = tmp_path_factory.mktemp("baseline")
    _, losses = run_job(home, [data.parent, tiny_model], job_config(tiny_model, data))
    assert len(losses) == STEPS
    return losses


# ---------------------------------------------------------------------------------------------- unit


def test_generated_deepspeed_json_leaves_the_job_settings_to_the_trainer():
    zero2 = deepspeed_config({"stage": 2}, on_gpu=False)
    assert zero2["zero_optimization"]["stage"] == 2 and "optimizer" not in zero2
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert zero2[key] == "auto"
    assert zero2["gradient_clipping"] == "auto"
    assert zero2["bf16"] == {"enabled": "auto"} and zero2["fp16"] == {"enabled": "auto"}

    offload = deepspeed_config({"stage": 3, "offload_optimizer": True, "offload_params": True}, on_gpu=False)
    zero = offload["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert offload["optimizer"]["params"]["lr"] == "auto"  # DeepSpeed's CPU Adam with the job's learning rate
    on_gpu = deepspeed_config({"stage": 3, "offload_optimizer": True}, on_gpu=True)["zero_optimization"]
    assert on_gpu["offload_optimizer"]["pin_memory"] is True and "offload_param" not in on_gpu
    assert json.loads(json.dumps(offload)) == offload  # plain JSON


def test_launch_command_and_environment(tmp_path):
    run = tmp_path / "run"
    single = launch_command("python", run, {}, "cpu", 29999)
    assert single == ["python", "-m", "lmtuner_core.training.train", str(run)]
    two = launch_command("python", run, {"processes_per_node": 2}, "cpu", 29999)
    assert two[:3] == ["python", "-m", "torch.distributed.run"] and two[-3:] == [
        "-m",
        "lmtuner_core.training.train",
        str(run),
    ]
    assert two[two.index("--nproc_per_node") + 1] == "2" and two[two.index("--master_port") + 1] == "29999"
    nodes = {"count": 2, "rank": 1, "master_addr": "10.0.0.5", "master_port": 29400}
    multi = launch_command("python", run, {"nodes": nodes}, "0,1", 29999)
    assert multi[multi.index("--nproc_per_node") + 1] == "2"  # auto: one per GPU
    assert [multi[multi.index(flag) + 1] for flag in ("--nnodes", "--node_rank", "--master_addr", "--master_port")] == [
        "2", "1", "10.0.0.5", "29400",
    ]  # fmt: skip

    env = launch_environment({"deepspeed": {"stage": 2}}, "cpu", tmp_path, 31000)
    assert env["DS_ACCELERATOR"] == "cpu" and env["WORLD_SIZE"] == "1" and env["MASTER_PORT"] == "31000"
    assert env["TORCH_EXTENSIONS_DIR"] == os.environ["TORCH_EXTENSIONS_DIR"]  # the module's shared cache
    assert "RANK" not in launch_environment({"deepspeed": {"stage": 2}, "processes_per_node": 2}, "cpu", tmp_path, 1)
    assert launch_environment({}, "cpu", tmp_path, 1) == {}  # a plain job runs as before


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"nodes": {"count": 2, "rank": 2}}, "nodes: rank 2 must be below count 2"),
        ({"nodes": {"count": 2, "master_addr": "--help"}}, "nodes.master_addr: '--help' is not a hostname"),
        ({"nodes": {"master_addr": "a b"}}, "nodes.master_addr"),
        ({"nodes": {"master_port": 80}}, "nodes.master_port: Input should be greater than or equal to 1024"),
        ({"nodes": {"count": 2, "ranks": 1}}, "unknown key 'ranks' (did you mean 'rank'?)"),
        ({"processes_per_node": 0}, "processes_per_node"),
        ({"deepspeed": {"stage": 4}}, "deepspeed.stage: Input should be less than or equal to 3"),
        ({"deepspeed": {"stage": 2, "offload_params": True}}, "offload_params needs stage 3"),
    ],
)
def test_bad_nodes_and_deepspeed_settings_are_refused_by_name(overrides, expected):
    with pytest.raises(LmtunerError) as caught:
        parse_train_config({"model": "m", "dataset": "d.jsonl", **overrides})
    assert expected in str(caught.value)


def test_user_deepspeed_file_is_checked_and_copied(tiny_model, data, tmp_path, lmtuner_home):
    roots = [data.parent, tiny_model, tmp_path]
    service = JobService(lmtuner_home, AllowedRoots(roots))
    broken = tmp_path / "broken.json"
    broken.write_text("{'stage': 2}")
    with pytest.raises(LmtunerError, match=r"deepspeed.config_file: .*broken.json is not valid JSON"):
        service.submit(parse_train_config(job_config(tiny_model, data, deepspeed={"config_file": str(broken)})))
    with pytest.raises(LmtunerError, match=r"deepspeed.config_file: .* is outside the allowed folders"):
        service.submit(parse_train_config(job_config(tiny_model, data, deepspeed={"config_file": "/etc/hosts"})))

    own = tmp_path / "ds.json"
    own.write_text(json.dumps(deepspeed_config({"stage": 2}, on_gpu=False) | {"zero_allow_untested_optimizer": True}))
    record, checked, _ = service.submit(
        parse_train_config(job_config(tiny_model, data, deepspeed={"config_file": str(own)}, max_steps=1)),
        dry_run=True,
    )
    assert record is None and checked.deepspeed.config_file == str(own)
    with pytest.raises(LmtunerError, match="deepspeed: method 'lomo' updates the weights inside the backward"):
        service.submit(parse_train_config(job_config(tiny_model, data, method="lomo", deepspeed={"stage": 2})))
    with pytest.raises(LmtunerError, match="processes_per_node: 3 processes but the job has"):
        from lmtuner_core.jobs.service import check_processes

        check_processes(checked.model_copy(update={"processes_per_node": 3}), "0,1")


def test_a_failing_rank_fails_the_job_with_its_reason(tmp_path):
    from lmtuner_core.jobs.run_folder import RunDir
    from lmtuner_core.jobs.supervisor import record_rank_failure

    # Rank 1 raised; torchrun then stopped rank 0, which recorded 'cancelled' as a stop looks to it.
    (tmp_path / "state.json").write_text(json.dumps({"status": "cancelled", "step": 3}))
    RunDir(tmp_path).record_failure(1, "RuntimeError: boom — lower batch_size")
    record_rank_failure(RunDir(tmp_path), 1)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["status"] == "failed" and state["error"] == "rank 1: RuntimeError: boom — lower batch_size"
    assert state["step"] == 3

    # A rank killed without a word (no failure file): still failed, not cancelled, pointing at the log.
    (tmp_path / "failure-rank-1.json").unlink()
    (tmp_path / "state.json").write_text(json.dumps({"status": "cancelled"}))
    record_rank_failure(RunDir(tmp_path), 1)
    assert "another training process died" in json.loads((tmp_path / "state.json").read_text())["error"]


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "deepspeed",
    [{"stage": 2}, {"stage": 3}, {"stage": 3, "offload_optimizer": True, "offload_params": True}],
    ids=["zero2", "zero3", "zero3-offload"],
)
def test_zero_jobs_match_the_plain_run(deepspeed, baseline, tiny_model, data, tmp_path):
    record, losses = run_job(tmp_path, [data.parent, tiny_model], job_config(tiny_model, data, deepspeed=deepspeed))
    differences = [abs(a - b) for a, b in zip(losses, baseline, strict=True)]
    print(f"\nZeRO {deepspeed}: losses {losses}\n  baseline {baseline}\n  |difference| max {max(differences):.2e}")
    assert max(differences) < ZERO_TOLERANCE
    run = Path(record.run_dir)
    generated = json.loads((run / "deepspeed.json").read_text())
    assert generated["zero_optimization"]["stage"] == deepspeed["stage"]
    if deepspeed["stage"] == 3:
        check_artifact_loads_and_generates(tiny_model, Path(record.output_dir))


def check_artifact_loads_and_generates(base: Path, adapter: Path) -> None:
    """A ZeRO-3 adapter saved without gathering would hold empty tensors; this one loads with its trained
    values (LoRA B starts at zero, so trained B matrices are non-zero) and generates."""
    from safetensors.torch import load_file

    from lmtuner_core.models.inference import generate

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(t.numel() > 0 for t in weights.values())
    assert all(t.abs().sum() > 0 for t in lora_b)
    result = generate(str(base), [[{"role": "user", "content": "What is 2 plus 3?"}]], adapter=str(adapter),
                      max_new_tokens=8)  # fmt: skip
    # A few steps of a tiny random model may well answer with end-of-text at once: generating at all is the check.
    assert len(result.outputs) == 1 and result.outputs[0].finish_reason in ("stop", "length")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)  # the trained values are the ones loaded


def test_two_processes_ddp_gloo_match_the_global_batch(baseline, tiny_model, data, tmp_path):
    # 2 processes × 1 row × 2 accumulation = 4 rows per step, as 1 process × 2 rows × 2 accumulation.
    config = job_config(tiny_model, data, processes_per_node=2, batch_size=1)
    record, losses = run_job(tmp_path, [data.parent, tiny_model], config)
    print(f"\nDDP x2: losses {losses}\n  baseline {baseline}\n  final difference {losses[-1] - baseline[-1]:+.2e}")
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, baseline, strict=True)) < DDP_TOLERANCE
    state = json.loads(Path(record.run_dir, "state.json").read_text())
    assert state["status"] == "completed" and state["step"] == STEPS
    assert Path(record.output_dir, "adapter_model.safetensors").is_file()


def test_two_nodes_on_localhost_form_one_job(baseline, tiny_model, data, tmp_path):
    port = free_port()
    roots = [data.parent, tiny_model]
    jobs = []
    for rank in (0, 1):
        nodes = {"count": 2, "rank": rank, "master_addr": "127.0.0.1", "master_port": port}
        config = job_config(tiny_model, data, nodes=nodes, processes_per_node=1, batch_size=1)
        home = tmp_path / f"node{rank}"  # two $LMTUNER_HOMEs, as on two machines
        home.mkdir()
        jobs.append(submit(home, roots, config))
    records = [wait(service, job_id) for service, job_id in jobs]
    for record in records:
        assert record.status == "completed", f"{record.error}\n{Path(record.run_dir, 'train.log').read_text()[-3000:]}"
    losses = read_losses(records[0].run_dir)
    print(f"\n2 nodes: losses {losses}\n  baseline {baseline}\n  final difference {losses[-1] - baseline[-1]:+.2e}")
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, baseline, strict=True)) < DDP_TOLERANCE
    # One training run: node 1 trained every step with node 0 but left the metrics and the model to node 0.
    assert json.loads(Path(records[1].run_dir, "state.json").read_text())["step"] == STEPS
    assert not Path(records[1].run_dir, "metrics.jsonl").exists()
    assert Path(records[0].output_dir, "adapter_model.safetensors").is_file()


def test_cancelling_a_two_process_job_stops_every_process_with_a_checkpoint(tiny_model, data, tmp_path):
    import psutil

    config = job_config(tiny_model, data, processes_per_node=2, batch_size=1, max_steps=500, save_steps=1000)
    service, job_id = submit(tmp_path, [data.parent, tiny_model], config)
    run_dir = service.get(job_id).run_dir
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = service.progress(service.get(job_id), log_lines=0)
        if state.status != "running" or state.step >= 2:
            break
        time.sleep(0.5)
    assert state.status == "running" and state.step >= 2, state

    def job_processes() -> list[str]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if run_dir in cmdline:
                found.append(cmdline)
        return found

    assert len(job_processes()) == 4  # supervisor, torchrun and its two workers
    record = service.cancel(job_id)
    assert record.status == "cancelled", record.error
    time.sleep(1)
    assert job_processes() == []
    saved = [p.name for p in Path(run_dir, "checkpoints").glob("checkpoint-*")]
    assert len(saved) == 1, saved  # both processes stopped at the same step and saved it together
    assert json.loads(Path(run_dir, "state.json").read_text())["status"] == "cancelled"


def test_a_stop_signal_after_the_vote_waits_for_the_next_vote(monkeypatch, tmp_path):
    """A SIGTERM landing between the stop vote (all_reduce) and the decision must not stop this process alone: it
    would wait in the final all_gather while the others run the next step (seen once in CI as a hung cancel)."""
    import threading
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from lmtuner_core.jobs.run_folder import RunDir, StateFile
    from lmtuner_core.training.recipe import ProgressWriter

    stop = threading.Event()
    run = RunDir(tmp_path)
    writer = ProgressWriter(run, StateFile(run), stop)
    args, control = SimpleNamespace(world_size=2, device="cpu"), TrainerControl()

    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None: stop.set())  # all voted 0; then the signal
    writer.on_step_end(args, TrainerState(), control)
    assert not control.should_training_stop

    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None: None)  # the next vote carries it
    writer.on_step_end(args, TrainerState(), control)
    assert control.should_training_stop and control.should_save


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_sft_and_grpo_train_on_two_processes_under_zero2(stage, request, tiny_model, data, tmp_path):
    """Two processes (gloo) under DeepSpeed ZeRO-2, for SFT and for GRPO (issue 24; the preference stages share SFT's
    arguments, and test_preference.py runs dpo on two processes and under ZeRO-2): each logs its stage's progress on
    every step; SFT's losses match the plain run at the same global batch (DeepSpeed's batch size counts both
    processes: transformers alone would size it for one on a machine without CUDA)."""
    from tests.test_grpo import write_jsonl

    if stage == "sft":
        extra: dict = {"batch_size": 1, "max_steps": STEPS}  # 2 processes x 1 row x 2 accumulation, as the baseline
    else:
        rows = [{"prompt": f"Say {word}", "answer": word} for word in ("cat", "dog", "sun", "tree") * 3]
        data = write_jsonl(tmp_path / "prompts.jsonl", rows)
        extra = {"graders": [{"type": "string_check", "reference": "answer", "operation": "contains"}],
                 "grpo": {"num_generations": 4, "max_completion_length": 6}, "batch_size": 2,
                 "max_steps": 3}  # fmt: skip
    config = job_config(tiny_model, data, stage=stage, processes_per_node=2, deepspeed={"stage": 2}, report=False,
                        **extra)  # fmt: skip
    service, job_id = submit(tmp_path, [tmp_path, data.parent, tiny_model], config)
    record = wait(service, job_id)
    log = Path(record.run_dir, "train.log").read_text()
    assert record.status == "completed", f"{record.error}\n{log[-3000:]}"
    assert json.loads(Path(record.run_dir, "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    records = [json.loads(line) for line in Path(record.run_dir, "metrics.jsonl").read_text().splitlines()]
    key = {"sft": "loss", "grpo": "reward_mean"}[stage]
    steps = extra["max_steps"]
    assert [r["step"] for r in records if key in r] == list(range(1, steps + 1)), records
    assert Path(record.output_dir, "adapter_model.safetensors").is_file()
    if stage == "sft":
        baseline = request.getfixturevalue("baseline")
        losses = read_losses(record.run_dir)
        print(f"\nZeRO-2 x2: losses {losses}\n  baseline {baseline}")
        assert max(abs(a - b) for a, b in zip(losses, baseline, strict=True)) < DDP_TOLERANCE

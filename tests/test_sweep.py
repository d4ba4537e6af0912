"""tune_config through a real MCP client: a small sweep on the tiny model completes as one job with its trials and a
best config ready for start_training; bad search input is refused naming the field; a cancelled sweep leaves no
process of it running."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import psutil
import pytest

from lmtuner_core.data.sample_data import write_capitals_dataset
from tests.helpers import call_error, call_ok, stdio_client, wait_for_end


def centre_config(model: Path, dataset: Path, **overrides) -> dict:
    config = {
        "model": str(model),
        "dataset": {"path": str(dataset), "eval_fraction": 0.25},
        "method": "lora",
        "max_steps": 8,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "max_seq_len": 64,
        "logging_steps": 1,
        "eval_steps": 2,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "report": {"retention": False, "max_rows": 4},
    }
    return {**config, **overrides}


@pytest.fixture
def capitals(tmp_path) -> Path:
    return write_capitals_dataset(tmp_path / "capitals.jsonl")


def test_sweep_completes_with_trials_and_best_config(tiny_model, lmtuner_home, capitals, tmp_path):
    search = {"learning_rate": {"min": 1e-3, "max": 1e-2, "log": True}, "lora.r": [4, 8]}

    async def main():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            sweep = await call_ok(
                client,
                "tune_config",
                {"config": centre_config(tiny_model, capitals), "search": search, "trials": 3, "budget_minutes": 10,
                 "metric": "report"},
            )  # fmt: skip
        # the server that started it has exited: a new one follows the sweep to its end, as it would any job
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            listed = await call_ok(client, "list_jobs", {})
            final = await wait_for_end(client, sweep["job_id"], timeout=600)
            # the winner trains as an ordinary job
            best = final["best_config"]
            started = await call_ok(client, "start_training", {"config": best, "dry_run": True})
            return sweep, listed, final, started

    sweep, listed, final, started = anyio.run(main)
    assert sweep["search"]["lora.r"] == [4, 8] and sweep["trials"] == 3
    assert [j["kind"] for j in listed["jobs"]] == ["sweep"]  # one entry, not one per trial
    assert final["status"] == "completed", final["error"]
    assert final["kind"] == "sweep" and final["sweep"]["trials"] == 3
    trials = final["trials"]
    assert len(trials) == 3
    # the first trial is the centre itself; lora.alpha followed the drawn rank at the centre's ratio (32/16)
    assert trials[0]["config"] == {"learning_rate": 3e-3, "lora.r": 16}
    for trial in trials:
        assert trial["status"] in ("completed", "stopped_early")
        run = Path(trial["run_dir"])
        assert run.parent.parent == Path(final["run_dir"])  # each trial's run folder is under the sweep's
        config = json.loads((run / "config.json").read_text())
        assert config["lora"]["r"] == trial["config"]["lora.r"]
        assert config["lora"]["alpha"] == 2 * trial["config"]["lora.r"]
        assert (run / "metrics.jsonl").is_file()
        assert config["ray"] is None and trial["node"]  # a local training process on the node Ray chose
    completed = [t for t in trials if t["status"] == "completed"]
    assert completed and all(0 <= t["score"] <= 1 for t in completed)
    assert all((Path(t["run_dir"]) / "report.json").is_file() for t in completed)
    best = max(completed, key=lambda t: t["score"])
    assert final["best_config"]["learning_rate"] == pytest.approx(best["config"]["learning_rate"])
    assert final["best_config"]["lora"]["r"] == best["config"]["lora.r"]
    assert started["status"] == "dry_run"


@pytest.mark.parametrize(
    ("search", "field", "accepted"),
    [
        ({"learning_rat": [1e-4]}, "search.learning_rat", "learning_rate"),
        ({"learning_rate": [1e-4, -1.0]}, "search.learning_rate[1]", "greater than 0"),
        ({"lora.r": {"min": 16, "max": 8}}, "search.lora.r", "min (16) must be below max (8)"),
        ({"lora.r": {"min": 4, "max": 8, "step": 2}}, "search.lora.r", "'min': ..., 'max': ..."),
        ({"assistant_only_loss": {"min": 0, "max": 1}}, "search.assistant_only_loss", "list of values"),
        ({"lora.target_modules": [7]}, "search.lora.target_modules[0]", "refused"),
        ({"learning_rate": "fast"}, "search.learning_rate", "neither a list of values nor a range"),
        ({"num_epochs": [1, 2]}, "search.num_epochs", "trains by max_steps (8)"),
    ],
)
def test_bad_search_is_refused_naming_the_field(tiny_model, lmtuner_home, capitals, tmp_path, search, field, accepted):
    async def main():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            args = {"config": centre_config(tiny_model, capitals), "search": search, "trials": 2}
            return await call_error(client, "tune_config", args), await call_ok(client, "list_jobs", {})

    message, listed = anyio.run(main)
    assert f"tune_config: {field}:" in message and accepted in message, message
    assert listed["jobs"] == []  # nothing was recorded


def test_sweep_needs_held_out_rows_and_a_known_metric(tiny_model, lmtuner_home, capitals, tmp_path):
    async def main():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            no_rows = {**centre_config(tiny_model, capitals), "dataset": {"path": str(capitals), "eval_fraction": 0.0}}
            first = await call_error(client, "tune_config", {"config": no_rows})
            second = await call_error(client, "tune_config", {"config": centre_config(tiny_model, capitals),
                                                               "metric": "accuracy"})  # fmt: skip
            return first, second

    first, second = anyio.run(main)
    assert "config.dataset.eval_fraction" in first and "held-out rows" in first
    assert "metric" in second and "eval_loss" in second


def test_cancelled_sweep_leaves_no_process_running(tiny_model, lmtuner_home, capitals, tmp_path):
    # long trials, so the cancel lands while one trains
    # no early stop either: a tiny model's held-out loss may stop improving, which would end a trial in the budget
    config = centre_config(tiny_model, capitals, max_steps=100_000, eval_steps=5, early_stopping_patience=1000)

    async def main():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            sweep = await call_ok(client, "tune_config", {"config": config, "trials": 4, "budget_minutes": 30})
            try:
                state = Path(sweep["run_dir"], "state.json")
                deadline = time.monotonic() + 300
                descendants: list[psutil.Process] = []
                while time.monotonic() < deadline:  # until a trial's training process is running
                    if state.is_file():
                        supervisor = psutil.Process(json.loads(state.read_text())["pid"]).parent()
                        descendants = [supervisor, *supervisor.children(recursive=True)]
                        if any("lmtuner_core.training.train" in " ".join(p.cmdline()) for p in _alive(descendants)):
                            break
                    await anyio.sleep(1)
                else:
                    raise AssertionError(
                        f"no trial started: {await call_ok(client, 'job_status', {'job_id': sweep['job_id']})}"
                    )
            finally:
                cancelled = await call_ok(client, "cancel_job", {"job_id": sweep["job_id"]})
            after = await call_ok(client, "job_status", {"job_id": sweep["job_id"]})
            return cancelled, after, descendants

    cancelled, after, processes = anyio.run(main)
    assert cancelled["status"] == "cancelled" and after["status"] == "cancelled"
    _gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not _alive(alive), [" ".join(p.cmdline()) for p in _alive(alive)]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def test_with_a_cluster_address_the_trials_spread_over_its_nodes(
    tiny_model, lmtuner_home, capitals, tmp_path, monkeypatch
):
    """ray.address 'auto' joins the cluster RAY_ADDRESS names (here a two-node cluster of one CPU each): the two
    trials run at once, one per node."""
    from tests.ray_cluster import HEAD_IP, WORKER_IP, ray_cluster

    # A Ray token in ~/.ray (`ray get-auth-token --generate`) turns token auth on for every `ray start` here, and the
    # fixture's dashboard probe sends none: this cluster runs without it, as a fresh machine's does.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with ray_cluster(tmp_path) as cluster:
        monkeypatch.setenv("RAY_ADDRESS", cluster.gcs_address)
        config = centre_config(tiny_model, capitals, ray={"address": "auto"})

        async def main():
            async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
                sweep = await call_ok(client, "tune_config", {"config": config, "trials": 2, "budget_minutes": 10,
                                                              "search": {"lora.r": [4, 8]}})  # fmt: skip
                return await wait_for_end(client, sweep["job_id"], timeout=600)

        final = anyio.run(main)
    assert final["status"] == "completed", final["error"]
    assert final["sweep"]["cluster"] == "auto" and final["devices"] == "cpu"  # the driver here; the trials there
    assert {t["node"] for t in final["trials"]} == {HEAD_IP, WORKER_IP}


def test_the_budget_in_minutes_stops_the_trials_still_running(tiny_model, lmtuner_home, capitals, tmp_path):
    # trials far longer than the budget: the budget ends them, and with nothing completed the sweep says so
    # no early stop either: a tiny model's held-out loss can stall, which ended a trial inside the minute
    config = centre_config(tiny_model, capitals, max_steps=100_000, eval_steps=5, early_stopping_patience=1000)

    async def main():
        async with stdio_client(lmtuner_home, [tmp_path, tiny_model]) as client:
            sweep = await call_ok(client, "tune_config", {"config": config, "trials": 3, "budget_minutes": 1})
            return await wait_for_end(client, sweep["job_id"], timeout=600)

    final = anyio.run(main)
    assert final["status"] == "failed" and "no trial finished within the budget" in final["error"], final["error"]
    assert final["trials"] and {t["status"] for t in final["trials"]} == {"out_of_budget"}
    assert final["best_config"] is None

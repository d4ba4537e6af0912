"""The result report, the held-out split, the best checkpoint and early stopping, through a real lmtuner-mcp.

One job on the tiny model is shared by the module's tests (a job per test would cost minutes each). What the report
says about a real model is tested on SmolLM2 in test_outcome.py; here: that every part is there, consistent with the
run folder, and that its advice reaches propose_config.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from safetensors.torch import load_file

from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.planning.hyperparameters import answer_profile
from lmtuner_core.report.probe import load_probe
from lmtuner_core.report.result import FORGETTING_LIMIT, LossComparison, ResultReport, Retention, advise, verdict
from lmtuner_core.report.scoring import choose_metric, score_answer
from tests.helpers import call_error, call_ok, quick_config, stdio_client, wait_for_end


def _write_rows(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """Two jobs on one server: the first holds out rows automatically and writes its report; the second trains on
    rows unlike its eval_dataset, so the held-out loss rises and the job stops early with an earlier checkpoint as
    its result. Then propose_config follows the first job's report."""
    folder = tmp_path_factory.mktemp("report")
    home = folder / "home"
    home.mkdir()
    data = write_demo_dataset(folder / "demo.jsonl", n=80)
    # Held-out answers the training rows pull the model away from: the same questions, answered backwards.
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]
    unlike = _write_rows(folder / "unlike.jsonl", [(f"What is {a} plus {b}?", f"{a + b} is {b} plus {a} backwards")
                                                   for a, b in pairs])  # fmt: skip

    missing = folder / "nope.jsonl"

    async def scenario():
        async with stdio_client(home, [folder, tiny_model]) as client:
            auto = quick_config(tiny_model, {"path": str(data), "eval_fraction": "auto"}, max_steps=24,
                                report={"max_rows": 8, "samples": 3})  # fmt: skip
            first = await call_ok(client, "start_training", {"config": auto})
            first_status = await wait_for_end(client, first["job_id"])
            resource = await client.read_resource(f"lmtuner://jobs/{first['job_id']}/report")
            stopping = quick_config(tiny_model, data, max_steps=60, learning_rate=5e-3, eval_dataset=str(unlike),
                                    eval_steps=3, early_stopping_patience=2, report=False)  # fmt: skip
            second = await call_ok(client, "start_training", {"config": stopping})
            second_status = await wait_for_end(client, second["job_id"])
            replaying = quick_config(tiny_model, data, max_steps=2, replay={"share": 0.25, "prompts": "mixed"})
            third = await call_ok(client, "start_training", {"config": replaying})
            replay_status = await wait_for_end(client, third["job_id"])
            plan = await call_ok(client, "propose_config", {"model": str(tiny_model), "dataset": str(data),
                                                            "previous_job": first["job_id"]})  # fmt: skip
            listed = await call_ok(client, "list_jobs", {})
            refusals = [
                await call_error(client, "propose_config", {"model": str(tiny_model), "dataset": str(data),
                                                            "previous_job": second["job_id"]}),
                await call_error(client, "start_training", {"config": {**auto, "eval_dataset": str(data)}}),
                await call_error(client, "start_training", {"config": {**auto, "eval_dataset": str(missing)}}),
                await call_error(client, "start_training", {"config": {**auto, "report": {"max_row": 3}}}),
                await call_error(client, "start_training", {"config": {**auto, "replay": 0.9}}),
            ]  # fmt: skip
            return first_status, resource, second_status, plan, listed, refusals, replay_status

    return anyio.run(scenario)


def test_a_completed_job_reports_base_against_tuned_on_its_held_out_rows(finished):
    status = finished[0]
    assert status["status"] == "completed", status["error"]
    report = status["report"]
    assert report["metric"] == "exact_match" and "short reference answers" in report["metric_reason"]
    assert report["held_out_rows"] == 8 and "8 of 80 dataset rows held out" in report["held_out_source"]
    assert len(report["samples"]) == 3
    for sample in report["samples"]:
        assert sample["prompt"] and sample["reference"] and sample["tuned_score"] in (0.0, 1.0)
    assert 0 <= report["base"] <= 1 and 0 <= report["tuned"] <= 1
    retention = report["retention"]
    assert retention["questions"] == len(load_probe()) >= 150
    assert retention["kept"] <= retention["known"]
    loss = report["held_out_loss"]
    assert loss["base"] > loss["best"], loss  # the tiny model learns the held-out rows' form
    assert report["advice"] and report["seconds"] > 0 and 0 < report["share_of_job"] < 1
    # The same report in the run folder and as a resource; list_jobs leaves it to job_status.
    saved = json.loads(Path(status["run_dir"], "report.json").read_text())
    assert saved == report
    assert json.loads(finished[1].contents[0].text) == report
    assert all(job["report"] is None for job in finished[4]["jobs"])
    metrics = [json.loads(line) for line in Path(status["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert metrics[0] == {**metrics[0], "step": 0, "eval_loss": loss["base"]}, metrics[0]  # base, before step 1


def test_the_result_is_the_best_checkpoint_and_training_stops_when_held_out_loss_rises(finished):
    status = finished[2]
    assert status["status"] == "completed", status["error"]
    assert status["report"] is None and not Path(status["run_dir"], "report.json").exists()  # report: false
    evals = [json.loads(line) for line in Path(status["run_dir"], "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r and r["step"] > 0]
    best_step, best = min(evals, key=lambda pair: pair[1])
    after = [loss for step, loss in evals if step > best_step]
    assert evals[-1][0] < 60, f"never stopped early: {evals}"
    assert len(after) == 2 and min(after) >= best, evals  # patience 2: two evaluations without a gain, then stop
    final = load_file(str(Path(status["output_dir"]) / "adapter_model.safetensors"))
    best_saved = load_file(str(Path(status["run_dir"]) / "checkpoints" / f"checkpoint-{best_step}" /
                               "adapter_model.safetensors"))  # fmt: skip
    assert final.keys() == best_saved.keys()
    assert all((final[k] == best_saved[k]).all() for k in final), "the output is the best checkpoint's adapter"


def test_propose_config_follows_a_previous_jobs_report(finished):
    first, plan = finished[0], finished[3]
    report = first["report"]
    line = next(r for r in plan["rationale"] if r.startswith(f"From job {first['job_id']}'s report"))
    assert report["verdict"] in line
    for key, value in report["next_config"].items():
        assert plan["config"][key] == value, (key, plan["config"][key], value)
    previous = json.loads(Path(first["run_dir"], "config.json").read_text())
    if "learning_rate" not in report["next_config"]:
        assert plan["config"]["learning_rate"] == previous["learning_rate"]


def test_bad_report_and_held_out_settings_are_refused_by_name(finished):
    no_report, same_file, missing, typo, replay_share = finished[5]
    assert "replay" in replay_share and "0.5" in replay_share
    assert "previous_job" in no_report and "no result report" in no_report
    assert "eval_dataset" in same_file and "training data itself" in same_file
    assert "eval_dataset" in missing and "not found" in missing
    assert "report" in typo and "max_row" in typo and "max_rows" in typo


def test_replay_mixes_the_base_models_own_answers_into_the_training_rows(finished):
    """80 rows, none held out: a share of 0.25 adds 80 * 0.25 / 0.75 = 27 rows of the base model's answers to
    lmtuner's general requests and short questions, alternately (none of them about the probe's facts)."""
    status = finished[6]
    assert status["status"] == "completed", status["error"]
    state = json.loads(Path(status["run_dir"], "state.json").read_text())
    log = Path(status["run_dir"], "train.log").read_text()
    rows = state["replay_rows"]
    assert 0 < rows <= 27 and f"replay: {rows} rows of the base model's own answers (mixed)" in log, log[-2000:]


def test_the_metric_fits_the_answers():
    assert choose_metric(["Paris", "Rome"])[0] == "exact_match"
    assert choose_metric(['{"a": 1}', "[1, 2]"])[0] == "json"
    long = "the patient should rest and drink fluids and call a doctor if the fever rises above 39"
    assert choose_metric([long, long])[0] == "rouge_l"
    assert score_answer("exact_match", " paris. ", "Paris") == 1.0
    assert score_answer("exact_match", "The capital is Paris.", "Paris") == 0.0
    assert score_answer("json", '```json\n{"a": 1, "b": [2]}\n```', '{"b": [2], "a": 1}') == 1.0
    assert score_answer("json", '{"a": 1', '{"a": 1}') == 0.0
    assert 0.3 < score_answer("rouge_l", "rest and drink fluids", long) < 1


def _report(base, tuned, known=0, kept=0, best_step=10, final_step=10, regressions=()) -> ResultReport:
    retention = Retention(questions=100, known=known, kept=kept, forgetting=1 - kept / known if known else 0.0)
    return ResultReport(
        verdict=verdict(base, tuned, retention), metric="exact_match", metric_reason="", base=base, tuned=tuned,
        held_out_rows=20, held_out_source="", retention=retention, regressions=list(regressions),
        held_out_loss=LossComparison(base=2.0, best=1.0, best_step=best_step, final_step=final_step), seconds=1.0,
    )  # fmt: skip


def test_advice_follows_the_numbers():
    config = {"learning_rate": 2e-4, "num_epochs": 3, "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                                                "target_modules": "all-linear"}}  # fmt: skip
    forgot = _report(0.1, 0.8, known=50, kept=40)
    assert forgot.verdict == "forgot" and FORGETTING_LIMIT < 0.2
    advice, changes = advise(forgot, config)
    assert "lost 10 of the 50" in advice[0] and "replay" in advice[0]
    assert changes == {"replay": {"share": 0.3}}  # first the lever that kept the task score
    advice, changes = advise(forgot, {**config, "replay": {"share": 0.3, "prompts": "requests"}})
    assert "replay more" in advice[0] and changes == {"replay": {"share": 0.5, "prompts": "requests"}}
    advice, changes = advise(forgot, {**config, "replay": {"share": 0.5}})
    assert "even with replay" in advice[0]
    assert changes == {"learning_rate": 1e-4, "num_epochs": 2, "lora": {**config["lora"], "r": 8, "alpha": 16}}
    still_learning = _report(0.1, 0.1, known=50, kept=50, best_step=30, final_step=30)
    assert still_learning.verdict == "no gain"
    advice, changes = advise(still_learning, config)
    assert "still falling" in advice[0] and changes == {"num_epochs": 6}
    overfit = _report(0.5, 0.3, known=50, kept=50, best_step=5, final_step=30)
    assert overfit.verdict == "worse"
    advice, changes = advise(overfit, config)
    assert "lowest at step 5 of 30" in advice[0] and changes == {"learning_rate": 1e-4}
    good = _report(0.0, 0.9, known=50, kept=49)
    assert good.verdict == "better" and advise(good, config) == (
        ["The model got better at the task and kept what it knew: keep this recipe."],
        {},
    )


def test_the_planner_reads_what_the_answers_look_like():
    def rows(answers):
        return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in answers]

    assert answer_profile(rows(['{"a": 1}'] * 20)).kind == "json"
    assert answer_profile(rows(["billing", "shipping", "other"] * 10)).kind == "labels"
    assert answer_profile(rows([f"City {i}" for i in range(30)])).kind == "short"
    assert answer_profile(rows([" ".join(["word"] * 40) + str(i) for i in range(30)])).kind == "long"
    assert answer_profile([{"text": "plain"}]) is None

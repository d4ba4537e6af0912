"""evaluate: scores on LMTuner's own predictions equal the libraries computed directly; WordNet is really
loaded; echoed prompts are stripped and counted; generation-based evaluation and compare_base run."""

from __future__ import annotations

import json
import time

import anyio
import mcp
import pytest
import sacrebleu
from nltk.translate.meteor_score import meteor_score
from nltk.translate.nist_score import corpus_nist
from rouge_score import rouge_scorer

from lmtuner_core.config import parse_train_config
from lmtuner_core.data.sample_data import write_demo_dataset
from lmtuner_core.models.metrics import clean_prediction, ensure_wordnet, words
from lmtuner_core.paths import AllowedRoots
from server.app import build_server
from tests.helpers import call_ok, quick_config
from tools import training
from tools.context import ToolContext


def evaluate(home, roots, arguments):
    async def scenario():
        async with mcp.Client(build_server(home=home, roots=roots)) as client:
            return await call_ok(client, "evaluate", arguments)

    return anyio.run(scenario)


def test_lmtuner_predictions_score_as_the_libraries_say(shared_data, lmtuner_home, tiny_model):
    medical = shared_data / "lmtuner-medical"
    result = evaluate(
        lmtuner_home, [shared_data, tiny_model],
        {"model": str(tiny_model), "dataset": str(medical / "test.jsonl"),
         "predictions": str(medical / "lmtuner_predictions.jsonl"), "max_samples": 100},
    )  # fmt: skip
    refs = [json.loads(line)["output"] for line in (medical / "test.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (medical / "lmtuner_predictions.jsonl").read_text().splitlines()]
    # The same computation done here directly with sacrebleu / nltk / rouge-score on the same words.
    hyps = [clean_prediction(r["output"], r["input"])[0] for r in rows]
    hyp_words, ref_words = [words(h) for h in hyps], [words(r) for r in refs]
    hyp_text, ref_text = [" ".join(w) for w in hyp_words], [" ".join(w) for w in ref_words]
    bleu4 = sacrebleu.metrics.BLEU(tokenize="none").corpus_score(hyp_text, [ref_text]).score
    bleu2 = sacrebleu.metrics.BLEU(max_ngram_order=2, tokenize="none").corpus_score(hyp_text, [ref_text]).score
    nist4 = corpus_nist([[r] for r in ref_words], hyp_words, n=4)
    meteor = sum(meteor_score([r], h) for r, h in zip(ref_words, hyp_words, strict=True)) / len(hyps)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps, strict=True)) / len(hyps)

    assert result["n"] == 61 and result["prompts_stripped"] == 61  # LMTuner's outputs echo their prompts
    assert result["bleu_4"] == pytest.approx(bleu4, abs=1e-3)
    assert result["bleu_2"] == pytest.approx(bleu2, abs=1e-3)
    assert result["nist_4"] == pytest.approx(nist4, abs=1e-3)
    assert result["meteor"] == pytest.approx(meteor, abs=1e-3)
    assert result["rouge_l"] == pytest.approx(rouge, abs=1e-3)
    assert "13a" in result["tokenization"]

    unstripped = evaluate(
        lmtuner_home, [shared_data, tiny_model],
        {"model": str(tiny_model), "dataset": str(medical / "test.jsonl"), "strip_prompt": False,
         "predictions": str(medical / "lmtuner_predictions.jsonl"), "max_samples": 100},
    )  # fmt: skip
    assert unstripped["prompts_stripped"] == 0 and unstripped["bleu_2"] != result["bleu_2"]


def test_meteor_credits_a_wordnet_synonym(lmtuner_home):
    ensure_wordnet(lmtuner_home)
    reference = [["a", "car", "drove", "down", "the", "road"]]
    with_synonym = meteor_score(reference, ["a", "auto", "drove", "down", "the", "road"])
    unrelated = meteor_score(reference, ["a", "banana", "drove", "down", "the", "road"])
    assert with_synonym == pytest.approx(0.9977, abs=1e-3) and unrelated == pytest.approx(0.8067, abs=1e-3)


def test_generated_answers_are_scored_with_and_without_the_adapter(tiny_model, tmp_path, lmtuner_home):
    data = write_demo_dataset(tmp_path / "train.jsonl", n=64)
    held_out = write_demo_dataset(tmp_path / "test.jsonl", n=6, seed=1)
    ctx = ToolContext(home=lmtuner_home, roots=AllowedRoots([tmp_path, tiny_model]))
    job = training.start_training(ctx, parse_train_config(quick_config(tiny_model, data, max_steps=30)))
    while (status := training.job_status(ctx, job.job_id, wait_seconds=10)).status == "running":
        time.sleep(0.1)
    assert status.status == "completed", status.error
    result = evaluate(
        lmtuner_home, [tmp_path, tiny_model],
        {"model": str(tiny_model), "dataset": str(held_out), "adapter": status.output_dir, "compare_base": True,
         "max_new_tokens": 16},
    )  # fmt: skip
    assert result["n"] == 6 and result["base"]["n"] == 6
    assert len(result["samples"]) == 3 and result["samples"][0]["reference"]
    assert "adapter" in result["source"]

"""The result report's measurements, taken inside the training child on the model it trains: the base model's
answers before the first step, the tuned model's after the last, both greedy, then scored and compared.

Asking the model in memory avoids loading it twice; before training every method's model still answers as the base
(a new LoRA/DoRA adapter is a no-op, full weights are unchanged). The base's answers are cached under
$LMTUNER_HOME/cache/base_answers, keyed by the model folder's files and the questions, so a second job or a sweep
on the same model and data pays for them once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmtuner_core.config import TrainConfig
from lmtuner_core.methods import METHODS
from lmtuner_core.models.inference import answer
from lmtuner_core.report.probe import load_probe, probe_correct
from lmtuner_core.report.result import (
    AnswerPair,
    LossComparison,
    LostFact,
    ResultReport,
    Retention,
    advise,
    verdict,
)
from lmtuner_core.report.scoring import choose_metric, is_right, score_answer
from lmtuner_core.run import read_json, write_json_atomic

PROBE_NEW_TOKENS = 16  # a short sentence: the base model answers "The capital of France is Paris." (7 tokens)
# Rows per generate call: short probe questions batch well; a batch runs until its longest answer ends, so not more.
PROBE_BATCH, HELD_OUT_BATCH = 32, 16


def held_out_items(examples: list[dict], limit: int) -> list[tuple[list[dict], str, str]]:
    """(conversation up to the last answer, the question, the reference answer) for the first `limit` chat rows."""
    items = []
    for example in examples:
        messages = example.get("messages") or []
        answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not answers:
            continue
        last = answers[-1]
        question = next((m["content"] for m in reversed(messages[:last]) if m.get("role") == "user"), "")
        items.append((messages[:last], question, messages[last]["content"]))
        if len(items) == limit:
            break
    return items


def model_fingerprint(model: str) -> str:
    """The model folder's identity for the cache: its path and each file's size and modification time."""
    folder = Path(model)
    if not folder.is_dir():
        return model  # a hub id: its revision is what the hub cache holds
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return json.dumps([str(folder.resolve()), files])


@contextmanager
def generating(model: Any):
    """Evaluation mode with the KV cache on (training turns both off), restored after."""
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


def _new_tokens(tokenizer: Any, references: list[str]) -> int:
    """Room for the longest reference and a little more (a model that rambles is cut, not waited for)."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=16)
    return max(16, min(384, int(longest * 1.25) + 8))


def ask(
    model: Any, tokenizer: Any, conversations: list[list[dict]], new_tokens: int, batch: int, stop: threading.Event
) -> list[str]:
    """Greedy answers from the model in memory, stopping between batches when the job is cancelled."""

    def stop_between_batches(*_: Any) -> None:  # a cancel must not wait for hundreds of answers
        if stop.is_set():
            raise InterruptedError("stopped while the model was answering")

    with generating(model):
        outputs = answer(model, tokenizer, conversations, max_new_tokens=new_tokens, batch_size=batch,
                         progress=stop_between_batches)  # fmt: skip
    return [o.text.strip() for o in outputs]


def base_answers(
    model: Any, tokenizer: Any, conversations: list[list[dict]], new_tokens: int, batch: int, config: TrainConfig,
    home: Path, stop: threading.Event,
) -> list[str]:  # fmt: skip
    """The base model's answers (call before training), from $LMTUNER_HOME/cache/base_answers when this model was
    asked the same before: keyed by the model folder's files, a quantized base, the precision and the questions."""
    if not conversations:
        return []
    quantized = METHODS[config.method].memory.base_quant  # a 4-bit base answers differently
    key_text = json.dumps([model_fingerprint(config.model), quantized, config.precision, new_tokens, conversations])
    path = home / "cache" / "base_answers" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.json"
    cached = read_json(path)
    if isinstance(cached, list) and len(cached) == len(conversations):
        return cached
    answers = ask(model, tokenizer, conversations, new_tokens, batch, stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, answers)
    return answers


class ReportRunner:
    """Measures before training (`measure_base`) and after (`build`); `seconds` counts only the report's own work."""

    def __init__(
        self, config: TrainConfig, tokenizer: Any, held_out: list[dict], held_out_source: str, home: Path,
        stop: threading.Event,
    ):  # fmt: skip
        self.config = config
        self.stop = stop
        self.settings = config.report
        self.tokenizer = tokenizer
        self.items = held_out_items(held_out, self.settings.max_rows)
        self.held_out_source = held_out_source
        self.home = home
        self.metric, self.metric_reason = choose_metric([reference for _, _, reference in self.items])
        self.new_tokens = _new_tokens(tokenizer, [reference for _, _, reference in self.items]) if self.items else 16
        self.probe = load_probe() if self.settings.retention else []
        self.seconds = 0.0
        self.base_answers: list[str] = []
        self.base_probe: list[str] = []

    def _ask(self, model: Any, conversations: list[list[dict]], new_tokens: int, batch: int) -> list[str]:
        return ask(model, self.tokenizer, conversations, new_tokens, batch, self.stop)

    def _ask_base(self, model: Any, conversations: list[list[dict]], new_tokens: int, batch: int) -> list[str]:
        return base_answers(model, self.tokenizer, conversations, new_tokens, batch, self.config, self.home, self.stop)

    def measure_base(self, model: Any) -> None:
        started = time.monotonic()
        self.base_answers = self._ask_base(model, [c for c, _, _ in self.items], self.new_tokens, HELD_OUT_BATCH)
        probe = [[{"role": "user", "content": q.question}] for q in self.probe]
        self.base_probe = self._ask_base(model, probe, PROBE_NEW_TOKENS, PROBE_BATCH)
        self.seconds += time.monotonic() - started

    def build(self, model: Any, loss: LossComparison, job_seconds: float | None) -> ResultReport:
        started = time.monotonic()
        tuned_answers = self._ask(model, [c for c, _, _ in self.items], self.new_tokens, HELD_OUT_BATCH)
        pairs = []
        for (_, question, reference), base, tuned in zip(self.items, self.base_answers, tuned_answers, strict=True):
            pairs.append(AnswerPair(
                prompt=question, reference=reference, base=base, tuned=tuned,
                base_score=round(score_answer(self.metric, base, reference), 4),
                tuned_score=round(score_answer(self.metric, tuned, reference), 4),
            ))  # fmt: skip
        retention = self._retention(model) if self.probe else None
        n = len(pairs)
        base = round(sum(p.base_score for p in pairs) / n, 4) if n else None
        tuned = round(sum(p.tuned_score for p in pairs) / n, 4) if n else None
        self.seconds += time.monotonic() - started
        report = ResultReport(
            verdict=verdict(base, tuned, retention), metric=self.metric, metric_reason=self.metric_reason,
            base=base, tuned=tuned, held_out_rows=n, held_out_source=self.held_out_source,
            samples=pairs[: self.settings.samples],
            regressions=[p for p in pairs if is_right(self.metric, p.base_score)
                         and not is_right(self.metric, p.tuned_score)][:10],
            retention=retention, held_out_loss=loss, seconds=round(self.seconds, 1),
            share_of_job=round(self.seconds / job_seconds, 3) if job_seconds else None,
        )  # fmt: skip
        report.advice, report.next_config = advise(report, self.config.model_dump())
        return report

    def _retention(self, model: Any) -> Retention:
        """Asks the tuned model only what the base knew: forgetting is measured on those, and it halves the cost."""
        known = [(q, before) for q, before in zip(self.probe, self.base_probe, strict=True)
                 if probe_correct(before, q.answers, question=q.question)]  # fmt: skip
        conversations = [[{"role": "user", "content": q.question}] for q, _ in known]
        tuned = self._ask(model, conversations, PROBE_NEW_TOKENS, PROBE_BATCH)
        kept = 0
        lost: list[LostFact] = []
        for (question, before), after in zip(known, tuned, strict=True):
            if probe_correct(after, question.answers, question=question.question):
                kept += 1
            elif len(lost) < 10:
                lost.append(LostFact(question=question.question, expected=question.answers[0], base=before,
                                     tuned=after))  # fmt: skip
        return Retention(
            questions=len(self.probe), known=len(known), kept=kept, lost=lost,
            forgetting=round(1 - kept / len(known), 4) if known else 0.0,
        )  # fmt: skip

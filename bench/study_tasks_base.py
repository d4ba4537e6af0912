"""What a base model does on each study task's test set (lmtuner_core/data/study_tasks.py), before any tuning.

    LMTUNER_HOME=... python bench/study_tasks_base.py MODEL_DIR OUT.json [TASK ...]

Greedy generation with the model's chat template through lmtuner_core.models.inference.generate, max_new_tokens
from the task. Scores: exact match after trimming spaces and a final full stop, ignoring case; for JSON, the
share that parses as a whole (valid), the share holding a JSON object somewhere (e.g. in a code fence) and the
share equal to the reference; ROUGE-L from lmtuner_core.models.metrics.score; and lenient checks per task (the
capital named anywhere, the ISO date or the label appearing anywhere, the persona's "Aye," opening).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from lmtuner_core.data.study_tasks import CLASSIFY_LABELS, TASKS, capital_named
from lmtuner_core.models.inference import generate
from lmtuner_core.models.metrics import score
from lmtuner_core.paths import lmtuner_home


def normalized(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


def json_object(text: str) -> dict | None:
    """The first JSON object in the text, wherever it starts (decoder.raw_decode at each '{')."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def measure(model: str, name: str) -> dict:
    task = TASKS[name]
    _, test = task.items(task.sizes[0])
    conversations = [row["messages"][:-1] for _, row in test]
    references = [row["messages"][-1]["content"] for _, row in test]
    started = time.perf_counter()
    result = generate(model, conversations, max_new_tokens=task.max_new_tokens, batch_size=8)
    seconds = time.perf_counter() - started
    answers = [o.text for o in result.outputs]
    n = len(answers)
    out: dict = {
        "task": name, "kind": task.kind, "metric": task.metric, "test_rows": n,
        "max_new_tokens": task.max_new_tokens, "seconds_per_row": round(seconds / n, 2),
        "stopped_by_length": sum(o.finish_reason == "length" for o in result.outputs),
    }  # fmt: skip
    exact = [normalized(a) == normalized(r) for a, r in zip(answers, references, strict=True)]
    if task.metric == "exact_match":
        out["exact_match"] = round(sum(exact) / n, 4)
    if name == "capitals":
        known = [key for (key, _), a, r in zip(test, answers, references, strict=True) if capital_named(a, r)]
        out["lenient_named"] = len(known)
        out["known_countries"] = known
        out["exact_countries"] = [key for (key, _), e in zip(test, exact, strict=True) if e]
    if name == "dates_iso":
        out["lenient_contains_iso"] = round(sum(r in a for a, r in zip(answers, references, strict=True)) / n, 4)
    if name == "classify":
        contains = [re.search(rf"\b{r}\b", a.casefold()) is not None for a, r in zip(answers, references, strict=True)]
        out["lenient_label_named"] = round(sum(contains) / n, 4)
        out["answers_in_label_set"] = round(sum(normalized(a) in CLASSIFY_LABELS for a in answers) / n, 4)
    if task.metric == "json":
        parsed = []
        for a in answers:
            try:
                parsed.append(json.loads(a))
            except ValueError:
                parsed.append(None)
        found = [json_object(a) for a in answers]
        wanted = [json.loads(r) for r in references]
        out["json_valid"] = round(sum(isinstance(p, dict) for p in parsed) / n, 4)
        out["json_object_found"] = round(sum(f is not None for f in found) / n, 4)
        out["json_equal"] = round(sum(p == w for p, w in zip(parsed, wanted, strict=True)) / n, 4)
        out["json_equal_found"] = round(sum(f == w for f, w in zip(found, wanted, strict=True)) / n, 4)
    rouge = score(answers, references, home=lmtuner_home())
    out["rouge_l"] = rouge.rouge_l
    if task.metric == "rouge_l":
        out.update(bleu_4=rouge.bleu_4, meteor=rouge.meteor, nist_4=rouge.nist_4)
    if name == "persona":
        out["starts_with_aye"] = round(sum(a.strip().startswith("Aye,") for a in answers) / n, 4)
    out["samples"] = [
        {"prompt": c[-1]["content"][-160:], "reference": r, "answer": a}
        for c, r, a in list(zip(conversations, references, answers, strict=True))[:3]
    ]
    out["answers"] = answers
    return out


def main() -> None:
    model, target, *names = sys.argv[1:]
    results = {}
    path = Path(target)
    if path.is_file():
        results = json.loads(path.read_text())
    generate(model, [[{"role": "user", "content": "Hello"}]], max_new_tokens=1)  # load once, outside the timings
    for name in names or list(TASKS):
        results[name] = measure(model, name)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        summary = {k: v for k, v in results[name].items() if k not in ("samples", "answers", "known_countries")}
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

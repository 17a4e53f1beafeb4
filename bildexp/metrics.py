"""Quality metrics in a registry: sacreBLEU corpus BLEU and rouge-score ROUGE, all on a 0-100 scale.

Each task names its headline metric (BLEU for translation, ROUGE-L for XSUM, ROUGE-Lsum for CNN/DM:
the BiLD tables' CNN/DM "ROUGE-L" is the sentence-split ROUGE-Lsum, REFERENCE.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Scorer = Callable[[list[str], list[str]], dict[str, float | str]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Scorer
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {}


def register_metric(*names: str, higher_is_better: bool = True):
    """Register one scorer under every metric name it produces."""

    def wrap(fn: Scorer) -> Scorer:
        for name in names:
            METRICS[name] = Metric(name, fn, higher_is_better)
        return fn

    return wrap


@register_metric("bleu")
def bleu(hyps: list[str], refs: list[str]) -> dict[str, float | str]:
    import sacrebleu

    scorer = sacrebleu.BLEU()
    result = scorer.corpus_score(hyps, [refs])
    return {"bleu": float(result.score), "bleu_signature": str(scorer.get_signature())}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum expects (a regex split: nltk's punkt data is not offline)."""
    if "\n" in text:
        return "\n".join(s.strip() for s in text.split("\n") if s.strip())
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@register_metric("rouge1", "rouge2", "rougeL", "rougeLsum")
def rouge(hyps: list[str], refs: list[str]) -> dict[str, float | str]:
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(split_sentences(ref), split_sentences(hyp))
        for k in keys:
            totals[k] += scores[k].fmeasure
    n = max(len(hyps), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}


def score(headline: str, hyps: list[str], refs: list[str]) -> dict[str, float | str]:
    """The headline metric and its family (BLEU, or the four ROUGE scores)."""
    if headline not in METRICS:
        raise KeyError(f"unknown metric {headline!r}: one of {', '.join(METRICS)}")
    return METRICS[headline].fn(hyps, refs)

"""Quality metrics in a registry: sacreBLEU corpus BLEU and rouge-score ROUGE, all on a 0-100 scale.

Each task names its headline metric (BLEU for translation, ROUGE-L for XSUM, ROUGE-Lsum for CNN/DM:
the BiLD tables' CNN/DM "ROUGE-L" is the sentence-split ROUGE-Lsum, REFERENCE.md).

Two scorings of the same outputs, both in every row (docs/REPRODUCTION.md, "Evaluation settings"):
- field-standard (`bleu`, `rougeL`, ...): references as the dataset has them; ROUGE with stemming, sentences
  split by a regex for ROUGE-Lsum;
- paper-comparable (`paper_bleu`, `paper_rougeL`, ...), the pipeline behind the paper's numbers (the official
  BiLD code for BLEU, the PopoDev reproduction for ROUGE): references round-tripped through the pair's
  tokenizer at the paper's target length (128 tokens), ROUGE without stemming, sentences split by NLTK's punkt.
`task.scoring` names the one that becomes `headline_score`.
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


def punkt_missing() -> str | None:
    """None when NLTK's punkt sentence model is installed, else the one line that says how to install it."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    except (ImportError, LookupError):
        return "NLTK's punkt sentence model is not installed (python -m nltk.downloader punkt_tab)"


def round_trip(refs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """References as the official code scores them: tokenized as labels, cut at max_tokens, decoded back."""
    ids = tokenizer(text_target=refs, max_length=max_tokens, truncation=True)["input_ids"]
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def paper_score(headline: str, hyps: list[str], refs: list[str], tokenizer, max_tokens: int) -> dict[str, float]:
    """The paper-comparable scores of the headline's family, as paper_<metric> columns. ROUGE: no stemming, the
    mean F-measure (evaluate's rouge reports a bootstrap median of it, within ~0.05), and paper_rougeLsum only when
    punkt is installed (rouge1/2/L do not depend on the sentence split)."""
    from rouge_score import rouge_scorer

    refs = round_trip(refs, tokenizer, max_tokens)
    hyps = [h.strip() for h in hyps]
    if headline == "bleu":
        return {"paper_bleu": bleu(hyps, refs)["bleu"]}
    keys = ["rouge1", "rouge2", "rougeL"]
    if punkt_missing() is None:
        import nltk

        keys.append("rougeLsum")
        hyps, refs = (["\n".join(nltk.sent_tokenize(t)) for t in texts] for texts in (hyps, refs))
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=False)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(ref, hyp)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {f"paper_{k}": 100.0 * v / max(len(hyps), 1) for k, v in totals.items()}


def check_scoring(scoring: str, headline: str) -> None:
    """Before decoding: a paper-comparable headline that cannot be computed here is one line, not a changed number."""
    from bildexp import BildexpError

    if scoring == "paper" and headline == "rougeLsum" and (missing := punkt_missing()):
        raise BildexpError(f"task.scoring=paper scores rougeLsum on NLTK's sentences, but {missing}; "
                           f"or use task.scoring=standard (regex sentences)")


def score(headline: str, hyps: list[str], refs: list[str]) -> dict[str, float | str]:
    """The headline metric and its family (BLEU, or the four ROUGE scores)."""
    if headline not in METRICS:
        raise KeyError(f"unknown metric {headline!r}: one of {', '.join(METRICS)}")
    return METRICS[headline].fn(hyps, refs)

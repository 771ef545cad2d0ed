"""The field's standard scores, computed by the field's libraries on detokenised text.

BLEU and chrF come from sacrebleu (with its signature, so numbers are comparable across
papers); ROUGE from rouge-score.
"""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from detr.errors import DataError


@dataclass
class Score:
    name: str  # "BLEU", "chrF2", "ROUGE-1", ...
    score: float
    signature: str = ""
    detail: str = ""  # sacrebleu's full line: n-gram precisions, brevity penalty, lengths


def _check(hypotheses: list[str], references: list[list[str]]) -> None:
    for i, ref in enumerate(references):
        if len(ref) != len(hypotheses):
            raise DataError(f"reference set {i + 1} has {len(ref)} lines, but there are {len(hypotheses)} outputs")


def bleu(hypotheses: list[str], references: list[list[str]]) -> Score:
    """Corpus BLEU. `references` is a list of reference sets, each one line per hypothesis."""
    _check(hypotheses, references)
    metric = BLEU()
    result = metric.corpus_score(hypotheses, references)
    return Score("BLEU", result.score, str(metric.get_signature()), str(result))


def chrf(hypotheses: list[str], references: list[list[str]]) -> Score:
    """Corpus chrF (character n-gram F-score, β = 2)."""
    _check(hypotheses, references)
    metric = CHRF()
    result = metric.corpus_score(hypotheses, references)
    return Score(result.name, result.score, str(metric.get_signature()), str(result))


def rouge(hypotheses: list[str], references: list[list[str]]) -> list[Score]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure (×100, Porter stemming), averaged over sentences;
    with several reference sets each sentence takes its best-matching reference."""
    from rouge_score import rouge_scorer  # imported here: only summarization needs it

    _check(hypotheses, references)
    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for i, hyp in enumerate(hypotheses):
        result = scorer.score_multi([ref[i] for ref in references], hyp)
        for kind in kinds:
            totals[kind] += result[kind].fmeasure
    n = max(len(hypotheses), 1)
    return [Score(f"ROUGE-{kind[5:]}", 100 * totals[kind] / n, "rouge-score 0.1.2, F-measure, stemmed")
            for kind in kinds]


METRICS = ("bleu", "chrf", "rouge")


def score(names: list[str], hypotheses: list[str], references: list[list[str]]) -> list[Score]:
    """The named metrics ("bleu", "chrf", "rouge") of `hypotheses` against the reference sets."""
    out: list[Score] = []
    for name in names:
        if name == "bleu":
            out.append(bleu(hypotheses, references))
        elif name == "chrf":
            out.append(chrf(hypotheses, references))
        elif name == "rouge":
            out.extend(rouge(hypotheses, references))
        else:
            raise DataError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return out

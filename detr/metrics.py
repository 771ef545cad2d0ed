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


def distinct(hypotheses: list[str], n: int) -> Score:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams in all outputs, ×100.

    A diversity score for generated responses: a model that answers everything with "I
    don't know" scores near 0. Words are split on whitespace; no references are used.
    """
    grams = [tuple(words[i:i + n]) for words in (h.split() for h in hypotheses) for i in range(len(words) - n + 1)]
    return Score(f"Distinct-{n}", 100 * len(set(grams)) / max(len(grams), 1), "whitespace words")


METRICS = ("bleu", "chrf", "rouge", "distinct")


def score(names: list[str], hypotheses: list[str], references: list[list[str]]) -> list[Score]:
    """The named metrics ("bleu", "chrf", "rouge", "distinct") of `hypotheses` against the reference sets
    ("distinct" gives Distinct-1 and Distinct-2 and ignores the references)."""
    out: list[Score] = []
    for name in names:
        if name == "bleu":
            out.append(bleu(hypotheses, references))
        elif name == "chrf":
            out.append(chrf(hypotheses, references))
        elif name == "rouge":
            out.extend(rouge(hypotheses, references))
        elif name == "distinct":
            out += [distinct(hypotheses, 1), distinct(hypotheses, 2)]
        else:
            raise DataError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return out


def classification_scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: gold label, columns: predicted), over the label order `labels`."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted_as = sum(row[i] for row in confusion)
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    n = max(len(gold), 1)
    return {
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / n,
        "f1": sum(c["f1"] for c in per_class.values()) / max(len(labels), 1),  # macro
        "per_class": per_class,
        "labels": labels,
        "confusion": confusion,
        "n": len(gold),
    }


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level scores of IOB2 tag sequences, computed by seqeval (as CoNLL evaluates):
    micro precision/recall/F1, per entity type, micro/macro/weighted averages, and the
    report as seqeval prints it."""
    from seqeval.metrics import accuracy_score, classification_report

    table = classification_report(gold, predicted, digits=4, output_dict=True, zero_division=0)
    text = classification_report(gold, predicted, digits=4, zero_division=0)
    micro = table["micro avg"]
    return {
        "precision": float(micro["precision"]), "recall": float(micro["recall"]), "f1": float(micro["f1-score"]),
        "accuracy": float(accuracy_score(gold, predicted)),  # per token
        "per_type": {k: {m: float(v) for m, v in row.items()} for k, row in table.items()},
        "report": text,
        "n": len(gold),
    }

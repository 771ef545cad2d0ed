"""Minimum Bayes risk (MBR) decoding: of N candidate outputs, pick the one that agrees most
with the others (Kumar & Byrne, 2004; Eikema & Aziz, 2020; Freitag et al., 2022).

Each candidate is scored by its expected utility: its mean sentence-level chrF or BLEU
(sacrebleu's) against every candidate, itself included, the candidates standing in for
samples of the model's distribution. Candidates are counted with multiplicity, but each
distinct text is analysed once and each distinct pair scored once: samples repeat often,
and an N × N table of metric calls is most of MBR's cost.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from sacrebleu.metrics import BLEU, CHRF

Metric = Literal["chrf", "bleu"]


class Utility:
    """Sentence-level chrF or BLEU (sacrebleu's definitions) of a hypothesis against a
    pseudo-reference, with each text's n-grams extracted once."""

    def __init__(self, metric: Metric) -> None:
        self.metric = CHRF() if metric == "chrf" else BLEU(effective_order=True)
        self.info: dict[str, dict] = {}

    def reference(self, text: str) -> dict:
        if text not in self.info:
            self.info[text] = self.metric._extract_reference_info([self.metric._preprocess_segment(text)])
        return self.info[text]

    def __call__(self, hypothesis: str, reference: str) -> float:
        """The sentence score (0–100) of `hypothesis` against `reference`, exactly as
        `sacrebleu`'s `sentence_score(hypothesis, [reference])` computes it."""
        stats = self.metric._compute_segment_statistics(self.metric._preprocess_segment(hypothesis),
                                                        self.reference(reference))
        return float(self.metric._compute_score_from_stats(stats).score)


def expected_utilities(candidates: list[str], metric: Metric = "chrf") -> list[float]:
    """The mean utility of each candidate against all candidates (itself included)."""
    counts = Counter(candidates)
    utility = Utility(metric)
    distinct = list(counts)
    expected = {h: sum(n * utility(h, r) for r, n in counts.items()) / len(candidates) for h in distinct}
    return [expected[c] for c in candidates]


def mbr_rank(candidates: list[str], metric: Metric = "chrf") -> list[tuple[str, float]]:
    """Distinct candidates with their expected utility, best first (ties: first drawn first)."""
    scored = dict(zip(candidates, expected_utilities(candidates, metric)))
    return sorted(scored.items(), key=lambda item: -item[1])

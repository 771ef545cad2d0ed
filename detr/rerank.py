"""MMI-bidi reranking (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural
Conversation Models"): of the beam's outputs for a source x, keep those with the best

    score(y | x) + W · log p(x | y) / |x|

where score(y | x) is the beam's own (its length penalty and anti-LM included) and p(x | y)
comes from a *backward* run: one trained on the same pairs with source and target swapped.
A reply that fits any context ("Thank you.") predicts no context in particular; one that
answers this context predicts it. The backward term is per source token (|x| counts x's
subwords and </s>), so one weight suits short and long sources; every candidate of a source
gets the same |x|, so it only reorders them. Without a language model this is also the
"noisy channel" reranking of translation (Yee et al., 2019).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

Candidates = list[tuple[str, float]]  # (text, score) pairs, best first


class Scored(Protocol):
    per_token: float


class Scorer(Protocol):
    """What scores targets given sources by forced decoding (a `Translator`)."""

    def score(self, sources: Iterable[str], targets: Iterable[str]) -> list[Scored]: ...


def is_padding(candidate: tuple[str, float]) -> bool:
    """The ("", 0.0) a search puts where it finished fewer hypotheses than asked (a real output
    has a negative log-probability)."""
    return candidate == ("", 0.0)


def rerank(backward: Scorer, sources: list[str], candidates: list[Candidates], weight: float) -> list[Candidates]:
    """Each source's candidates with `weight` times the backward model's per-token log p(source |
    candidate) added to their scores, best first (ties keep the beam's order). Padding stays last,
    unscored; a blank source's candidates are returned as they are. All pairs are scored in one
    call, which batches them by length."""
    pairs = [(i, j) for i, (source, found) in enumerate(zip(sources, candidates, strict=True)) if source.strip()
             for j, candidate in enumerate(found) if not is_padding(candidate)]
    scores = backward.score([candidates[i][j][0] for i, j in pairs], [sources[i] for i, _ in pairs])
    out = [list(found) for found in candidates]
    for (i, j), backward_score in zip(pairs, scores):
        text, score = out[i][j]
        out[i][j] = (text, score + weight * backward_score.per_token)
    for i, found in enumerate(out):
        real = [c for c in found if not is_padding(c)]
        out[i] = sorted(real, key=lambda c: -c[1]) + [c for c in found if is_padding(c)]
    return out

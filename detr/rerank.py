"""MMI reranking (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural
Conversation Models"): of the beam's outputs y for a source x, keep those with the best

    score(y | x) + W_bidi · log p(x | y) / |x| − W_lm · log p(y) / |y|

where score(y | x) is the beam's own (its length penalty and anti-LM included).
- MMI-bidi (`decode.backward_weight`): p(x | y) comes from a *backward* run, one trained on the
  same pairs with source and target swapped. A reply that fits any context ("Thank you.")
  predicts no context in particular; one that answers this context predicts it. The term is per
  source token (|x| counts x's subwords and </s>), so one weight suits short and long sources;
  every candidate of a source gets the same |x|. Without a language model this is also the "noisy
  channel" reranking of translation (Yee et al., 2019).
- MMI-antiLM over whole outputs (`decode.rerank_anti_lm`): p(y) is the forward model given a blank
  source (the model as a language model, as `decode.anti_lm` uses it inside the search). Per output
  token, so a long output is not favoured for its length. Unlike the anti-LM inside the search it
  only chooses among outputs the beam found, so it cannot build an output from tokens that are
  merely rare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

Candidates = list[tuple[str, float]]  # (text, score) pairs, best first


class Scored(Protocol):
    per_token: float


# Forced decoding: the log-probability of each target given its source (`Translator.score`).
ScoreFn = Callable[[list[str], list[str]], Sequence[Scored]]


@dataclass(frozen=True)
class Term:
    """One reranking feature: `weight` times `value(sources, outputs)` (one number per pair)."""

    weight: float
    value: Callable[[list[str], list[str]], list[float]]


def backward_term(backward: ScoreFn, weight: float) -> Term:
    """MMI-bidi: `weight` · log p(source | output) / |source| under the backward run's `score`."""
    return Term(weight, lambda sources, outputs: [s.per_token for s in backward(outputs, sources)])


def anti_lm_term(forward: ScoreFn, weight: float) -> Term:
    """MMI-antiLM: −`weight` · log p(output | blank source) / |output| under the forward model's `score`."""
    return Term(weight, lambda sources, outputs: [-s.per_token for s in forward([""] * len(outputs), outputs)])


def is_padding(candidate: tuple[str, float]) -> bool:
    """The ("", 0.0) a search puts where it finished fewer hypotheses than asked (a real output
    has a negative log-probability)."""
    return candidate == ("", 0.0)


def rerank(sources: list[str], candidates: list[Candidates], terms: list[Term]) -> list[Candidates]:
    """Each source's candidates with every term's weighted value added to their scores, best first
    (ties keep the beam's order). Padding stays last, unscored; a blank source's candidates are
    returned as they are. All pairs are scored in one call per term, which batches them by length."""
    pairs = [(i, j) for i, (source, found) in enumerate(zip(sources, candidates, strict=True)) if source.strip()
             for j, candidate in enumerate(found) if not is_padding(candidate)]
    out = [list(found) for found in candidates]
    for term in terms:
        if not term.weight:
            continue
        values = term.value([sources[i] for i, _ in pairs], [candidates[i][j][0] for i, j in pairs])
        for (i, j), value in zip(pairs, values, strict=True):
            text, score = out[i][j]
            out[i][j] = (text, score + term.weight * value)
    for i, found in enumerate(out):
        real = [c for c in found if not is_padding(c)]
        out[i] = sorted(real, key=lambda c: -c[1]) + [c for c in found if is_padding(c)]
    return out

"""Lexical constraints: outputs that must contain given phrases, must not contain others, and
start with a given prefix (terminology, interactive translation, completion).

    {"include": ["Hund", "roten Ball"], "exclude": ["Katze"], "prefix": "Ein"}

A user writes one such JSON object per input line (`Constraints`); the target tokenizer
turns it into ids (`Guide`). The prefix and the excluded phrases are applied by every
search (`detr.search.constrain`). Included phrases need a search that plans for them:
`constrained_beam_search` is beam search with dynamic beam allocation (Post & Vilar, 2018,
after the grid beam search of Hokamp & Liu, 2017). Hypotheses are grouped into banks by
how many constraint tokens they have produced; each step the beam's K slots are shared out
over the banks, so hypotheses that have placed a phrase compete with each other rather
than with unconstrained ones that score higher, and a hypothesis may end only once every
phrase is in it. Phrases are met in any order. Where the length limit comes first, the
best output is returned anyway and reports the phrases it lacks (`Hypothesis.unmet`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from detr.config import DecodeConfig
from detr.errors import DataError
from detr.readers import json_object
from detr.search import (
    Decoding,
    Guide,
    Guides,
    Hypothesis,
    Models,
    constrain,
    guides_for,
    length_penalty,
    max_lengths,
    row_topk,
)
from detr.tokenizer import BOS, EOS, Subwords

FIELDS = ("include", "exclude", "prefix")


@dataclass(frozen=True)
class Constraints:
    """What one output must contain (`include`), must not contain (`exclude`), and starts with
    (`prefix`), as target text."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prefix: str = ""

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude or self.prefix)

    @classmethod
    def parse(cls, text: str, where: str) -> Constraints:
        """One JSON object per line (`{"include": [...], "exclude": [...], "prefix": "..."}`, every
        field optional); a blank line means no constraints.

        Raises:
            DataError: not such an object; the message names `where` (file and line) and the field.
        """
        if not text.strip():
            return cls()
        return cls.from_dict(json_object(text, where), where)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Constraints:
        """The same checks as `parse`, for an already decoded object (the server's requests)."""
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; expected {', '.join(FIELDS)}")
        phrases = {}
        for name in ("include", "exclude"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
                raise DataError(f"{where}: {name} must be a list of non-empty strings")
            phrases[name] = tuple(p.strip() for p in value)
        prefix = data.get("prefix", "")
        if not isinstance(prefix, str):
            raise DataError(f"{where}: prefix must be a string")
        for phrase in phrases["exclude"]:
            for included in phrases["include"]:
                if _word_in(phrase, included):
                    raise DataError(f"{where}: the included phrase {included!r} contains the excluded phrase "
                                    f"{phrase!r}")
            if _word_in(phrase, prefix):
                raise DataError(f"{where}: the prefix contains the excluded phrase {phrase!r}")
        return cls(phrases["include"], phrases["exclude"], prefix)

    def with_prefix(self, prefix: str, where: str) -> Constraints:
        """These constraints with `prefix` (from a prefix file); a line may set only one prefix."""
        if not prefix:
            return self
        if self.prefix:
            raise DataError(f"{where}: a prefix is given both in the constraints and in the prefix file")
        return Constraints.from_dict({"include": list(self.include), "exclude": list(self.exclude),
                                      "prefix": prefix}, where)

    def guide(self, subwords: Subwords) -> Guide | None:
        """The target ids of these constraints (None when there are none). A phrase is tokenised as
        a word of a sentence is, so it matches the output's own subwords."""
        if not self:
            return None
        ids = lambda phrases: tuple(tuple(subwords.encode(p)) for p in phrases)  # noqa: E731
        return Guide(tuple(subwords.encode(self.prefix)) if self.prefix else (), ids(self.include), ids(self.exclude))

    def unmet(self, text: str) -> list[str]:
        """The included phrases missing from the output `text`."""
        return [p for p in self.include if p not in text]

    def violated(self, text: str) -> list[str]:
        """The excluded phrases found in the output `text` as words (so excluding "ein" does not
        exclude "einhundert", as the search does not)."""
        return [p for p in self.exclude if _word_in(p, text)]


def _word_in(phrase: str, text: str) -> bool:
    """Whether `phrase` occurs in `text` with no letter or digit joined to either end."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def read_constraints(lines: Iterable[tuple[int, str]], name: str) -> Iterator[Constraints]:
    """`Constraints` of each (line number, text) of a constraints file named `name`."""
    for number, text in lines:
        yield Constraints.parse(text, f"{name}:{number}")


# ------------------------------------------------------------------ constrained beam search


@dataclass(frozen=True)
class Progress:
    """How far one hypothesis is through its sentence's included phrases: which are met, and
    the tokens produced so far of the one it is in the middle of."""

    met: tuple[bool, ...]
    phrase: int = -1  # the phrase in progress; -1: none
    done: int = 0  # its tokens produced so far

    def count(self, phrases: tuple[tuple[int, ...], ...]) -> int:
        """Constraint tokens produced: the hypothesis's bank."""
        return sum(len(p) for p, m in zip(phrases, self.met) if m) + self.done

    def complete(self) -> bool:
        return all(self.met)

    def wanted(self, phrases: tuple[tuple[int, ...], ...]) -> set[int]:
        """The tokens that would take it further."""
        if self.phrase >= 0:
            return {phrases[self.phrase][self.done]}
        return {p[0] for p, m in zip(phrases, self.met) if not m}

    def advance(self, token: int, phrases: tuple[tuple[int, ...], ...]) -> Progress:
        """The progress after `token`: a phrase goes on, starts, or (on a different token) is
        abandoned and has to start again."""
        if self.phrase >= 0 and phrases[self.phrase][self.done] == token:
            return self._at(self.phrase, self.done + 1, phrases)
        for i, (phrase, met) in enumerate(zip(phrases, self.met)):
            if not met and phrase[0] == token:
                return self._at(i, 1, phrases)
        return Progress(self.met)

    def _at(self, phrase: int, done: int, phrases: tuple[tuple[int, ...], ...]) -> Progress:
        if done < len(phrases[phrase]):
            return Progress(self.met, phrase, done)
        return Progress(tuple(m or i == phrase for i, m in enumerate(self.met)))


def contains(tokens: list[int], phrase: tuple[int, ...]) -> bool:
    n = len(phrase)
    return any(tuple(tokens[i:i + n]) == phrase for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class Candidate:
    score: float
    beam: int  # the hypothesis it extends
    token: int
    progress: Progress
    bank: int


def allocate(candidates: list[Candidate], banks: int, k: int) -> list[Candidate]:
    """The `k` candidates that go on (best first), chosen by dynamic beam allocation: each of the
    `banks` banks (by constraint tokens produced) gets k // banks slots, the remainder going to
    the banks with the most; slots a bank cannot fill go to the others, most produced first.
    With one bank this is plain beam search's choice of the k best."""
    by_bank: list[list[Candidate]] = [[] for _ in range(banks)]
    for c in candidates:  # `candidates` is sorted best first, so each bank is too
        by_bank[c.bank].append(c)
    sizes = [k // banks + (1 if j >= banks - k % banks else 0) for j in range(banks)]
    taken = [min(size, len(bank)) for size, bank in zip(sizes, by_bank)]
    for j in reversed(range(banks)):
        spare = k - sum(taken)
        taken[j] += min(spare, len(by_bank[j]) - taken[j])
    chosen = [c for bank, n in zip(by_bank, taken) for c in bank[:n]]
    return sorted(chosen, key=lambda c: -c.score)


def _candidates(steps: list[tuple[float, int, int]], progress: list[Progress], phrases: tuple[tuple[int, ...], ...]
                ) -> list[Candidate]:
    """(score, beam, token) steps as candidates, best first (ties: in the order given), each
    distinct step once, with the progress it makes; steps that cannot happen (score -inf) dropped."""
    seen, out = set(), []
    for score, beam, token in steps:
        if math.isfinite(score) and (beam, token) not in seen:
            seen.add((beam, token))
            after = progress[beam] if token == EOS else progress[beam].advance(token, phrases)
            out.append(Candidate(score, beam, token, after, after.count(phrases)))
    return sorted(out, key=lambda c: -c.score)


@torch.no_grad()
def constrained_beam_search(model: Models, src: Tensor, decode: DecodeConfig, guides: Guides
                            ) -> list[list[Hypothesis]]:
    """Beam search in which each sentence's outputs contain every phrase of its guide's
    `include` (as well as starting with its prefix and avoiding its excluded phrases).

    Returns `decode.nbest` outputs per sentence: those that contain every phrase first, then
    by score (log-probability ÷ GNMT length penalty, as `beam_search`). With no phrases it
    makes exactly `beam_search`'s choices.
    """
    K, B, alpha = decode.beam_size, src.size(0), decode.length_penalty
    guides = list(guides) if guides is not None else [None] * B
    phrases = [g.include if g is not None else () for g in guides]
    state = Decoding(model, src, decode)
    budget = max_lengths(decode, src, state.max_positions - 1, guides)
    state.repeat(K)
    alive = list(range(B))  # original sentence of each running group of K rows
    scores = torch.full((B, K), -torch.inf, device=src.device)
    scores[:, 0] = 0.0
    progress = [[Progress((False,) * len(p))] * K for p in phrases]  # per running sentence, per beam
    history = torch.empty((B * K, 0), dtype=torch.long, device=src.device)
    last = torch.full((B * K, 1), BOS, dtype=torch.long, device=src.device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]

    def finish(sentence: int, tokens: list[int], score: float) -> None:
        unmet = tuple(i for i, p in enumerate(phrases[sentence]) if not contains(tokens, p))
        finished[sentence].append(Hypothesis(tokens, score / length_penalty(len(tokens) + 1, alpha), unmet))

    for t in range(int(budget.max()) + 1):
        b = len(alive)
        alive_t = torch.tensor(alive, device=src.device)
        logp = state.next_logp(last)  # (b·K, V)
        at_limit = budget[alive_t] <= t  # (b,)
        # Only a hypothesis with every phrase in it may end (until the length limit forces </s>).
        for i in range(b):
            for k in range(K):
                if not progress[i][k].complete():
                    logp[i * K + k, EOS] = -torch.inf
        constrain(decode, logp, history, at_limit.repeat_interleave(K),
                  guides_for(guides, alive_t.repeat_interleave(K)))
        row_scores, row_tokens = row_topk(logp, min(2 * K, logp.size(1)))
        row_scores += scores.view(-1, 1)
        W = row_scores.size(1)
        top_scores, top_index = row_scores.view(b, K * W).topk(2 * K, dim=1)  # (b, 2K)
        top_beam, top_token = top_index // W, row_tokens.view(b, K * W).gather(1, top_index)
        spent = (budget[alive_t] <= t + 1).tolist()
        new_scores, parents, tokens, new_progress, done = [], [], [], [], []
        for i, sentence in enumerate(alive):
            p, banks = phrases[sentence], sum(map(len, phrases[sentence])) + 1
            steps = list(zip(top_scores[i].tolist(), top_beam[i].tolist(), top_token[i].tolist()))
            if p:  # also every step that takes a hypothesis further into its phrases, and its best token
                rows = logp[i * K:(i + 1) * K]
                for beam in range(K):
                    base = float(scores[i, beam])
                    if math.isfinite(base):
                        steps += [(base + float(rows[beam, token]), beam, token)
                                  for token in progress[i][beam].wanted(p) | {int(rows[beam].argmax())}]
            candidates = _candidates(steps, progress[i], p)
            for c in allocate(candidates, banks, K):
                if c.token == EOS:
                    finish(sentence, history[i * K + c.beam].tolist(), c.score)
            go_on = allocate([c for c in candidates if c.token != EOS], banks, K)
            go_on += [Candidate(-math.inf, 0, EOS, progress[i][0], 0)] * (K - len(go_on))
            new_scores.append([c.score for c in go_on])
            parents.extend(i * K + c.beam for c in go_on)
            tokens.extend(c.token for c in go_on)
            new_progress.append([c.progress for c in go_on])
        scores = torch.tensor(new_scores, device=src.device, dtype=scores.dtype)
        parent = torch.tensor(parents, device=src.device)
        token = torch.tensor(tokens, device=src.device)
        history = torch.cat([history.index_select(0, parent), token.unsqueeze(1)], dim=1)
        for i, sentence in enumerate(alive):
            if spent[i]:  # the next step could only force </s>: the running outputs end here
                for k in range(K):
                    if math.isfinite(score := float(scores[i, k])):
                        finish(sentence, history[i * K + k].tolist(), score)
            done.append(len(finished[sentence]) >= K or bool(at_limit[i]) or spent[i])
        if all(done):
            break
        keep = [i for i, d in enumerate(done) if not d]
        keep_t = torch.tensor(keep, device=src.device)
        keep_rows = (keep_t.unsqueeze(1) * K + torch.arange(K, device=src.device)).view(-1)
        state.select(parent.index_select(0, keep_rows), cross_index=keep_rows)
        alive, scores, progress = [alive[i] for i in keep], scores[keep_t], [new_progress[i] for i in keep]
        history, token = history.index_select(0, keep_rows), token.index_select(0, keep_rows)
        last = token.unsqueeze(1)
    return [sorted(f, key=lambda h: (len(h.unmet), -h.score))[:decode.nbest] for f in finished]

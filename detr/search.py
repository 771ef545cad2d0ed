"""Autoregressive search over `Seq2Seq.encode` / `Seq2Seq.decode` with the key/value cache.

Each function takes a batch of source ids and returns, per sentence, output ids (without
<s> and </s>) with a score. The source is encoded once; each step feeds only the newest
token; sentences that have finished leave the batch, so the cost follows the sentences
still running. What a sentence gets does not depend on which other sentences share its
batch: every choice is made per row. The searches are classes run a step at a time
(`OnePerSentence`, `BeamSearch`), so that new sentences may also join a running batch
between steps (continuous batching, for a server); the functions run one batch to its end.

Every setting comes from one `DecodeConfig` (beam size, n-best, length penalty, length
limits, sampling); the functions have no defaults of their own. `model` may be one model
or several (an ensemble: their log-probabilities are averaged at every step, see
`Decoding`). `guides` steer single sentences: a forced prefix and phrases that must not
appear (`Guide`); phrases that must appear need `detr.constraints.constrained_beam_search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detr.config import DecodeConfig
from detr.model import KVCache, Seq2Seq, padding_mask
from detr.tokenizer import BOS, EOS, PAD

Models = Seq2Seq | Sequence[Seq2Seq]


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, </s> excluded
    score: float  # greedy/sampling: sum of log-probabilities; beam: that sum ÷ GNMT length penalty
    unmet: tuple[int, ...] = ()  # constrained search: indices of the `include` phrases it lacks


@dataclass(frozen=True)
class Guide:
    """Steering of one sentence's output, in target ids: it starts with `prefix`, contains
    every phrase of `include` (constrained beam search only) and none of `exclude`."""

    prefix: tuple[int, ...] = ()
    include: tuple[tuple[int, ...], ...] = ()
    exclude: tuple[tuple[int, ...], ...] = ()


Guides = Sequence[Guide | None] | None  # one per source row


def ensemble_logp(logits: Iterable[Tensor]) -> Tensor:
    """Log-probabilities from the logits (..., V) of one model or several: each member's are
    normalised, averaged and normalised again (a product of experts). Computed in place on the
    logits (float32; each a model call's own output) by log-softmax's `out=` form: at a large
    vocabulary and batch a new (N, V) tensor per step, or logsumexp's temporaries, cost several
    times the softmax itself (measured: 7x at 32 rows of 32k)."""
    total, n = None, 0
    for member in logits:
        logp = member.float()
        logp = torch.log_softmax(logp, dim=-1, out=logp)
        total = logp if total is None else total.add_(logp)
        n += 1
    if n == 1:
        return total
    total.div_(n)
    return torch.log_softmax(total, dim=-1, out=total)


def _chunks(x: Tensor, k: int) -> Tensor | None:
    """`x` (N, V) viewed as (N, V / c, c) for a chunk width c dividing V, with at least `k` chunks;
    None where V has no such width (then the plain operation is used)."""
    V = x.size(1)
    width = next((c for c in range(128, 15, -1) if V % c == 0 and V // c >= k), None)
    return None if width is None or not x.is_contiguous() else x.view(x.size(0), V // width, width)


def row_argmax(x: Tensor) -> Tensor:
    """`x.argmax(-1)` for (N, V), in two passes: the chunk holding each row's maximum (by the
    chunks' maxima, a vectorised reduction), then the position inside it. The first maximal
    position wins, as in argmax; about 5x faster at V = 32k, where argmax runs scalar."""
    chunks = _chunks(x, 1)
    if chunks is None:
        return x.argmax(-1)
    best = chunks.amax(-1).argmax(-1)  # (N,) first chunk with the row's maximum
    inside = chunks[torch.arange(x.size(0), device=x.device), best].argmax(-1)  # (N,)
    return best * chunks.size(2) + inside


def row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1)` for (N, V): values and positions, best first. The k largest values of a
    row lie in the k chunks with the largest maxima (a chunk outside them has a maximum no larger
    than k others, so no element of it beats all but k-1), so the exact top k is taken from those
    k chunks only; about 3x faster at V = 32k. Equal values may come in another order than topk's."""
    chunks = _chunks(x, k)
    if chunks is None:
        return x.topk(k, dim=1)
    N, _, width = chunks.shape
    top_chunks = chunks.amax(-1).topk(k, dim=1).indices  # (N, k)
    candidates = chunks.gather(1, top_chunks.unsqueeze(-1).expand(N, k, width)).view(N, k * width)
    values, at = candidates.topk(k, dim=1)
    return values, top_chunks.gather(1, at // width) * width + at % width


class Decoding:
    """The state of one model, or of an ensemble, over a batch of running outputs.

    It encodes the source once per model, keeps each model's key/value cache, and gives the
    next token's log-probabilities. An ensemble's are the mean of its members'
    log-probabilities, renormalised (a product of experts): an ensemble of one model, or of
    a model with itself, gives exactly that model's log-probabilities. New sentences may join
    between steps (`admit`: continuous batching).

    With `decode.anti_lm` > 0 (MMI-antiLM, Li et al., 2016, "A Diversity-Promoting Objective
    Function for Neural Conversation Models"), a token's score over an output's first
    `decode.anti_lm_steps` tokens is log p(token | source, output so far) − anti_lm · log
    p(token | empty source, output so far): the same model given a blank line (only </s>) stands
    in for the language model, so replies that suit any input lose to those that suit this one.
    </s> is left out of the subtraction (it would reward ending at once). The scores are no
    longer normalised: beam and greedy rank by them, sampling renormalises.
    """

    def __init__(self, model: Models, src: Tensor, decode: DecodeConfig | None = None) -> None:
        self.models: list[Seq2Seq] = [model] if isinstance(model, Seq2Seq) else list(model)
        self.src_mask = padding_mask(src)  # (B, 1, 1, S)
        # Each model's encoder output (B, S, D), until the first step projects it into the caches.
        self.memories: list[Tensor] | None = [m.encode(src, self.src_mask) for m in self.models]
        self.caches: list[KVCache] = [m.new_cache() for m in self.models]
        self.anti_lm = (decode.anti_lm, decode.anti_lm_steps) if decode is not None and decode.anti_lm else None
        self.lm: Decoding | None = self._language_model(src.size(0)) if self.anti_lm else None

    @property
    def max_positions(self) -> int:
        return min(m.config.max_positions for m in self.models)

    def _language_model(self, rows: int) -> Decoding:
        """The anti-LM: these models over `rows` blank sources, every row starting at the next step."""
        return Decoding(self.models, torch.full((rows, 1), EOS, device=self.src_mask.device))

    def repeat(self, k: int) -> None:
        """Make room for `k` running outputs per sentence (beam search), before the first step."""
        self.src_mask = self.src_mask.repeat_interleave(k, dim=0)
        self.memories = [memory.repeat_interleave(k, dim=0) for memory in self.memories]
        if self.lm is not None:
            self.lm.repeat(k)

    def admit(self, src: Tensor, k: int) -> None:
        """Add the sentences `src` (n, S) to the running batch, `k` rows each, after its rows: their
        outputs start at the next step. Sources are padded to one length (masked)."""
        mask = padding_mask(src).repeat_interleave(k, dim=0)  # (n·k, 1, 1, S)
        S = max(mask.size(-1), self.src_mask.size(-1))
        self.src_mask = torch.cat([_pad(self.src_mask, S, -1), _pad(mask, S, -1)])
        for i, (model, cache) in enumerate(zip(self.models, self.caches)):
            memory = model.encode_packed(src).repeat_interleave(k, dim=0)  # joiners: mixed lengths
            if self.memories is None:  # steps taken: the new rows go straight into the cache
                model.extend_cache(cache, memory)
            else:
                self.memories[i] = torch.cat([_pad(self.memories[i], S, 1), _pad(memory, S, 1)])
        if self.lm is not None:
            self.lm.admit(torch.full((src.size(0), 1), EOS, device=src.device), k)
        elif self.anti_lm:  # the anti-LM had been dropped (every row was past it): anew, for every row
            self.lm = self._language_model(self.src_mask.size(0))

    def next_logp(self, last: Tensor) -> Tensor:
        """Log-probabilities (N, V) of the token after `last` (N, 1) (anti-LM scores, see above, for
        the rows still within `anti_lm_steps`)."""
        # Output tokens each row has made (int, or (N,)), read before the step extends the cache.
        made = self.caches[0].positions() if self.lm is not None else None
        memories = self.memories or [None] * len(self.models)
        logp = ensemble_logp(model.decode(last, memory, self.src_mask, cache)[:, -1]
                             for model, memory, cache in zip(self.models, memories, self.caches))
        self.memories = None  # the caches hold what the next steps need of it
        if self.lm is not None:
            weight, steps = self.anti_lm
            made = torch.as_tensor(made, device=logp.device).view(-1, 1)  # (N|1, 1)
            lm = self.lm.next_logp(last)
            lm[:, EOS] = 0.0
            logp.sub_(lm.mul_((made < steps) * weight))
            if not bool((made + 1 < steps).any()):
                self.lm = None  # no row is within it from the next step on (until sentences join)
        return logp

    def select(self, index: Tensor, cross_index: Tensor | None = None, trim: bool = False) -> None:
        """Keep running outputs `index` (N',) in that order. `cross_index` selects the rows of the
        encoder memory separately (beam search reorders outputs within a sentence, which share
        one memory, and only drops whole sentences); by default it follows `index`. The caches copy
        only the rows whose place changes (`KVCache.select`): a row that leaves is best filled by one
        of the last (`swap_out`). `trim`: also drop source positions that only departed sentences
        needed (a batch that new sentences keep joining would otherwise keep the longest source it
        ever held)."""
        cross_index = index if cross_index is None else cross_index
        for cache in self.caches:
            cache.select(index, cross_index)
        if self.lm is not None:
            self.lm.select(index, cross_index)
        if not _is_identity(cross_index, self.src_mask.size(0)):
            self.src_mask = self.src_mask.index_select(0, cross_index)
            S = int(self.src_mask.sum(-1).max()) if trim and cross_index.numel() else self.src_mask.size(-1)
            if S < self.src_mask.size(-1):
                self.src_mask = self.src_mask[..., :S]
                for cache in self.caches:
                    cache.keep_source(S)


def _is_identity(index: Tensor, size: int) -> bool:
    return index.numel() == size and bool((index == torch.arange(size, device=index.device)).all())


def swap_out(leaving: Tensor) -> Tensor:
    """The rows to keep (n',) when rows `leaving` (n,) bool leave a batch: the same rows in their
    places, each place left empty below n' filled by one of the last rows that stay, so that only
    those rows move (an order-keeping selection would move every row after the first to leave)."""
    stay = ~leaving
    n = int(stay.sum())
    keep = torch.arange(n, device=leaving.device)
    keep[leaving[:n]] = stay[n:].nonzero().squeeze(1) + n
    return keep


def _pad(x: Tensor, S: int, dim: int) -> Tensor:
    """`x` padded with zeros (False for a mask) to size S in dimension `dim`."""
    if x.size(dim) == S:
        return x
    shape = list(x.shape)
    shape[dim] = S - x.size(dim)
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def max_lengths(decode: DecodeConfig, src: Tensor, cap: int, guides: Guides = None) -> Tensor:
    """(B,) output budgets for source ids `src` (B, S): `max_len_a` · source length + `max_len_b`
    (its </s> not counted), at least room for a guide's prefix and phrases, at most `cap`; then
    </s> is forced."""
    src_len = (src != PAD).sum(1) - 1
    budget = (decode.max_len_a * src_len.double() + decode.max_len_b).floor().long()
    if guides is not None:
        needed = torch.tensor([len(g.prefix) + sum(map(len, g.include)) + 1 if g else 0 for g in guides],
                              device=src.device)
        budget = torch.maximum(budget, needed)
    return budget.clamp(min=1, max=cap)


def constrain(decode: DecodeConfig, logp: Tensor, history: Tensor, at_limit: Tensor, guides: Guides = None,
              steps: Tensor | None = None) -> None:
    """Edit `logp` (N, V) in place for rows whose outputs so far are `history` (N, t): no </s>
    before `min_len`, tokens already in the output penalised (`repetition_penalty`: their
    log-probabilities, all ≤ 0, multiplied by it, as CTRL and Hugging Face do), no repeated n-gram
    of size `no_repeat_ngram`, no excluded phrase, the guide's prefix while it lasts (at the
    probability the model gives it), only </s> at the length limit. `guides`: one per row, or None.
    `steps` (N,): how many of its last columns of `history` each row has made (rows that joined a
    running batch later; the columns before are PAD); None: all t."""
    t = history.size(1)
    made = [t] * logp.size(0) if steps is None else steps.tolist()
    outputs = [seq[t - m:] for seq, m in zip(history.tolist(), made)] if decode.no_repeat_ngram or guides else None
    forced = [] if guides is None else [(row, g.prefix[m]) for row, (g, m) in enumerate(zip(guides, made))
                                        if g is not None and m < len(g.prefix)]
    kept = [float(logp[row, token]) for row, token in forced]
    if steps is None and t < decode.min_len:
        logp[:, EOS] = -torch.inf
    elif steps is not None and decode.min_len:
        logp[steps < decode.min_len, EOS] = -torch.inf
    if decode.repetition_penalty != 1.0 and t:
        seen = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, history, True)
        if steps is not None:  # the PAD before a row's start is not an output
            made_here = torch.arange(t, device=history.device) >= (t - steps).unsqueeze(1)  # (N, t)
            seen[:, PAD] = (history.eq(PAD) & made_here).any(1)
        logp[seen] *= decode.repetition_penalty
    n = decode.no_repeat_ngram
    if n:
        for row, seq in enumerate(outputs):
            if len(seq) < n - 1:
                continue
            prefix = tuple(seq[len(seq) - n + 1:])
            banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
            if banned:
                logp[row, banned] = -torch.inf
    if guides is not None and any(g is not None and g.exclude for g in guides):
        _exclude(logp, outputs, guides)
    for (row, token), value in zip(forced, kept):
        logp[row] = -torch.inf
        logp[row, token] = value
    if bool(at_limit.any()):
        eos_only = torch.full_like(logp[0], -torch.inf)
        eos_only[EOS] = 0.0
        logp[at_limit] = eos_only


def _exclude(logp: Tensor, outputs: list[list[int]], guides: Sequence[Guide | None]) -> None:
    """Ban, per row, the last token of every excluded phrase whose other tokens end its output so far."""
    for row, (g, seq) in enumerate(zip(guides, outputs)):
        if g is None:
            continue
        banned = [phrase[-1] for phrase in g.exclude
                  if len(seq) >= len(phrase) - 1 and tuple(seq[len(seq) - len(phrase) + 1:]) == phrase[:-1]]
        if banned:
            logp[row, banned] = -torch.inf


def guides_for(guides: Guides, index: Tensor) -> Guides:
    """The guides of rows `index` (None stays None)."""
    return None if guides is None else [guides[i] for i in index.tolist()]


OnStep = Callable[[list[int], list[int]], None]  # (rows still running, the token each chose) after every step


class RunningBatch:
    """What both searches keep of a batch that sentences join and leave between steps: the encoder
    state, each sentence's id, length budget and steps made, and each row's outputs so far
    (`history`, right-aligned: a row's own tokens are its last `steps` columns, PAD before them).
    A sentence has `k` rows (its beam; 1 for greedy and sampling)."""

    def __init__(self, model: Models, decode: DecodeConfig) -> None:
        self.model, self.decode = model, decode
        self.state: Decoding | None = None
        self.ids: list[int] = []  # each running sentence's id (from `admit`), in row order
        self.guides: list[Guide | None] | None = None  # one per row
        self.joined = False  # sentences joined a running batch: rows of different ages
        self._count = 0

    @property
    def running(self) -> int:
        """Sentences still running."""
        return len(self.ids)

    def _add(self, src: Tensor, guides: Guides, k: int) -> list[int]:
        """Add sentences `src` (n, S) (ids ending in </s>, right-padded), `k` rows each; their ids."""
        n, device = src.size(0), src.device
        ids = list(range(self._count, self._count + n))
        self._count += n
        if self.state is None:
            self.state = Decoding(self.model, src, self.decode)
            if k > 1:
                self.state.repeat(k)
            self.history = torch.empty((0, 0), dtype=torch.long, device=device)  # (b·k, t)
            self.budget = self.steps = self.history.new_empty(0)  # (b,) each
            self.last = self.history.new_empty((0, 1))  # (b·k, 1)
        else:
            self.state.admit(src, k)
            self.joined = True
        budget = max_lengths(self.decode, src, self.state.max_positions - 1, guides)
        self.budget, self.steps = torch.cat([self.budget, budget]), torch.cat([self.steps, torch.zeros_like(budget)])
        self.history = torch.cat([self.history, self.history.new_full((n * k, self.history.size(1)), PAD)])
        self.last = torch.cat([self.last, self.last.new_full((n * k, 1), BOS)])
        if guides is not None or self.guides is not None:
            rows = [g for g in guides for _ in range(k)] if guides is not None else [None] * (n * k)
            self.guides = (self.guides or [None] * (len(self.ids) * k)) + rows
        self.ids += ids
        return ids

    def _empty(self) -> None:
        """Every sentence has ended: the next `admit` starts a new batch."""
        self.state, self.ids, self.guides, self.joined = None, [], None, False


class OnePerSentence(RunningBatch):
    """Greedy search or sampling, one running output per sentence, a step at a time.

    Sentences may join between steps (`admit`; continuous batching: a server keeps the batch full
    while requests come and go), and each leaves as soon as it ends (`step` hands it back). A
    sentence's output is the one it gets decoded alone: every choice is made per row, its own
    positions and source are masked from the others'. `pick` maps log-probs (N, V) to ids (N,);
    `on_step` hears each step's tokens as they are chosen (</s> included), for streaming.
    """

    def __init__(self, model: Models, decode: DecodeConfig, pick: Callable[[Tensor], Tensor],
                 on_step: OnStep | None = None) -> None:
        super().__init__(model, decode)
        self.pick, self.on_step = pick, on_step
        self.out: dict[int, Hypothesis] = {}

    @torch.no_grad()
    def admit(self, src: Tensor, guides: Guides = None) -> list[int]:
        """Start sentences `src` (n, S) (ids ending in </s>, right-padded) at the next step; their ids."""
        ids = self._add(src, guides, 1)
        self.out.update((i, Hypothesis([], 0.0)) for i in ids)
        return ids

    @torch.no_grad()
    def step(self) -> list[tuple[int, Hypothesis]]:
        """Choose every running sentence's next token; the sentences that ended, with their outputs."""
        logp = self.state.next_logp(self.last)  # (b, V)
        constrain(self.decode, logp, self.history, self.budget <= self.steps, self.guides,
                  self.steps if self.joined else None)
        token = self.pick(logp)  # (b,)
        chosen = logp.gather(1, token.unsqueeze(1)).squeeze(1)
        ended = token == EOS
        # A spent budget ends the sentence now: the next step could only force </s> (probability 1).
        finished = ended | (self.budget <= self.steps + 1)
        for i, tok, s, eos in zip(self.ids, token.tolist(), chosen.tolist(), ended.tolist()):
            self.out[i].score += s
            if not eos:
                self.out[i].tokens.append(tok)
        if self.on_step is not None:
            self.on_step(self.ids, token.tolist())
        self.history = torch.cat([self.history, token.unsqueeze(1)], dim=1)
        self.steps = self.steps + 1
        done = [(i, self.out.pop(i)) for i, f in zip(self.ids, finished.tolist()) if f]
        if len(done) == len(self.ids):
            self._empty()
            return done
        if done:
            keep = swap_out(finished)  # (b',)
            self.ids = [self.ids[k] for k in keep.tolist()]
            self.guides = guides_for(self.guides, keep)
            self.budget, self.steps, token = self.budget[keep], self.steps[keep], token[keep]
            self.history = self.history[keep, self.history.size(1) - int(self.steps.max()):]
            self.state.select(keep, trim=self.joined)
        self.last = token.unsqueeze(1)  # (b, 1)
        return done


def _run(search: OnePerSentence | BeamSearch, src: Tensor, guides: Guides) -> list:
    """Decode the batch `src` to the end: each sentence's result, in order."""
    ids = search.admit(src, guides)
    done: dict[int, object] = {}
    while search.running:
        done.update(search.step())
    return [done[i] for i in ids]


def greedy(model: Models, src: Tensor, decode: DecodeConfig | None = None, guides: Guides = None
           ) -> list[Hypothesis]:
    """The most probable token at each step. `src`: (B, S) ids ending in </s>, right-padded;
    `decode` gives the length limits (default: `DecodeConfig()`)."""
    return _run(OnePerSentence(model, decode or DecodeConfig(), row_argmax), src, guides)


def sample(model: Models, src: Tensor, decode: DecodeConfig | None = None,
           generator: torch.Generator | None = None, on_step: OnStep | None = None,
           guides: Guides = None) -> list[Hypothesis]:
    """Draw each token from the model's distribution, sharpened or flattened by `decode.temperature`
    and cut to the `top_k` most probable tokens and/or the smallest set holding `top_p` of the mass.
    One draw per row of `src` (repeat rows for several samples); `on_step` hears every step's tokens."""
    decode = decode or DecodeConfig()
    temperature, top_k, top_p = decode.temperature, decode.top_k, decode.top_p

    def pick(logp: Tensor) -> Tensor:
        scaled = logp / temperature  # (N, V)
        if top_k > 0:
            kth = scaled.topk(min(top_k, scaled.size(1)), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, -torch.inf)
        if top_p < 1.0:
            sorted_logp, order = scaled.sort(dim=-1, descending=True)
            mass_before = sorted_logp.softmax(-1).cumsum(-1) - sorted_logp.softmax(-1)
            drop = mass_before >= top_p  # keeps the most probable token always
            scaled = scaled.scatter(1, order, sorted_logp.masked_fill(drop, -torch.inf))
        probs = scaled.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _run(OnePerSentence(model, decode, pick, on_step), src, guides)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016): ((5 + |Y|) / 6) ** α; α = 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


class BeamSearch(RunningBatch):
    """Beam search, a step at a time: the `decode.beam_size` best partial outputs per sentence;
    each sentence's `decode.nbest` finished ones, best first, scored by log-probability ÷
    length_penalty(length + 1, `decode.length_penalty`).

    A sentence stops once `beam_size` outputs have finished (or its length budget is spent);
    its rows then leave the batch, and new sentences may join between steps (`admit`), as in
    `OnePerSentence`.

    Diverse beam search (Vijayakumar et al., 2016, "Diverse Beam Search"): with `decode.beam_groups`
    G > 1 the beam is G groups of beam_size / G rows, each a beam search of its own, run one after
    the other at every step; a group ranks its candidates by log-probability minus
    `decode.diversity_penalty` × how many rows of the groups before it chose the same token at this
    step (Hamming diversity). A group stops once beam_size / G of its outputs have finished, the
    sentence once every group has; its n-best are the best of all groups' finished outputs. The first
    group is a beam search of beam_size / G, untouched by the others; the scores returned are the
    model's, without the penalty, so that outputs of different groups compare.
    """

    def __init__(self, model: Models, decode: DecodeConfig) -> None:
        super().__init__(model, decode)
        self.groups = decode.beam_groups
        self.finished: dict[int, list[list[Hypothesis]]] = {}  # per sentence, per group
        self.scores = torch.empty((0, decode.beam_size))  # (b, K) running log-probabilities, as ranked
        # (b, K) the same without the diversity penalty; None when it is the same tensor
        self.logprob: Tensor | None = torch.empty((0, decode.beam_size)) if self.penalised else None

    @property
    def penalised(self) -> bool:
        return self.groups > 1 and self.decode.diversity_penalty > 0

    @torch.no_grad()
    def admit(self, src: Tensor, guides: Guides = None) -> list[int]:
        """Start sentences `src` (n, S) at the next step, `beam_size` rows each; their ids."""
        K, n = self.decode.beam_size, src.size(0)
        ids = self._add(src, guides, K)
        scores = torch.full((n, K), -torch.inf, device=src.device)
        scores[:, ::K // self.groups] = 0.0  # one live beam per group at the start: the others would duplicate it
        self.scores = torch.cat([self.scores.to(src.device), scores])
        if self.logprob is not None:
            self.logprob = torch.cat([self.logprob.to(src.device), scores])
        self.finished.update((i, [[] for _ in range(self.groups)]) for i in ids)
        return ids

    def _output(self, row: int, made: int, score: float) -> Hypothesis:
        """The hypothesis of history row `row`, which has made `made` tokens, ending with log-prob `score`."""
        tokens = self.history[row, self.history.size(1) - made:].tolist()
        return Hypothesis(tokens, score / length_penalty(len(tokens) + 1, self.decode.length_penalty))

    @staticmethod
    def _candidates(logp: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The 2k best continuations of each of u beams of k rows: their scores, beams (0..k-1), tokens
        (each (u, 2k), best first), and which k of them go on (u, k: the best that do not end in </s>).
        `logp` (u·k, V): the rows' next-token log-probabilities; `scores` (u, k): the rows' so far."""
        u, k = scores.shape
        # The 2k best continuations of each hypothesis hold the 2k best of the beam: rank those only.
        row_scores, row_tokens = row_topk(logp, min(2 * k, logp.size(1)))  # (u·k, 2k)
        row_scores += scores.reshape(-1, 1)
        W = row_scores.size(1)
        top_scores, top_index = row_scores.view(u, k * W).topk(2 * k, dim=1)  # (u, 2k): at most k end in </s>
        top_token = row_tokens.view(u, k * W).gather(1, top_index)
        go_on = torch.sort((top_token == EOS).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (u, k)
        return top_scores, top_index // W, top_token, go_on

    def _diverse_candidates(self, logp: Tensor, closed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_candidates` for every group (units of k rows, group after group; rows in unit order),
        each group's log-probabilities lowered by the diversity penalty for the tokens the groups before
        it chose at this step. `closed` (b, G): groups that have finished (they choose nothing)."""
        b, G, V = len(self.ids), self.groups, logp.size(1)
        k = self.decode.beam_size // G
        chosen = logp.new_zeros((b, V))  # how many rows of the groups so far go on with each token
        parts = []
        for g, rows in enumerate(logp.view(b, G, k, V).unbind(1)):  # each (b, k, V)
            penalised = rows - self.decode.diversity_penalty * chosen.unsqueeze(1) if g else rows
            part = self._candidates(penalised.reshape(b * k, V), self.scores.view(b, G, k)[:, g])
            live = (~closed[:, g]).to(chosen.dtype).unsqueeze(1).expand(b, k)
            chosen.scatter_add_(1, part[2].gather(1, part[3]), live)
            parts.append(part)
        return tuple(torch.stack(p, dim=1).view(b * G, -1) for p in zip(*parts))

    @torch.no_grad()
    def step(self) -> list[tuple[int, list[Hypothesis]]]:
        """Extend every running sentence's beam by one token; the sentences that ended, with their
        `nbest` outputs."""
        K, G, b, device = self.decode.beam_size, self.groups, len(self.ids), self.history.device
        k, units = K // G, b * G  # a unit: one group of one sentence, rows unit·k .. unit·k + k - 1
        logp = self.state.next_logp(self.last)  # (b·K, V)
        at_limit = self.budget <= self.steps  # (b,)
        made = self.steps.tolist()
        constrain(self.decode, logp, self.history, at_limit.repeat_interleave(K), self.guides,
                  self.steps.repeat_interleave(K) if self.joined else None)
        if G == 1:  # (a sentence whose beam has finished has left)
            top_scores, top_beam, top_token, go_on = self._candidates(logp, self.scores)
        else:
            closed = self._closed()  # (b, G)
            top_scores, top_beam, top_token, go_on = self._diverse_candidates(logp, closed)
        parent = torch.arange(units, device=device).unsqueeze(1) * k + top_beam  # (units, 2k) rows
        if self.logprob is None:
            model_scores = top_scores
        else:  # the candidates' scores without the penalty
            model_scores = self.logprob.view(-1)[parent] + logp[parent, top_token]
            self.logprob = model_scores.gather(1, go_on).view(b, K)
        # Outputs ending here, if ranked among their group's k best candidates (none from a closed group).
        ending = top_token[:, :k].eq(EOS) & top_scores[:, :k].isfinite()
        if G > 1:
            ending &= ~closed.view(units, 1)
        for u, r in ending.nonzero().tolist():
            i, g = divmod(u, G)
            self.finished[self.ids[i]][g].append(self._output(int(parent[u, r]), made[i], float(model_scores[u, r])))
        # The k best candidates of each group that go on; a group that has finished keeps none alive.
        self.scores = top_scores.gather(1, go_on)
        if G > 1:
            self.scores.masked_fill_(self._closed().view(units, 1), -torch.inf)
        self.scores = self.scores.view(b, K)
        parent = parent.gather(1, go_on).view(-1)  # (b·K,)
        token = top_token.gather(1, go_on).view(-1)  # (b·K,)
        self.history = torch.cat([self.history.index_select(0, parent), token.unsqueeze(1)], dim=1)
        self.steps = self.steps + 1
        # A spent budget ends the sentence now: the next step could only force </s> (probability 1).
        spent = self.budget <= self.steps  # (b,)
        final = self.scores if self.logprob is None else self.logprob
        for i in spent.nonzero().squeeze(1).tolist():
            for r in range(K):
                if math.isfinite(float(self.scores[i, r])):
                    self.finished[self.ids[i]][r // k].append(self._output(i * K + r, made[i] + 1, float(final[i, r])))
        done = torch.tensor([all(len(f) >= k for f in self.finished[i]) for i in self.ids], device=device) \
            | at_limit | spent
        out = [(i, self._nbest(self.finished.pop(i))) for i, d in zip(self.ids, done.tolist()) if d]
        if len(out) == b:
            self._empty()
            self.scores = self.scores[:0]
            self.logprob = None if self.logprob is None else self.logprob[:0]
            return out
        keep_sentences = swap_out(done)  # (b',)
        keep_rows = (keep_sentences.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
        self.state.select(parent.index_select(0, keep_rows), cross_index=keep_rows, trim=self.joined)
        self.ids = [self.ids[i] for i in keep_sentences.tolist()]
        self.guides = guides_for(self.guides, keep_rows)
        self.budget, self.steps, self.scores = self.budget[keep_sentences], self.steps[keep_sentences], \
            self.scores[keep_sentences]
        if self.logprob is not None:
            self.logprob = self.logprob[keep_sentences]
        self.history = self.history.index_select(0, keep_rows)
        self.history = self.history[:, self.history.size(1) - int(self.steps.max()):]
        self.last = token.index_select(0, keep_rows).unsqueeze(1)
        return out

    def _closed(self) -> Tensor:
        """(b, G): which groups of the running sentences have finished beam_size / G outputs."""
        k = self.decode.beam_size // self.groups
        return torch.tensor([[len(f) >= k for f in self.finished[i]] for i in self.ids], device=self.history.device)

    def _nbest(self, groups: list[list[Hypothesis]]) -> list[Hypothesis]:
        """A sentence's `nbest` outputs, best first: of each group's beam_size / G best finished ones."""
        k = self.decode.beam_size // self.groups
        best = [h for found in groups for h in sorted(found, key=lambda h: -h.score)[:k]]
        return sorted(best, key=lambda h: -h.score)[:self.decode.nbest]


@torch.no_grad()
def beam_search(model: Models, src: Tensor, decode: DecodeConfig | None = None, guides: Guides = None
                ) -> list[list[Hypothesis]]:
    """Beam search over the batch `src` (see `BeamSearch`) with `decode` (default: `DecodeConfig()`):
    each sentence's `decode.nbest` finished outputs, best first."""
    return _run(BeamSearch(model, decode or DecodeConfig()), src, guides)

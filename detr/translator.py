"""Text in, text out: a trained model, its tokenizer and search settings, batched by length.

    translator = detr.load("runs/tiny")
    translator.translate(["three red dogs"])                                 # → ["drei rote Hunde"]
    translator.translate_nbest(["one cat"], translator.options(beam_size=4, nbest=2))
    translator.translate(["one cat"], constraints=[Constraints(include=("Katze",))])
    translator.score(["one cat"], ["eine Katze"])                            # → [Score(-1.2, 3)]
    translator.backward = detr.load("runs/tiny_backward")  # then options(backward_weight=0.5): MMI-bidi
    Translator.ensemble([detr.load("runs/a"), detr.load("runs/b")])          # one translator, two models

Decoding settings travel as one `DecodeConfig`: the run's own (`config.yaml`'s `decode`
section) unless a call passes another, usually made with `options(...)`. Per-line steering
(a forced prefix, phrases to include or exclude) travels as one `Constraints` per line.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from detr.batching import pack_by_tokens, pad
from detr.config import DecodeConfig
from detr.constraints import Constraints, constrained_beam_search
from detr.errors import ConfigError, DataError, DetrError
from detr.loss import mean_token_loss, seq2seq_loss
from detr.mbr import mbr_rank
from detr.model import Seq2Seq, padding_mask
from detr.quantize import quantize
from detr.readers import Example
from detr.rerank import anti_lm_term, backward_term, rerank
from detr.search import (
    BeamSearch,
    Guide,
    Guides,
    Hypothesis,
    OnePerSentence,
    OnStep,
    beam_search,
    ensemble_logp,
    greedy,
    row_argmax,
    sample,
)
from detr.tokenizer import BOS, PAD, Tokenizer

log = logging.getLogger(__name__)

CHUNK_BATCHES = 8  # lines read ahead = this × decode.batch_size: enough to sort by length, little to lose
JOIN_STEPS = 4  # a stream's new lines wait at most this many steps to join together (see `TranslationStream`)
JOIN_SHARE = 4  # ... or less, once they are at least 1/JOIN_SHARE of the lines running
# New lines join a stream's beam search only within this many steps of its batch's start. Late joiners
# make every step of the rest dearer (each admission copies the reordered keys and values of all the
# beams, whose self-attention then spans the oldest row): in two server processes (benchmarks/RESULTS.md,
# "beam search as a stream") 4 served as much as joining at any step, with a p99 latency of 1.9 s
# instead of 3.0 s, and 1.1-1.2x what batching by request served.
BEAM_JOIN_STEPS = 4
ENGINE_READ_AHEAD = 4096  # lines read ahead for an engine that batches by itself (it sorts them by length)

Search = Callable[[torch.Tensor, Guides], list[list[Hypothesis]]]


@dataclass
class Score:
    """The log-probability a model gives one target given its source (forced decoding)."""

    total: float  # sum over the target's subwords, </s> included
    tokens: int  # how many: the target's subwords + </s>

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


class Translator:
    """Decodes lines with a `Seq2Seq` model; result i always belongs to input line i.

    Every input line gets exactly `nbest` results (`num_samples` when sampling), blank and
    failed-over-long lines included (those get empty texts), so outputs map back to inputs.
    """

    def __init__(self, model: Seq2Seq, tokenizer: Tokenizer, decode: DecodeConfig | None = None,
                 max_src_len: int | None = None) -> None:
        """
        Args:
            model: a trained `Seq2Seq` (put in eval mode here).
            tokenizer: the run's tokenizer.
            decode: the default decoding settings (the run's `decode` section).
            max_src_len: subword tokens per source, </s> included (the run's `data.max_len`).
        """
        self.model = model.eval()
        self.models = [self.model]  # more than one: an ensemble (see `ensemble`)
        self.tokenizer = tokenizer
        self.decode = decode or DecodeConfig()
        self.max_src_len = min(max_src_len or model.config.max_positions, model.config.max_positions)
        self.languages = tokenizer.src.languages()  # a multilingual run's target languages → tag ids
        self.on_overlong = "truncate"  # or "error"
        self.read_ahead: int | None = None  # lines decoded together; None: the chunk sizes above
        self.engine: Engine | None = None  # greedy/beam search by another engine (`detr translate --engine`)
        self.backward: Translator | None = None  # reranks the beam's outputs (decode.backward_weight, `detr.rerank`)

    @classmethod
    def ensemble(cls, members: list[Translator], names: list[str] | None = None) -> Translator:
        """One translator whose models' log-probabilities are averaged at every step (greedy, beam,
        sampling, constraints, scoring). The first member's decode settings apply.

        Raises:
            ConfigError: the members' vocabularies differ (source or target; `names` name them),
                or their models are on different devices.
        """
        names = names or [f"member {i + 1}" for i in range(len(members))]
        first = members[0]
        for name, other in zip(names[1:], members[1:]):
            for side in ("tgt", "src"):
                if getattr(other.tokenizer, side).hf.to_str() != getattr(first.tokenizer, side).hf.to_str():
                    what = "target" if side == "tgt" else "source"
                    raise ConfigError(f"{name}: its {what} vocabulary differs from {names[0]}'s; an ensemble "
                                      f"needs runs with one tokenizer")
            if other.device != first.device:
                raise ConfigError(f"{name}: on {other.device}, but {names[0]} is on {first.device}")
        out = cls(first.model, first.tokenizer, first.decode, min(m.max_src_len for m in members))
        out.models = [m.model for m in members]
        return out

    def quantize(self, precision: str) -> Translator:
        """This translator with every model's Linear layers in `precision` ("int8": `Int8Linear` on the
        CPU, see `detr.quantize`), changed in place.

        Raises:
            ConfigError: an unknown precision, or int8 for a model not on the CPU.
        """
        for model in self.models:
            quantize(model, precision)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    def options(self, **changes: object) -> DecodeConfig:
        """The run's decode settings with `changes` applied and validated (ConfigError names the key)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(DecodeConfig)}
        if unknown:
            raise ConfigError(f"unknown decoding option(s): {', '.join(sorted(unknown))}")
        return self.checked(dataclasses.replace(self.decode, **changes))

    def checked(self, config: DecodeConfig) -> DecodeConfig:
        """`config`, validated for this model's searches (ConfigError names the key)."""
        self.checked_for_scoring(config)
        if self.engine is not None:
            if len(self.models) > 1:
                raise ConfigError("an ensemble needs the torch engine (drop --engine)")
            self.engine.check(config)
        if config.backward_weight and self.backward is None:
            raise ConfigError("decode.backward_weight needs a backward run (--backward RUN: one trained with source "
                              "and target swapped)")
        if 2 * max(config.beam_size, config.mbr) > self.model.config.tgt_vocab_size:
            raise ConfigError(f"decode.beam_size={config.beam_size} is too large for a target vocabulary of "
                              f"{self.model.config.tgt_vocab_size}")
        return config

    def checked_for_scoring(self, config: DecodeConfig) -> DecodeConfig:
        """`config`, validated for forced decoding (`score`), which reads only `max_tokens` and
        `tgt_lang`: what only a search needs (a backward run for `backward_weight`, a beam the
        vocabulary can fill, another engine) is not asked for."""
        config.validate()
        self.language_tag(config.tgt_lang)
        return config

    def translate(self, lines: Iterable[str], options: DecodeConfig | None = None,
                  constraints: Iterable[Constraints] | None = None) -> list[str]:
        """Best output for each line (beam search when `beam_size` > 1, else greedy; MBR when `mbr`
        is set), under each line's `constraints` if given."""
        config = dataclasses.replace(options or self.decode, nbest=1)
        return [nbest[0][0] for nbest in self.iter_nbest(lines, config, constraints, scores=False)]

    def translate_nbest(self, lines: Iterable[str], options: DecodeConfig | None = None,
                        constraints: Iterable[Constraints] | None = None) -> list[list[tuple[str, float]]]:
        """The `nbest` best (text, score) pairs for each line, best first (with MBR the score is the
        expected utility)."""
        return list(self.iter_nbest(lines, options, constraints))

    def generate(self, lines: Iterable[str], options: DecodeConfig | None = None,
                 constraints: Iterable[Constraints] | None = None) -> list[list[tuple[str, float]]]:
        """`num_samples` sampled (text, log-probability) outputs per line (temperature, top_k, top_p, seed)."""
        return list(self.iter_samples(lines, options, constraints))

    @torch.no_grad()
    def score(self, sources: Iterable[str], targets: Iterable[str], options: DecodeConfig | None = None
              ) -> list[Score]:
        """The log-probability of each target given its source (forced decoding, </s> included),
        from the parallel forward, batched under `options.max_tokens` (and for target language
        `options.tgt_lang`); an ensemble's is the sum of its averaged per-step log-probabilities.
        Each pair's score does not depend on the others in its batch.

        Raises:
            DataError: sources and targets differ in number, or (with `on_overlong="error"`) an
                over-long line.
        """
        config = self.checked_for_scoring(options or self.decode)
        pairs = []
        for n, (src, tgt) in enumerate(itertools.zip_longest(sources, targets), start=1):
            if src is None or tgt is None:
                raise DataError(f"pair {n}: there are more {'targets' if src is None else 'sources'} than "
                                f"{'sources' if src is None else 'targets'}")
            pairs.append((self.encode_line(n, src, config.tgt_lang), [BOS] + self.encode_target(n, tgt)))
        lengths = [(len(s), len(t)) for s, t in pairs]
        order = sorted(range(len(pairs)), key=lambda i: lengths[i])
        out: list[Score] = [Score(0.0, 0)] * len(pairs)
        for batch in pack_by_tokens(lengths, config.max_tokens, order):
            src = pad([pairs[i][0] for i in batch]).to(self.device)
            tgt = pad([pairs[i][1] for i in batch]).to(self.device)  # <s> y </s>
            src_mask = padding_mask(src)
            total = ensemble_logp(model.decode(tgt[:, :-1], model.encode(src, src_mask), src_mask)
                                  for model in self.models)
            gold = total.gather(2, tgt[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T)
            real = tgt[:, 1:] != PAD
            for i, row, mask in zip(batch, gold, real):
                out[i] = Score(float(row[mask].sum()), int(mask.sum()))
        return out

    def perplexity(self, sources: list[str], targets: list[str]) -> float:
        """Perplexity of `targets` given `sources` (teacher forcing, per target subword, </s> included),
        batched under `decode.max_tokens`."""
        examples = [Example(s, t, f"pair {i + 1}") for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
        loss = mean_token_loss(examples, self.tokenizer, self.max_src_len, self.decode.max_tokens,
                               lambda batch: seq2seq_loss(self.model, batch.to(self.device), 0.0))
        return math.exp(min(loss, 100.0))

    # ------------------------------------------------------------------ streaming core

    def encode_target(self, number: int, line: str) -> list[int]:
        """Target ids + </s> of line `number` (scoring), cut to what the decoder can take."""
        ids = self.tokenizer.tgt.encode(line) if line.strip() else []
        limit = min(m.config.max_positions for m in self.models) - 1
        if len(ids) > limit - 1:
            if self.on_overlong == "error":
                raise DataError(f"line {number}: target of {len(ids)} subword tokens, more than the model's "
                                f"maximum {limit - 1}")
            log.warning("line %d: target of %d subword tokens, truncated to %d", number, len(ids), limit - 1)
            ids = ids[: limit - 1]
        return ids + [self.tokenizer.tgt.eos]

    def language_tag(self, lang: str | None) -> list[int]:
        """What starts a source for target language `lang`: its tag in a multilingual run, else nothing.

        Raises:
            ConfigError: a multilingual run without a known `lang`, or a `lang` for a bilingual run;
                the message lists the run's languages.
        """
        if not self.languages:
            if lang is not None:
                raise ConfigError(f"decode.tgt_lang={lang}: this run is not multilingual (it has no language tags)")
            return []
        if lang not in self.languages:
            known = ", ".join(sorted(self.languages))
            if lang is None:
                raise ConfigError(f"this run translates into {known}: choose one with --tgt-lang (decode.tgt_lang)")
            raise ConfigError(f"decode.tgt_lang={lang}: unknown language; this run translates into {known}")
        return [self.languages[lang]]

    def encode_line(self, number: int, line: str, lang: str | None = None) -> list[int]:
        """Source ids + </s> of input line `number` (after the tag of target language `lang`, default
        `decode.tgt_lang`, in a multilingual run); a blank line gives just </s> (and empty outputs).

        Raises:
            DataError: the line is over-long and `on_overlong` is "error".
        """
        eos = self.tokenizer.src.eos
        if not line.strip():
            return [eos]
        tag = self.language_tag(lang or self.decode.tgt_lang)
        ids = self.tokenizer.src.encode(line)
        room = self.max_src_len - 1 - len(tag)
        if len(ids) > room:
            if self.on_overlong == "error":
                raise DataError(f"line {number}: {len(ids)} subword tokens, more than the model's maximum {room}")
            log.warning("line %d: %d subword tokens, truncated to %d", number, len(ids), room)
            ids = ids[:room]
        return tag + ids + [eos]

    def iter_nbest(self, lines: Iterable[str], options: DecodeConfig | None = None,
                   constraints: Iterable[Constraints] | None = None,
                   scores: bool = True) -> Iterator[list[tuple[str, float]]]:
        """Lazily decode `lines`, a chunk at a time, yielding `nbest` results per line in input order.
        `constraints`: one per line (a prefix, phrases to include or exclude), or None. `scores=False`
        says the caller will not read the scores: another engine (`self.engine`) may then leave them
        NaN and skip the work they cost."""
        config = self.checked(options or self.decode)
        if config.mbr:
            yield from self._iter_mbr(lines, config, constraints)
            return
        if config.reranks:
            yield from self._iter_reranked(lines, config, constraints)
            return

        def search(src: torch.Tensor, guides: Guides) -> list[list[Hypothesis]]:
            if self.engine is not None:
                if guides is not None:
                    raise ConfigError("constraints and prefixes need the torch engine (drop --engine)")
                return self.engine(src, config, scores)
            if guides is not None and any(g is not None and g.include for g in guides):
                if config.beam_groups > 1:
                    raise ConfigError("phrases to include need one beam (constrained beam search): drop "
                                      "decode.beam_groups")
                return constrained_beam_search(self.models, src, config, guides)
            if config.beam_size == 1:
                return [[h] for h in greedy(self.models, src, config, guides)]
            return beam_search(self.models, src, config, guides)

        yield from self._iter_chunks(lines, config, config.beam_size, config.nbest, search, constraints)

    def iter_samples(self, lines: Iterable[str], options: DecodeConfig | None = None,
                     constraints: Iterable[Constraints] | None = None) -> Iterator[list[tuple[str, float]]]:
        """Lazily sample `num_samples` outputs per line; the same seed draws the same outputs.
        Constraints may force a prefix and exclude phrases (including phrases needs beam search)."""
        config = self.checked(options or self.decode)
        if config.reranks:
            raise ConfigError("decode.backward_weight and decode.rerank_anti_lm rerank beam search's outputs; "
                              "sampling does not use them (set them to 0)")
        n = config.num_samples
        generator = torch.Generator(device=self.device).manual_seed(config.seed)

        def search(src: torch.Tensor, guides: Guides) -> list[list[Hypothesis]]:
            rows = None if guides is None else [g for g in guides for _ in range(n)]
            drawn = sample(self.models, src.repeat_interleave(n, dim=0), config, generator, guides=rows)  # (B·n)
            return [drawn[i:i + n] for i in range(0, len(drawn), n)]

        yield from self._iter_chunks(lines, config, n, n, search, constraints, sampling=True)

    def _iter_mbr(self, lines: Iterable[str], config: DecodeConfig, constraints: Iterable[Constraints] | None
                  ) -> Iterator[list[tuple[str, float]]]:
        """`nbest` outputs per line, ranked by expected utility against `config.mbr` candidates."""
        if config.mbr_candidates == "sample":
            candidates = self.iter_samples(lines, dataclasses.replace(config, mbr=0, num_samples=config.mbr),
                                           constraints)
        else:
            candidates = self.iter_nbest(lines, dataclasses.replace(config, mbr=0, nbest=config.mbr), constraints)
        for found in candidates:
            ranked = mbr_rank([text for text, _ in found], config.mbr_metric)[:config.nbest]
            yield ranked + [("", 0.0)] * (config.nbest - len(ranked))

    def _iter_reranked(self, lines: Iterable[str], config: DecodeConfig, constraints: Iterable[Constraints] | None
                       ) -> Iterator[list[tuple[str, float]]]:
        """`nbest` outputs per line: the beam's `beam_size` reranked (`detr.rerank`: the backward run,
        the model as a language model), a chunk of lines at a time (their pairs scored together)."""
        terms = [backward_term(self.backward.score, config.backward_weight)] if self.backward is not None else []
        terms.append(anti_lm_term(functools.partial(self.score, options=config), config.rerank_anti_lm))
        sources: collections.deque[str] = collections.deque()  # lines read, not yet answered

        def remembered(lines: Iterable[str]) -> Iterator[str]:
            for line in lines:
                sources.append(line.rstrip("\n"))
                yield line

        candidates = self.iter_nbest(remembered(lines), dataclasses.replace(
            config, backward_weight=0.0, rerank_anti_lm=0.0, nbest=config.beam_size), constraints)
        failure: DetrError | None = None
        while not failure:
            chunk: list[list[tuple[str, float]]] = []
            try:
                chunk.extend(itertools.islice(candidates, self.read_ahead or CHUNK_BATCHES * config.batch_size))
            except DetrError as err:  # a bad line: answer the lines before it, then report
                failure = err
            if not chunk:
                break
            texts = [sources.popleft() for _ in chunk]
            for found in rerank(texts, chunk, terms):
                yield found[:config.nbest]
        if failure:
            raise failure

    def sample_streaming(self, line: str, on_step: OnStep, options: DecodeConfig | None = None
                         ) -> list[tuple[str, float]]:
        """`num_samples` samples of one line, as `iter_samples` draws them (same seed, same outputs),
        calling `on_step(samples still running, their new token ids)` after every token."""
        config = self.checked(options or self.decode)
        ids = self.encode_line(1, line, config.tgt_lang)
        if len(ids) <= 1:
            return [("", 0.0)] * config.num_samples
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        src = pad([ids]).to(self.device).repeat_interleave(config.num_samples, dim=0)  # (n, S)
        drawn = sample(self.models, src, config, generator, on_step)
        return [(text, h.score) for text, h in zip(self.tokenizer.tgt.decode_batch([h.tokens for h in drawn]), drawn)]

    def stream(self, options: DecodeConfig | None = None) -> TranslationStream:
        """A running batch that requests join and leave between decoding steps (continuous batching,
        as `detr serve` does): greedy or beam search with `options` (default: the run's); beam search
        is `joinable` only in its batch's first steps (see `TranslationStream`).

        Raises:
            ConfigError: options only whole batches carry out (MBR), or another engine than torch.
        """
        config = self.checked(options or self.decode)
        if config.mbr or config.reranks or self.engine is not None:
            raise ConfigError("continuous batching needs the torch engine, no MBR and no reranking")
        return TranslationStream(self, config)

    def batches(self, ids: list[list[int]], config: DecodeConfig, rows_per_sentence: int) -> list[list[int]]:
        """Indices of non-empty inputs, sorted by length, grouped under the token and sentence budgets
        (all in one group for an engine that batches by itself)."""
        order = sorted((i for i, x in enumerate(ids) if len(x) > 1), key=lambda i: len(ids[i]))
        if self.engine is not None and self.engine.batches_itself:
            return [order] if order else []
        return pack_by_tokens([(len(x),) for x in ids], config.max_tokens, order, rows_per_sentence,
                              config.batch_size)

    def _iter_chunks(self, lines: Iterable[str], config: DecodeConfig, rows_per_sentence: int, per_input: int,
                     search: Search, constraints: Iterable[Constraints] | None = None, sampling: bool = False
                     ) -> Iterator[list[tuple[str, float]]]:
        numbered = enumerate(_paired(lines, constraints), start=1)
        batches_itself = self.engine is not None and self.engine.batches_itself
        size = self.read_ahead or (ENGINE_READ_AHEAD if batches_itself else CHUNK_BATCHES * config.batch_size)
        failure: DetrError | None = None
        while not failure:
            chunk = []
            try:
                chunk.extend(itertools.islice(numbered, size))
            except DetrError as err:  # unreadable input: finish the lines read before it, then report
                failure = err
            ids, wanted = [], []
            for n, (line, wish) in chunk:
                try:
                    if sampling and wish.include:
                        raise ConfigError(f"line {n}: phrases to include need beam search (detr translate); "
                                          f"sampling takes only a prefix and phrases to exclude")
                    ids.append(self.encode_line(n, line.rstrip("\n"), config.tgt_lang))
                    wanted.append(wish)
                except DetrError as err:  # an over-long line under on_overlong="error"
                    failure = err
                    break
            if not ids:
                break
            guides = [wish.guide(self.tokenizer.tgt) for wish in wanted]
            empty = [("", 0.0)] * per_input  # a blank input gets as many (empty) outputs as any other
            results: list[list[tuple[str, float]]] = [list(empty) for _ in ids]
            for batch in self.batches(ids, config, rows_per_sentence):
                src = pad([ids[i] for i in batch]).to(self.device)
                steer = [guides[i] for i in batch] if any(guides[i] for i in batch) else None
                for i, hyps in zip(batch, search(src, steer)):
                    texts = self.tokenizer.tgt.decode_batch([h.tokens for h in hyps])
                    found = [(text, h.score) for text, h in zip(texts, hyps)]
                    results[i] = found + empty[len(found):]  # fewer finished hypotheses than asked: pad
                    if wanted[i] and found:
                        _warn_unmet(chunk[i][0], wanted[i], found[0][0])
            yield from results
        if failure:
            raise failure


class TranslationStream:
    """Requests translated in one running batch: a request joins it between two steps and leaves
    with its results as soon as its last line ends (made by `Translator.stream`). A line gets the
    output it gets alone (detr's search decides per row), so it does not matter who shares its steps.
    Greedy search takes new lines at any step; beam search only in the first BEAM_JOIN_STEPS steps
    of a batch (`joinable`; lines added later still join, and a caller such as the server's batcher
    holds new requests back for the next batch instead).

        stream = translator.stream(translator.options(beam_size=4))
        stream.add("a", ["one cat", ("two dogs", Constraints(prefix="Zwei"))])
        while stream.running:
            for tag, results in stream.step(): ...     # ("a", [[("eine Katze", -1.2)], ...])
    """

    def __init__(self, translator: Translator, config: DecodeConfig) -> None:
        self.translator, self.config = translator, config
        models = translator.models
        self.search = BeamSearch(models, config) if config.beam_size > 1 else OnePerSentence(models, config, row_argmax)
        self.results: dict[Hashable, list[list[tuple[str, float]]]] = {}  # per request, filled in as lines end
        self.waiting: dict[Hashable, int] = {}  # per request, lines still running
        self.owner: dict[int, tuple[Hashable, int]] = {}  # search id → (request, line)
        self.wishes: dict[Hashable, list[Constraints]] = {}  # per request with steering, each line's
        self.joining: list[tuple[Hashable, int, list[int], Guide | None]] = []  # (request, line, ids, guide) to start
        self.waited = 0  # steps the oldest of `joining` has waited
        self.age = 0  # steps since the running batch started (from empty)

    @property
    def running(self) -> int:
        """Lines still being decoded (or about to start)."""
        return self.search.running + len(self.joining)

    @property
    def joinable(self) -> bool:
        """Whether new lines may join now: always for greedy search; for beam search only within
        BEAM_JOIN_STEPS steps of its batch's start."""
        return self.config.beam_size == 1 or self.age < BEAM_JOIN_STEPS

    def add(self, tag: Hashable, lines: list[str] | list[tuple[str, Constraints]]
            ) -> list[tuple[Hashable, list[list[tuple[str, float]]]]]:
        """Start request `tag` (a new key) with `lines`: texts, or (text, constraints) pairs (a prefix,
        phrases to exclude); they join at the next step. A request of blank lines only is done at
        once: it is returned here, as `step` returns the others.

        Raises:
            DataError: an over-long line (with `on_overlong="error"`).
            ConfigError: phrases to include (they need `translate`'s constrained beam search).
        """
        translator, config = self.translator, self.config
        pairs = [(x, Constraints()) if isinstance(x, str) else x for x in lines]
        lines, wishes = [line for line, _ in pairs], [wish for _, wish in pairs]
        if any(w.include for w in wishes):
            raise ConfigError("phrases to include need a whole batch (constrained beam search), not a stream")
        ids = [translator.encode_line(n, line, config.tgt_lang) for n, line in enumerate(lines, start=1)]
        self.results[tag] = [[("", 0.0)] * config.nbest for _ in lines]
        todo = [i for i, x in enumerate(ids) if len(x) > 1]
        self.waiting[tag] = len(todo)
        if not todo:
            del self.waiting[tag]
            return [(tag, self.results.pop(tag))]
        self.joining.extend((tag, i, ids[i], wishes[i].guide(translator.tokenizer.tgt)) for i in todo)
        if any(wishes):
            self.wishes[tag] = wishes
        return []

    def _admit(self) -> None:
        """Start the lines added since the last admission, all in one: an admission copies the running
        batch's keys and values, so lines wait until they are 1/`JOIN_SHARE` of the running ones or have
        waited `JOIN_STEPS` steps (measured: admitting at every step made a step of 64 sentences 1.4x
        dearer; every 4th step about as cheap as a batch that runs to its end). Once the stream takes
        no more joiners (beam search past its first steps) they start at once: none will join them."""
        if not self.joining:
            return
        self.waited += 1
        if self.search.running and JOIN_SHARE * len(self.joining) < self.search.running and self.waited < JOIN_STEPS \
                and self.joinable:
            return
        self.waited = 0
        guides = [guide for _, _, _, guide in self.joining]
        src = pad([ids for _, _, ids, _ in self.joining]).to(self.translator.device)
        started = self.search.admit(src, guides if any(guides) else None)
        self.owner.update((sid, (tag, i)) for sid, (tag, i, _, _) in zip(started, self.joining))
        self.joining = []

    def step(self) -> list[tuple[Hashable, list[list[tuple[str, float]]]]]:
        """One decoding step for every running line; the requests whose lines have all ended, with
        `nbest` (text, score) results per line in their order."""
        self._admit()
        done = []
        self.age += 1
        for sid, found in self.search.step():
            hyps = found if isinstance(found, list) else [found]
            tag, line = self.owner.pop(sid)
            texts = self.translator.tokenizer.tgt.decode_batch([h.tokens for h in hyps])
            results = self.results[tag]
            results[line] = [(text, h.score) for text, h in zip(texts, hyps)] + results[line][len(hyps):]
            if tag in self.wishes and self.wishes[tag][line] and texts:
                _warn_unmet(line + 1, self.wishes[tag][line], texts[0])
            self.waiting[tag] -= 1
            if not self.waiting[tag]:
                del self.waiting[tag]
                self.wishes.pop(tag, None)
                done.append((tag, self.results.pop(tag)))
        if not self.search.running:
            self.age = 0
        return done


class Engine(Protocol):
    """Greedy and beam search done by another inference engine on a conversion of the model."""

    batches_itself: bool  # True: it takes a whole chunk of inputs and batches them under decode.max_tokens

    def check(self, config: DecodeConfig) -> None:
        """Raise ConfigError for options the engine would not carry out as detr's own search does."""

    def __call__(self, src: torch.Tensor, config: DecodeConfig, scores: bool = True) -> list[list[Hypothesis]]:
        """`config.nbest` hypotheses (beam) or one (greedy) per row of the padded source ids `src`;
        with `scores=False` their scores may be NaN."""


def _paired(lines: Iterable[str], constraints: Iterable[Constraints] | None) -> Iterator[tuple[str, Constraints]]:
    """(line, its constraints); a constraints stream of another length is an error at the first line
    without a partner."""
    if constraints is None:
        for line in lines:
            yield line, Constraints()
        return
    for n, (line, wish) in enumerate(itertools.zip_longest(lines, constraints), start=1):
        if line is None or wish is None:
            raise DataError(f"line {n}: there are {'more' if line is None else 'fewer'} constraint lines "
                            f"than input lines")
        yield line, wish


def _warn_unmet(number: int, wish: Constraints, text: str) -> None:
    for phrase in wish.unmet(text):
        log.warning("line %d: the output lacks the phrase %r (no output within the length limit holds "
                    "every phrase)", number, phrase)
    for phrase in wish.violated(text):
        log.warning("line %d: the output holds the excluded phrase %r (made of other subwords than it "
                    "is alone)", number, phrase)

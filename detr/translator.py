"""Text in, text out: a trained model, its tokenizer and search settings, batched by length.

    translator = detr.load("runs/tiny")
    translator.translate(["three red dogs"])                                 # → ["drei rote Hunde"]
    translator.translate_nbest(["one cat"], translator.options(beam_size=4, nbest=2))

Decoding settings travel as one `DecodeConfig`: the run's own (`config.yaml`'s `decode`
section) unless a call passes another, usually made with `options(...)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from detr.batching import pack_by_tokens, pad
from detr.config import DecodeConfig
from detr.errors import ConfigError, DataError, DetrError
from detr.loss import mean_token_loss, seq2seq_loss
from detr.model import Seq2Seq
from detr.readers import Example
from detr.search import Hypothesis, OnStep, beam_search, greedy, sample
from detr.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK_BATCHES = 8  # lines read ahead = this × decode.batch_size: enough to sort by length, little to lose

Search = Callable[[torch.Tensor], list[list[Hypothesis]]]


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
        self.tokenizer = tokenizer
        self.decode = decode or DecodeConfig()
        self.max_src_len = min(max_src_len or model.config.max_positions, model.config.max_positions)
        self.on_overlong = "truncate"  # or "error"
        self.read_ahead: int | None = None  # lines decoded together; None: CHUNK_BATCHES × batch_size

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
        """`config`, validated for this model (ConfigError names the key)."""
        config.validate()
        if 2 * config.beam_size > self.model.config.tgt_vocab_size:
            raise ConfigError(f"decode.beam_size={config.beam_size} is too large for a target vocabulary of "
                              f"{self.model.config.tgt_vocab_size}")
        return config

    def translate(self, lines: Iterable[str], options: DecodeConfig | None = None) -> list[str]:
        """Best output for each line (beam search when `beam_size` > 1, else greedy)."""
        config = dataclasses.replace(options or self.decode, nbest=1)
        return [nbest[0][0] for nbest in self.iter_nbest(lines, config)]

    def translate_nbest(self, lines: Iterable[str],
                        options: DecodeConfig | None = None) -> list[list[tuple[str, float]]]:
        """The `nbest` best (text, score) pairs for each line, best first."""
        return list(self.iter_nbest(lines, options))

    def generate(self, lines: Iterable[str], options: DecodeConfig | None = None) -> list[list[tuple[str, float]]]:
        """`num_samples` sampled (text, log-probability) outputs per line (temperature, top_k, top_p, seed)."""
        return list(self.iter_samples(lines, options))

    def perplexity(self, sources: list[str], targets: list[str]) -> float:
        """Perplexity of `targets` given `sources` (teacher forcing, per target subword, </s> included),
        batched under `decode.max_tokens`."""
        examples = [Example(s, t, f"pair {i + 1}") for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
        loss = mean_token_loss(examples, self.tokenizer, self.max_src_len, self.decode.max_tokens,
                               lambda batch: seq2seq_loss(self.model, batch.to(self.device), 0.0))
        return math.exp(min(loss, 100.0))

    # ------------------------------------------------------------------ streaming core

    def encode_line(self, number: int, line: str) -> list[int]:
        """Source ids + </s> of input line `number`; a blank line gives just </s> (and empty outputs).

        Raises:
            DataError: the line is over-long and `on_overlong` is "error".
        """
        eos = self.tokenizer.src.eos
        if not line.strip():
            return [eos]
        ids = self.tokenizer.src.encode(line)
        if len(ids) > self.max_src_len - 1:
            if self.on_overlong == "error":
                raise DataError(f"line {number}: {len(ids)} subword tokens, more than the model's maximum "
                                f"{self.max_src_len - 1}")
            log.warning("line %d: %d subword tokens, truncated to %d", number, len(ids), self.max_src_len - 1)
            ids = ids[: self.max_src_len - 1]
        return ids + [eos]

    def iter_nbest(self, lines: Iterable[str], options: DecodeConfig | None = None
                   ) -> Iterator[list[tuple[str, float]]]:
        """Lazily decode `lines`, a chunk at a time, yielding `nbest` results per line in input order."""
        config = self.checked(options or self.decode)

        def search(src: torch.Tensor) -> list[list[Hypothesis]]:
            if config.beam_size == 1:
                return [[h] for h in greedy(self.model, src, config)]
            return beam_search(self.model, src, config)

        yield from self._iter_chunks(lines, config, config.beam_size, config.nbest, search)

    def iter_samples(self, lines: Iterable[str], options: DecodeConfig | None = None
                     ) -> Iterator[list[tuple[str, float]]]:
        """Lazily sample `num_samples` outputs per line; the same seed draws the same outputs."""
        config = self.checked(options or self.decode)
        n = config.num_samples
        generator = torch.Generator(device=self.device).manual_seed(config.seed)

        def search(src: torch.Tensor) -> list[list[Hypothesis]]:
            drawn = sample(self.model, src.repeat_interleave(n, dim=0), config, generator)  # (B·n) rows
            return [drawn[i:i + n] for i in range(0, len(drawn), n)]

        yield from self._iter_chunks(lines, config, n, n, search)

    def sample_streaming(self, line: str, on_step: OnStep, options: DecodeConfig | None = None
                         ) -> list[tuple[str, float]]:
        """`num_samples` samples of one line, as `iter_samples` draws them (same seed, same outputs),
        calling `on_step(samples still running, their new token ids)` after every token."""
        config = self.checked(options or self.decode)
        ids = self.encode_line(1, line)
        if len(ids) <= 1:
            return [("", 0.0)] * config.num_samples
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        src = pad([ids]).to(self.device).repeat_interleave(config.num_samples, dim=0)  # (n, S)
        drawn = sample(self.model, src, config, generator, on_step)
        return [(text, h.score) for text, h in zip(self.tokenizer.tgt.decode_batch([h.tokens for h in drawn]), drawn)]

    def batches(self, ids: list[list[int]], config: DecodeConfig, rows_per_sentence: int) -> list[list[int]]:
        """Indices of non-empty inputs, sorted by length, grouped under the token and sentence budgets."""
        order = sorted((i for i, x in enumerate(ids) if len(x) > 1), key=lambda i: len(ids[i]))
        return pack_by_tokens([(len(x),) for x in ids], config.max_tokens, order, rows_per_sentence,
                              config.batch_size)

    def _iter_chunks(self, lines: Iterable[str], config: DecodeConfig, rows_per_sentence: int, per_input: int,
                     search: Search) -> Iterator[list[tuple[str, float]]]:
        numbered = enumerate(lines, start=1)
        size = self.read_ahead or CHUNK_BATCHES * config.batch_size
        failure: DetrError | None = None
        while not failure:
            chunk = []
            try:
                chunk.extend(itertools.islice(numbered, size))
            except DetrError as err:  # unreadable input: finish the lines read before it, then report
                failure = err
            ids = []
            for n, line in chunk:
                try:
                    ids.append(self.encode_line(n, line.rstrip("\n")))
                except DetrError as err:  # an over-long line under on_overlong="error"
                    failure = err
                    break
            if not ids:
                break
            empty = [("", 0.0)] * per_input  # a blank input gets as many (empty) outputs as any other
            results: list[list[tuple[str, float]]] = [list(empty) for _ in ids]
            for batch in self.batches(ids, config, rows_per_sentence):
                src = pad([ids[i] for i in batch]).to(self.device)
                for i, hyps in zip(batch, search(src)):
                    texts = self.tokenizer.tgt.decode_batch([h.tokens for h in hyps])
                    found = [(text, h.score) for text, h in zip(texts, hyps)]
                    results[i] = found + empty[len(found):]  # fewer finished hypotheses than asked: pad
            yield from results
        if failure:
            raise failure

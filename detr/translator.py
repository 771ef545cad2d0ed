"""Text in, text out: a trained model, its tokenizer and search settings, batched by length.

    translator = detr.load("runs/tiny")
    translator.translate(["three red dogs"])            # → ["drei rote Hunde"]
    translator.translate_nbest(["one cat"], beam_size=4, nbest=2)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from detr.checkpoint import Run, load_run
from detr.config import DecodeConfig
from detr.data import pad
from detr.errors import ConfigError, DataError, DetrError
from detr.model import Seq2Seq
from detr.search import Hypothesis, Limits, beam_search, greedy, sample
from detr.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK_BATCHES = 8  # lines read ahead = this × decode.batch_size: enough to sort by length, little to lose


class Translator:
    """Decodes lines with a `Seq2Seq` model; output i always belongs to input line i."""

    def __init__(self, model: Seq2Seq, tokenizer: Tokenizer, decode: DecodeConfig | None = None,
                 max_src_len: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decode = decode or DecodeConfig()
        self.max_src_len = min(max_src_len or model.config.max_positions, model.config.max_positions)
        self.on_overlong = "truncate"  # or "error"
        self.read_ahead: int | None = None  # lines decoded together; None: CHUNK_BATCHES × batch_size

    @classmethod
    def from_run(cls, run: Run) -> Translator:
        return cls(run.model, run.tokenizer, run.config.decode, run.config.data.max_len)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def options(self, **changes: object) -> DecodeConfig:
        """The decode settings with `changes` applied and validated (ConfigError names the key)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(DecodeConfig)}
        if unknown:
            raise ConfigError(f"unknown decoding option(s): {', '.join(sorted(unknown))}")
        config = dataclasses.replace(self.decode, **changes)
        config.validate()
        if 2 * config.beam_size > self.model.config.tgt_vocab_size:
            raise ConfigError(f"decode.beam_size={config.beam_size} is too large for a target vocabulary of "
                              f"{self.model.config.tgt_vocab_size}")
        return config

    def translate(self, lines: Iterable[str], **options: object) -> list[str]:
        """Best output for each line (beam search when `beam_size` > 1, else greedy)."""
        return [nbest[0][0] for nbest in self.iter_nbest(lines, self.options(**{**options, "nbest": 1}))]

    def translate_nbest(self, lines: Iterable[str], **options: object) -> list[list[tuple[str, float]]]:
        """The `nbest` best (text, score) pairs for each line, best first."""
        return list(self.iter_nbest(lines, self.options(**options)))

    def generate(self, lines: Iterable[str], num_samples: int = 1, seed: int = 0,
                 **options: object) -> list[list[tuple[str, float]]]:
        """`num_samples` sampled outputs per line (temperature, top_k, top_p from the options)."""
        config = self.options(**options)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return list(self.iter_samples(lines, config, num_samples, generator))

    def perplexity(self, sources: list[str], targets: list[str], max_tokens: int = 4096) -> float:
        """Perplexity of `targets` given `sources` (teacher forcing, per target subword, </s> included)."""
        from detr.data import Example
        from detr.tasks import TranslateTask, token_loss

        examples = [Example(s, t, f"pair {i + 1}") for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
        loss = token_loss(examples, self.tokenizer, self.max_src_len, max_tokens,
                          lambda batch: TranslateTask.batch_loss(self.model, batch.to(self.device), 0.0))
        return math.exp(min(loss, 100.0))

    # ------------------------------------------------------------------ streaming core

    def encode_line(self, number: int, line: str) -> list[int]:
        """Source ids + </s> of input line `number`; a blank line gives just </s> (and an empty output)."""
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

    def batches(self, ids: list[list[int]], config: DecodeConfig, rows_per_sentence: int) -> Iterator[list[int]]:
        """Indices of non-empty inputs, sorted by length, grouped under the token and sentence budgets."""
        order = sorted((i for i, x in enumerate(ids) if len(x) > 1), key=lambda i: len(ids[i]))
        batch: list[int] = []
        for i in order:
            rows = (len(batch) + 1) * rows_per_sentence
            if batch and (len(batch) + 1 > config.batch_size or rows * len(ids[i]) > config.max_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def iter_nbest(self, lines: Iterable[str], config: DecodeConfig) -> Iterator[list[tuple[str, float]]]:
        """Lazily decode `lines`, a chunk at a time, yielding results in input order."""
        limits = Limits(config.max_len_a, config.max_len_b, config.min_len, config.no_repeat_ngram)

        def search(src: torch.Tensor) -> list[list[Hypothesis]]:
            if config.beam_size == 1:
                return [[h] for h in greedy(self.model, src, limits)]
            return beam_search(self.model, src, config.beam_size, config.nbest, config.length_penalty, limits)

        yield from self._iter_chunks(lines, config, config.beam_size, search)

    def iter_samples(self, lines: Iterable[str], config: DecodeConfig, num_samples: int,
                     generator: torch.Generator) -> Iterator[list[tuple[str, float]]]:
        limits = Limits(config.max_len_a, config.max_len_b, config.min_len, config.no_repeat_ngram)

        def search(src: torch.Tensor) -> list[list[Hypothesis]]:
            src = src.repeat_interleave(num_samples, dim=0)  # (B·n, S)
            drawn = sample(self.model, src, limits, config.temperature, config.top_k, config.top_p, generator)
            return [drawn[i:i + num_samples] for i in range(0, len(drawn), num_samples)]

        yield from self._iter_chunks(lines, config, num_samples, search)

    def _iter_chunks(self, lines: Iterable[str], config: DecodeConfig, rows_per_sentence: int,
                     search) -> Iterator[list[tuple[str, float]]]:
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
            results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in ids]  # empty input → empty output
            for batch in self.batches(ids, config, rows_per_sentence):
                src = pad([ids[i] for i in batch]).to(self.device)
                for i, hyps in zip(batch, search(src)):
                    texts = self.tokenizer.tgt.decode_batch([h.tokens for h in hyps])
                    results[i] = [(text, h.score) for text, h in zip(texts, hyps)]
            yield from results
        if failure:
            raise failure


def load(run_dir: str | Path, device: str = "cpu", weights: str | Path | None = None) -> Translator:
    """A `Translator` for a run directory written by `detr train`.

    Raises:
        CheckpointError: a missing or corrupt run directory (one line naming the file).
    """
    return Translator.from_run(load_run(run_dir, device, weights))

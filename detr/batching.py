"""Examples into batches: one token-budget packer, length-bucketed and resumable.

`pack_by_tokens` is the one packer: training batches (`BatchStream`), decoding batches
(`Translator`) and prediction batches (`Classifier`, `Tagger`) all go through it. A
`BatchStream` turns examples into length-bucketed batches under a token budget, in a
seeded order whose position can be saved and restored.

Memory: a `BatchStream` holds one pool of `pool_size` examples (their text and subword
ids) and that pool's batches at a time, whatever the size of the corpus. With the default
pool of 100,000 sentence pairs the process peaked at 1.2 GiB on a 1 GiB corpus
(benchmarks/data_memory.py; numbers in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from detr.config import DataConfig
from detr.errors import DataError
from detr.readers import Example, chunks, read_examples
from detr.tokenizer import BOS, EOS, PAD, Tokenizer

log = logging.getLogger(__name__)


class ExampleEncoder(Protocol):
    """What a `BatchStream` encodes a pool of examples with (each task has one).

    Called on a list of examples, it returns one item per example (None: filtered out as
    over-long); it counts what it filtered and truncated, for the epoch's log line.
    """

    max_len: int
    filtered: int
    truncated: int

    def __call__(self, examples: list[Any]) -> list[Any]: ...


@dataclass
class Batch:
    """Padded tensors of one batch. `index` holds each row's position in its pool or file."""

    src: Tensor  # (B, S) source ids ending in </s>
    tgt_in: Tensor  # (B, T) <s> + target ids
    tgt_out: Tensor  # (B, T) target ids + </s>
    index: list[int]

    @property
    def num_tgt_tokens(self) -> int:
        return int((self.tgt_out != PAD).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.index)


def pad(rows: list[list[int]]) -> Tensor:
    """Right-pad id lists into a (len(rows), longest) tensor."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def make_batch(pairs: list[tuple[list[int], list[int]]], index: list[int]) -> Batch:
    """Pairs of (source ids + </s>, target ids + </s>) → a `Batch`."""
    src = pad([s for s, _ in pairs])
    tgt_out = pad([t for _, t in pairs])
    tgt_in = pad([[BOS] + t[:-1] for _, t in pairs])
    return Batch(src, tgt_in, tgt_out, index)


def pack_by_tokens(lengths: list[tuple[int, ...]], max_tokens: int, order: list[int], rows_per_item: int = 1,
                   max_items: int = 0) -> list[list[int]]:
    """Group indices (taken in `order`, which should be sorted by length) into batches whose
    padded size, rows × longest side, stays within `max_tokens` (one example at least).

    Args:
        rows_per_item: rows each example takes in the batch (beam search: the beam size).
        max_items: at most this many examples per batch; 0: no limit.
    """
    batches, current, longest = [], [], 0
    for i in order:
        size = max(lengths[i])
        full = max_items and len(current) + 1 > max_items
        if current and (full or max(longest, size) * (len(current) + 1) * rows_per_item > max_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


class Encoded:
    """Turns examples into (source ids + </s>, target ids + </s>), filtering or truncating
    over-long ones as configured; counts what it drops."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, overlong: str) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.overlong = overlong
        self.filtered = 0
        self.truncated = 0

    def __call__(self, examples: list[Example]) -> list[tuple[list[int], list[int]] | None]:
        srcs = self.tokenizer.src.encode_batch([e.src for e in examples])
        tgts = self.tokenizer.tgt.encode_batch([e.tgt for e in examples])
        out: list[tuple[list[int], list[int]] | None] = []
        limit = self.max_len - 1  # room for </s>
        tags = self.tokenizer.src.languages() if any(e.lang for e in examples) else {}
        for e, s, t in zip(examples, srcs, tgts):
            if e.lang is not None:
                s = [tags[e.lang]] + s  # multilingual: the target language's tag starts the source
            if len(s) > limit or len(t) > limit:
                if self.overlong == "filter":
                    self.filtered += 1
                    out.append(None)
                    continue
                self.truncated += 1
                s, t = s[:limit], t[:limit]
            out.append((s + [self.tokenizer.src.eos], t + [EOS]))
        return out


class BatchStream:
    """Seeded, resumable stream of token-budgeted batches over one pass (epoch) at a time.

    Examples are read in pools of `pool_size`; each pool is shuffled, sorted by length,
    packed into batches of at most `max_tokens` padded tokens, and the batches shuffled.
    The order depends only on (seed, epoch, pool), so `state_dict()` — epoch, pool and
    batches consumed — is enough to continue exactly; pools already done are skipped
    without tokenizing them again.
    """

    def __init__(
        self,
        examples: Callable[[], Iterable[Example]],
        encode: ExampleEncoder,
        max_tokens: int,
        pool_size: int,
        seed: int,
        shuffle: bool = True,
        name: str = "data",
        size: Callable[[Any], tuple[int, ...]] | None = None,
        collate: Callable[[list, list[int]], Any] | None = None,
    ) -> None:
        """`encode` maps a pool of examples to items (None: filtered out); `size` gives an item's
        lengths (default: source and target of a pair) and `collate` makes a batch of items
        (default: `make_batch` of pairs)."""
        self.name = name  # for messages: the file or prefix read
        self.size = size or (lambda item: (len(item[0]), len(item[1])))
        self.collate = collate or make_batch
        self.examples = examples
        self.encode = encode
        self.max_tokens = max_tokens
        self.pool_size = pool_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch, self.pool, self.consumed = 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pool": self.pool, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pool, self.consumed = state["epoch"], state["pool"], state["consumed"]

    def pool_batches(self, pool: list, pool_index: int) -> list:
        encoded = self.encode(pool)
        kept = [i for i, e in enumerate(encoded) if e is not None]
        lengths = [self.size(encoded[i]) for i in kept]
        rng = random.Random(f"{self.seed}/{self.epoch}/{pool_index}")
        order = list(range(len(kept)))
        if self.shuffle:
            rng.shuffle(order)  # random order among equal lengths
        # Sort on the longer side, then the other: both sides of a batch have similar lengths.
        order.sort(key=lambda j: (max(lengths[j]), min(lengths[j])))
        groups = pack_by_tokens(lengths, self.max_tokens, order)
        if self.shuffle:
            rng.shuffle(groups)
        return [self.collate([encoded[kept[j]] for j in g], [kept[j] for j in g]) for g in groups]

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the saved position to the end of the current epoch."""
        count = kept = 0
        whole_epoch = self.pool == 0 and self.consumed == 0  # not resumed mid-epoch: `kept` covers it all
        filtered, truncated = self.encode.filtered, self.encode.truncated
        pools = chunks(self.examples(), self.pool_size)
        for pool_index, pool in enumerate(pools):
            count += len(pool)
            if pool_index < self.pool:
                continue
            batches = self.pool_batches(pool, pool_index)
            kept += sum(len(b.index) for b in batches)
            while self.consumed < len(batches):
                self.consumed += 1  # before yielding: a checkpoint taken now counts this batch done
                yield batches[self.consumed - 1]
            self.pool, self.consumed = pool_index + 1, 0
        filtered, truncated = self.encode.filtered - filtered, self.encode.truncated - truncated
        if count and not kept and whole_epoch:
            raise DataError(
                f"{self.name}: no examples left after filtering: all {count} are longer than "
                f"data.max_len={self.encode.max_len} subword tokens (raise it, or set data.overlong: truncate)"
            )
        if not count:
            raise DataError(f"{self.name}: no examples (the files are empty or every line is)")
        log.log(logging.INFO if self.shuffle else logging.DEBUG,
                "%s: epoch %d done: %d examples read, %d over-long filtered, %d truncated", self.name,
                self.epoch + 1, count, filtered, truncated)
        self.epoch, self.pool, self.consumed = self.epoch + 1, 0, 0


def training_stream(config: DataConfig, tokenizer: Tokenizer, max_tokens: int, seed: int) -> BatchStream:
    """The shuffled, resumable batch stream of `config.train`; empty pairs are counted in the log."""
    stats: dict[str, int] = {}

    def examples() -> Iterator[Example]:
        stats.clear()
        yield from read_examples(config, "train", stats)
        if stats.get("empty"):
            log.info("%s: skipped %d pairs with an empty side", config.train, stats["empty"])

    encode = Encoded(tokenizer, config.max_len, config.overlong)
    return BatchStream(examples, encode, max_tokens, config.pool_size, seed, name=str(config.train))


def padding_efficiency(batches: Iterable[Batch]) -> float:
    """Real tokens ÷ all tokens (padding included), source and target sides together."""
    real = total = 0
    for b in batches:
        real += int((b.src != PAD).sum()) + int((b.tgt_out != PAD).sum())
        total += b.src.numel() + b.tgt_out.numel()
    return real / max(total, 1)

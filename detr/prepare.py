"""`detr data prepare`: check a config's data, learn its tokenizer, report what batching makes of it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from detr.batching import Batch, padding_efficiency, training_stream
from detr.config import DataConfig
from detr.errors import DataError
from detr.readers import check_split
from detr.tokenizer import build_tokenizer


@dataclass
class DataReport:
    """What `prepare` found: sizes of the training data in examples, batches and tokens."""

    examples: int
    batches: int
    src_vocab_size: int
    tgt_vocab_size: int
    padding_efficiency: float
    tokenizer_path: str


def prepare(config: DataConfig, max_tokens: int, out: str | Path, seed: int = 1) -> DataReport:
    """Check the splits, learn (or load) the tokenizer, save it to `out`, batch one epoch.

    Raises:
        DataError: any problem with the data files (file and line named).
    """
    for split in ("train", "valid", "test"):
        if getattr(config, split) is not None:
            check_split(config, split)
    tokenizer = build_tokenizer(config)
    examples = batches = 0

    def counted(stream: Iterable[Batch]) -> Iterator[Batch]:
        nonlocal examples, batches
        for b in stream:  # one batch at a time: memory stays at one pool
            examples, batches = examples + len(b.index), batches + 1
            yield b

    efficiency = padding_efficiency(counted(training_stream(config, tokenizer, max_tokens, seed)))
    try:
        tokenizer.save(out)
    except OSError as err:
        raise DataError(f"{out}: cannot write the tokenizer: {err.strerror}") from None
    return DataReport(examples, batches, tokenizer.src.vocab_size, tokenizer.tgt.vocab_size, efficiency, str(out))

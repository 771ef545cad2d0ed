"""Reading text into examples and examples into batches.

Readers stream their files line by line and raise a `DataError` naming the file and line
for anything they cannot read. `BatchStream` turns examples into length-bucketed batches
under a token budget, in a seeded order whose position can be saved and restored.

Memory: a `BatchStream` holds one pool of `pool_size` examples (their text and subword
ids) and that pool's batches at a time, whatever the size of the corpus. With the default
pool of 100,000 sentence pairs the process peaked at 1.2 GiB on a 1 GiB corpus
(benchmarks/data_memory.py; numbers in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
import logging
import random
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detr.atomic import atomic_path
from detr.config import DataConfig
from detr.errors import DataError
from detr.tokenizer import BOS, EOS, PAD, PretrainedVocab, Tokenizer, train_subwords, train_tokenizer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- readers


@dataclass
class Example:
    """One training pair; `where` is "file:line" for messages."""

    src: str
    tgt: str
    where: str


def read_lines(path: str | Path, invalid: str = "error") -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, text without the newline) of a UTF-8 file.

    Raises:
        DataError: missing file, or invalid UTF-8 (with line and byte offset) unless `invalid="replace"`.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    with f:
        yield from decode_lines(f, str(path), invalid)


def decode_lines(stream: Iterable[bytes], name: str, invalid: str = "error") -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary stream read as UTF-8, one line at a time.

    Args:
        name: the file name for messages ("<stdin>" for standard input).
        invalid: "error" raises `DataError` naming the line; "replace" substitutes U+FFFD and warns.
    """
    offset = 0
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if invalid != "replace":
                raise DataError(
                    f"{name}:{number}: invalid UTF-8 at byte {offset + err.start} of the file "
                    f"(byte {err.start} of the line)"
                ) from None
            log.warning("%s:%d: invalid UTF-8 replaced by U+FFFD", name, number)
            text = raw.decode("utf-8", errors="replace")
        offset += len(raw)
        yield number, text.rstrip("\r\n")


def count_lines(path: str | Path) -> int:
    """Number of lines (a last line without a newline counts)."""
    n, last = 0, b"\n"
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return n + (last != b"\n")


def read_parallel(src_path: str | Path, tgt_path: str | Path, stats: dict | None = None) -> Iterator[Example]:
    """Line-aligned parallel files. Pairs with an empty side are skipped (counted in `stats`).

    Raises:
        DataError: the files have different line counts (both named with their counts).
    """
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    for pair in itertools.zip_longest(src_lines, tgt_lines):
        if pair[0] is None or pair[1] is None:
            raise DataError(
                f"parallel files differ in length: {src_path} has {count_lines(src_path)} lines, "
                f"{tgt_path} has {count_lines(tgt_path)}"
            )
        (number, src), (_, tgt) = pair
        if not src.strip() or not tgt.strip():
            if stats is not None:
                stats["empty"] = stats.get("empty", 0) + 1
            continue
        yield Example(src, tgt, f"{src_path}:{number}")


def read_tsv(path: str | Path, fields: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Rows of a TSV file with a header line; yields ("file:line", [value of each field]).

    Raises:
        DataError: a field missing from the header, or a row without that column.
    """
    lines = read_lines(path)
    try:
        _, header_line = next(lines)
    except StopIteration:
        raise DataError(f"{path}: empty file (a header line naming the columns is needed)") from None
    header = header_line.split("\t")
    columns = []
    for name in fields:
        if name not in header:
            raise DataError(f"{path}:1: no column '{name}' in the header (columns: {', '.join(header)})")
        columns.append(header.index(name))
    for number, line in lines:
        if not line:
            continue
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        for name, col in zip(fields, columns):
            if col >= len(row):
                raise DataError(f"{path}:{number}: row has {len(row)} columns, no column '{name}' (column {col + 1})")
        yield f"{path}:{number}", [row[col] for col in columns]


def read_jsonl(path: str | Path, fields: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Objects of a JSON Lines file; yields ("file:line", [value of each field]).

    Raises:
        DataError: a line that is not a JSON object, or one without a field.
    """
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        values = []
        for name in fields:
            if name not in obj:
                raise DataError(f"{path}:{number}: no field '{name}' (fields: {', '.join(obj)})")
            value = obj[name]
            values.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        yield f"{path}:{number}", values


TAG = re.compile(r"^(O|[BI]-\S+)$")


@dataclass
class TaggedSentence:
    tokens: list[str]
    tags: list[str]  # IOB2
    where: str


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """An I- tag that begins an entity (after O or another type) becomes B-; IOB2 is unchanged."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def read_conll(path: str | Path, tag_column: int = -1) -> Iterator[TaggedSentence]:
    """CoNLL column files: a token per line, tag in `tag_column`, blank lines between sentences.

    IOB1 and IOB2 are both read and returned as IOB2. `-DOCSTART-` lines are skipped.

    Raises:
        DataError: a line whose column count differs from the file's first line, or an
            illegal tag (neither `O` nor `B-TYPE`/`I-TYPE`).
    """
    tokens: list[str] = []
    tags: list[str] = []
    start, width = 0, None

    def sentence() -> TaggedSentence:
        return TaggedSentence(tokens, iob1_to_iob2(tags), f"{path}:{start}")

    for number, line in read_lines(path):
        if not line.strip():
            if tokens:
                yield sentence()
            tokens, tags = [], []
            continue
        columns = line.split()
        if columns[0] == "-DOCSTART-":
            continue
        if width is None:
            width = len(columns)
            if width < 2:
                raise DataError(f"{path}:{number}: expected a token and a tag, got 1 column")
        if len(columns) != width:
            raise DataError(f"{path}:{number}: expected {width} columns like the first line, got {len(columns)}")
        tag = columns[tag_column]
        if not TAG.match(tag):
            raise DataError(f"{path}:{number}: illegal tag {tag!r} (expected O, B-TYPE or I-TYPE)")
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        yield sentence()


def read_examples(config: DataConfig, split: str, stats: dict | None = None) -> Iterator[Example]:
    """Source/target pairs of `split` ("train", "valid" or "test") as the config describes."""
    path = getattr(config, split)
    if path is None:
        raise DataError(f"data.{split} is not set")
    fmt = data_format(config, path)
    if fmt == "parallel":
        yield from read_parallel(f"{path}.{config.src_lang}", f"{path}.{config.tgt_lang}", stats)
        return
    reader = read_tsv if fmt == "tsv" else read_jsonl
    for where, (src, tgt) in reader(path, [config.src_field, config.tgt_field]):
        if not src.strip() or not tgt.strip():
            if stats is not None:
                stats["empty"] = stats.get("empty", 0) + 1
            continue
        yield Example(src, tgt, where)


def data_format(config: DataConfig, path: str) -> str:
    if config.format != "auto":
        return config.format
    if path.endswith(".tsv"):
        return "tsv"
    if path.endswith(".jsonl") or path.endswith(".json"):
        return "jsonl"
    return "parallel"


def split_files(config: DataConfig, split: str) -> list[Path]:
    """The files a split reads (to check they exist before any work starts)."""
    path = getattr(config, split)
    if data_format(config, path) == "parallel":
        return [Path(f"{path}.{config.src_lang}"), Path(f"{path}.{config.tgt_lang}")]
    return [Path(path)]


def check_split(config: DataConfig, split: str) -> None:
    """Fail early: files exist and, for parallel text, have equal line counts."""
    files = split_files(config, split)
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found (data.{split})")
    if len(files) == 2:
        counts = [count_lines(f) for f in files]
        if counts[0] != counts[1]:
            raise DataError(
                f"parallel files differ in length: {files[0]} has {counts[0]} lines, {files[1]} has {counts[1]}"
            )


# ----------------------------------------------------------------------------- batches


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


def pack_by_tokens(lengths: list[tuple[int, ...]], max_tokens: int, order: list[int]) -> list[list[int]]:
    """Group indices (taken in `order`, which should be sorted by length) into batches whose
    padded size, rows × longest side, stays within `max_tokens` (one example at least)."""
    batches, current, longest = [], [], 0
    for i in order:
        size = max(lengths[i])
        if current and max(longest, size) * (len(current) + 1) > max_tokens:
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
        for s, t in zip(srcs, tgts):
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
        encode: Encoded,
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
        pools = _chunks(iter(self.examples()), self.pool_size)
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


def build_tokenizer(config: DataConfig, pretrained: Path | None = None) -> Tokenizer:
    """Load `config.tokenizer` if set, else learn one on (up to `tokenizer_max_lines` of) the training data.

    `pretrained`: a pretrained encoder's folder; its vocabulary is the source side and only
    the target side is learned (`joint_vocab` does not apply).
    """
    if config.tokenizer is not None:
        return Tokenizer.load(config.tokenizer)
    check_split(config, "train")

    def side(name: str) -> Iterator[str]:
        for e in itertools.islice(read_examples(config, "train"), config.tokenizer_max_lines):
            yield getattr(e, name)

    if pretrained is not None:
        return Tokenizer(PretrainedVocab.from_folder(pretrained),
                         train_subwords(side("tgt"), config.vocab_size, config.subword, config.lowercase,
                                        config.normalization))
    return train_tokenizer(side("src"), side("tgt"), config.vocab_size, config.subword, config.joint_vocab,
                           config.lowercase, config.normalization)


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


def _chunks(it: Iterator[Example], size: int) -> Iterator[list[Example]]:
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def padding_efficiency(batches: Iterable[Batch]) -> float:
    """Real tokens ÷ all tokens (padding included), source and target sides together."""
    real = total = 0
    for b in batches:
        real += int((b.src != PAD).sum()) + int((b.tgt_out != PAD).sum())
        total += b.src.numel() + b.tgt_out.numel()
    return real / max(total, 1)


# ----------------------------------------------------------------------------- download

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
# Upstream file name → (our name, SHA-256 of the decompressed text).
MULTI30K_FILES = {
    "train.en.gz": ("train.en", "f7cb7c7d411f6039a15de94de8c4d1709fada7b7474791598fd18451ec62427d"),
    "train.de.gz": ("train.de", "550c2612c7ae45ed46754e67c3011fde500b1bf88592a376e2ed6126903766f7"),
    "train.fr.gz": ("train.fr", "87fd0969fd5d58acc23d2b8d024261df5177e1120c65b54011ca634736dcd661"),
    "train.cs.gz": ("train.cs", "2be68b38c8d586ff4f54eb13cc6e1baaaa053695b3f070d3038303a47f2268da"),
    "val.en.gz": ("valid.en", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
    "val.de.gz": ("valid.de", "c02c1d05fb89dba12b00503a2744b1105d45fef287501fd701b4fea5b1fca3e5"),
    "val.fr.gz": ("valid.fr", "3a61fe933a20608d6102b5d94dd0870ce8502d1cbec73511afff489ddab0c756"),
    "val.cs.gz": ("valid.cs", "d53827e469b0a1ca8d57e9e26b2b64c4bc4b33f5479c7b03ae87ae5c882c3e33"),
    "test_2016_flickr.en.gz": ("test2016.en", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    "test_2016_flickr.de.gz": ("test2016.de", "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
    "test_2016_flickr.fr.gz": ("test2016.fr", "dd64ea1883b68f55c887118839b434edc68b1dae3be6064c3bd5ab38033ddc6b"),
    "test_2016_flickr.cs.gz": ("test2016.cs", "45adb85f688de8407fddcbe1b36dca15d12aab868149b337e2576f2d6d2ff8d8"),
}


def fetch_multi30k(dest: str | Path, base_url: str = MULTI30K_URL, langs: Iterable[str] = ("en", "de", "fr", "cs"),
                   progress: bool = False) -> list[Path]:
    """Download Multi30k task 1 (train/valid/test2016) and verify each file's checksum.

    Files are written atomically under `dest` as `{train,valid,test2016}.{lang}`; a file
    already there with the right checksum is not fetched again.

    Raises:
        DataError: a download fails or a checksum does not match (nothing partial is kept).
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{dest}: cannot create folder: {err.strerror}") from None
    written = []
    for upstream, (name, digest) in MULTI30K_FILES.items():
        if name.rsplit(".", 1)[1] not in langs:
            continue
        target = dest / name
        if target.is_file() and _sha256(target) == digest:
            written.append(target)
            continue
        url = f"{base_url.rstrip('/')}/{upstream}"
        log.info("fetching %s", url)
        with atomic_path(target) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(gzip.GzipFile(fileobj=response), out)
            except (OSError, EOFError) as err:
                raise DataError(f"{url}: download failed: {err}") from None
            got = _sha256(tmp)
            if got != digest:
                raise DataError(f"{url}: checksum mismatch for {name}: expected sha256 {digest}, got {got}")
        written.append(target)
    return written


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

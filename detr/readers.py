"""Reading text files into examples: parallel text, TSV columns, JSON Lines fields, CoNLL columns.

Readers stream their files line by line and raise a `DataError` naming the file and line
for anything they cannot read. Each task reads its examples through one of them:
translate `read_examples` (source/target pairs), classify `read_classified` (text, label),
tag `read_tagged` (words, tags).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from detr.config import DataConfig
from detr.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One training pair; `where` is "file:line" for messages."""

    src: str
    tgt: str
    where: str
    lang: str | None = None  # multilingual runs: the target language (its tag starts the source)


def read_lines(path: str | Path, invalid: str = "error") -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, text without the newline) of a UTF-8 file.

    Raises:
        DataError: missing file, or invalid UTF-8 (with line and byte offset) unless `invalid="replace"`.
    """
    with open_binary(path) as f:
        yield from decode_lines(f, str(path), invalid)


def open_binary(path: str | Path):
    """`path` opened for reading bytes.

    Raises:
        DataError: missing, a directory, or unreadable (the file named).
    """
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None


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


# Every character Python's str.splitlines breaks a line at, and the tab that separates fields.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\t"})


def one_line(text: str) -> str:
    """`text` for line-oriented output: each line break (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85,
    U+2028, U+2029) and tab becomes a space, so output line i always belongs to input line i."""
    return text.translate(_LINE_BREAKS)


def count_lines(path: str | Path) -> int:
    """Number of lines (a last line without a newline counts)."""
    n, last = 0, b"\n"
    with open_binary(path) as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
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
    """Objects of a JSON Lines file; yields ("file:line", [value of each field as text]):
    a string as it is, anything else as JSON.

    Raises:
        DataError: a line that is not a JSON object, or one without a field.
    """
    for where, values in read_jsonl_values(path, fields):
        yield where, [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]


def json_object(text: str, where: str) -> dict[str, Any]:
    """The JSON object on one line.

    Raises:
        DataError: not JSON, or not an object; the message names `where` (file:line).
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl_values(path: str | Path, fields: list[str]) -> Iterator[tuple[str, list[Any]]]:
    """Like `read_jsonl`, with each field's JSON value as it is (list, number, string, ...)."""
    for number, line in read_lines(path):
        if not line.strip():
            continue
        obj = json_object(line, f"{path}:{number}")
        values = []
        for name in fields:
            if name not in obj:
                raise DataError(f"{path}:{number}: no field '{name}' (fields: {', '.join(obj)})")
            values.append(obj[name])
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
    if fmt == "parallel" and config.multilingual:
        for lang in config.languages:
            for example in read_parallel(f"{path}.{config.src_lang}", f"{path}.{lang}", stats):
                yield replace(example, lang=lang)
        return
    if fmt == "parallel":
        yield from read_parallel(f"{path}.{config.src_lang}", f"{path}.{config.tgt_lang}", stats)
        return
    if config.multilingual:
        raise DataError(f"{path}: data.tgt_lang is a list of languages, which needs parallel files "
                        f"({path}.{config.src_lang}, {path}.{config.languages[0]}, ...), not {fmt}")
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


def check_file(path: Path, setting: str) -> None:
    """Raises DataError when `path` (named by config key `setting`) is missing or a directory."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file ({setting})")
    if not path.is_file():
        raise DataError(f"{path}: file not found ({setting})")


def split_files(config: DataConfig, split: str) -> list[Path]:
    """The files a split reads (to check they exist before any work starts)."""
    path = getattr(config, split)
    if data_format(config, path) == "parallel":
        return [Path(f"{path}.{lang}") for lang in [config.src_lang] + config.languages]
    return [Path(path)]


def check_split(config: DataConfig, split: str) -> None:
    """Fail early: files exist and, for parallel text, have equal line counts."""
    files = split_files(config, split)
    for f in files:
        check_file(f, f"data.{split}")
    if len(files) >= 2:
        counts = [count_lines(f) for f in files]
        for other, count in zip(files[1:], counts[1:]):
            if count != counts[0]:
                raise DataError(
                    f"parallel files differ in length: {files[0]} has {counts[0]} lines, {other} has {count}")


# ----------------------------------------------------------------------------- labelled examples


@dataclass
class Classified:
    """A sentence with its label (classify)."""

    text: str
    label: str
    where: str
    pair: str | None = None  # sentence-pair classification: the second text


@dataclass
class Tagged:
    """A word sequence with one IOB2 tag per word (tag)."""

    words: list[str]
    tags: list[str]
    where: str


def split_path(data: DataConfig, split: str) -> str:
    path = getattr(data, split)
    if path is None:
        raise DataError(f"data.{split} is not set")
    return path


def read_classified(data: DataConfig, split: str) -> Iterator[Classified]:
    """(text, label) examples of `split` from a TSV or JSONL file (`data.src_field`, `data.label_field`).

    Raises:
        DataError: another format, a missing column/field, or an empty label (file and line named).
    """
    path = split_path(data, split)
    fmt = data_format(data, path)
    if fmt not in ("tsv", "jsonl"):
        raise DataError(f"data.{split}: classification reads a .tsv file (with a header) or a .jsonl file with "
                        f"fields '{data.src_field}' and '{data.label_field}'; got {path} ({fmt} format)")
    reader = read_tsv if fmt == "tsv" else read_jsonl
    fields = [data.src_field, data.label_field] + ([data.text_pair_field] if data.text_pair_field else [])
    for where, (text, label, *pair) in reader(path, fields):
        if not label.strip():
            raise DataError(f"{where}: empty label in column '{data.label_field}'")
        if text.strip() and (not pair or pair[0].strip()):
            yield Classified(text, label.strip().strip('"'), where, pair[0] if pair else None)


def read_tagged(data: DataConfig, split: str) -> Iterator[Tagged]:
    """(words, tags) examples of `split`: CoNLL columns, or JSONL word and tag lists
    (`data.tokens_field`, `data.tags_field`); IOB1 is read as IOB2.

    Raises:
        DataError: another format, fields that are not lists of strings of equal length, or an illegal tag.
    """
    path = split_path(data, split)
    fmt = "conll" if data.format == "conll" else data_format(data, path)
    if fmt == "jsonl":
        for where, (words, tags) in read_jsonl_values(path, [data.tokens_field, data.tags_field]):
            if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
                raise DataError(f"{where}: '{data.tokens_field}' and '{data.tags_field}' must be lists of equal length")
            if not all(isinstance(w, (str, int, float)) for w in words):
                raise DataError(f"{where}: '{data.tokens_field}' must be a list of words (strings)")
            bad = [t for t in tags if not isinstance(t, str) or not TAG.match(t)]
            if bad:
                raise DataError(f"{where}: illegal tag {bad[0]!r} (expected O, B-TYPE or I-TYPE)")
            if words:
                yield Tagged([str(w) for w in words], iob1_to_iob2(tags), where)
        return
    if fmt != "parallel" and fmt != "conll":
        raise DataError(f"data.{split}: tagging reads CoNLL column files (a word and its tag per line) or a .jsonl "
                        f"file with fields '{data.tokens_field}' and '{data.tags_field}'; got {path} ({fmt} format)")
    for sentence in read_conll(path):
        yield Tagged(sentence.tokens, sentence.tags, sentence.where)


def chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    it = iter(it)
    while chunk := list(itertools.islice(it, size)):
        yield chunk

"""Subword tokenizer: BPE or Unigram learned with the `tokenizers` library, saved as one file.

Text is split on bytes (GPT-2 style byte-level pre-tokenization), so every string has an
encoding with no `<unk>` and `decode(encode(text)) == text` for any text when no
lowercasing or normalisation is configured. A single space is put in front of every
text before encoding and taken off after decoding, so a sentence's first word is split
like every other word.

Text is text: a literal `<pad>`, `<s>`, `</s>` or `<unk>` typed in a sentence (or found in
training data) is split into ordinary subwords like any other string; special tokens are
reachable only by id. (Runs trained before this rule keep loading; only such literal
strings encode differently now.)

A `Tokenizer` has a `src` and a `tgt` side; with a joint vocabulary they are one object.
A multilingual run's source vocabulary also holds one tag per target language (`<2de>`),
added after learning the subwords; like the other special tokens it is reachable only by id.
`build_tokenizer` learns one from a config's training data; `TextIds` turns text or words
into an encoder's ids for the classify and tag tasks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from detr.atomic import atomic_write_text
from detr.config import DataConfig
from detr.errors import CheckpointError, ConfigError
from detr.readers import check_split, read_examples

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
LANGUAGE_TAG = re.compile(r"<2([A-Za-z0-9_-]+)>")


def language_tag(lang: str) -> str:
    """The token that asks a multilingual model for target language `lang`."""
    return f"<2{lang}>"
FORMAT = "detr-tokenizer/1"


class Subwords:
    """One vocabulary: text ↔ ids."""

    kind = "detr"
    bos, eos = BOS, EOS  # what starts / ends a source sequence in the encoder's input

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        hf.encode_special_tokens = True  # "<pad>" in a text is text, never the padding id
        for i, token in enumerate(SPECIALS):
            if hf.token_to_id(token) != i:
                raise CheckpointError(f"tokenizer: special token {token} must have id {i}")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def add_language_tags(self, languages: list[str]) -> None:
        """Add a tag token per target language (multilingual runs), after the learned vocabulary."""
        self.hf.add_special_tokens([language_tag(lang) for lang in languages])

    def languages(self) -> dict[str, int]:
        """The target languages this vocabulary has tags for, and each tag's id (none: not multilingual)."""
        found = {}
        for token in self.hf.get_added_tokens_decoder().values():
            match = LANGUAGE_TAG.fullmatch(token.content)
            if match:
                found[match.group(1)] = self.hf.token_to_id(token.content)
        return found

    def encode(self, text: str) -> list[int]:
        """Subword ids of `text`, without <s> or </s>."""
        return self.hf.encode(" " + text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch([" " + t for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        text = self.hf.decode([i for i in ids if i >= len(SPECIALS)], skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """A readable string per id (for attention plots): specials by name, others decoded."""
        return [SPECIALS[i] if i < len(SPECIALS) else self.hf.decode([i], skip_special_tokens=False) for i in ids]

    def token_labels(self, ids: Iterable[int]) -> list[str]:
        """`token_strings`, with a subword that starts a word marked "▁" (as SentencePiece shows it)."""
        return ["▁" + s[1:] if s.startswith(" ") else s for s in self.token_strings(ids)]


class PretrainedVocab(Subwords):
    """The source vocabulary of a pretrained BERT-style encoder (WordPiece, `[CLS] text [SEP]`).

    It feeds a warm-started encoder (`model.pretrained`) exactly the ids it was trained on:
    its own normalisation (e.g. lowercasing), `[CLS]` first and `[SEP]` where detr's own
    vocabulary puts `</s>`. Its padding id must be 0, detr's PAD.
    """

    kind = "pretrained"

    def __init__(self, hf: HFTokenizer) -> None:
        hf.no_truncation()  # a saved tokenizer.json may carry its own length and padding settings
        hf.no_padding()
        hf.encode_special_tokens = True  # "[SEP]" in a text is text
        self.hf = hf
        ids = {token: hf.token_to_id(token) for token in ("[PAD]", "[CLS]", "[SEP]")}
        if None in ids.values() or ids["[PAD]"] != PAD:
            raise CheckpointError(f"pretrained tokenizer: needs [PAD] = {PAD}, [CLS] and [SEP] (found {ids})")
        self.bos, self.eos = ids["[CLS]"], ids["[SEP]"]

    @classmethod
    def from_folder(cls, folder: str | Path) -> PretrainedVocab:
        try:
            return cls(HFTokenizer.from_file(str(Path(folder) / "tokenizer.json")))
        except Exception as err:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"{folder}/tokenizer.json: cannot load the pretrained tokenizer: {err}") from None

    def encode(self, text: str) -> list[int]:
        """`[CLS]` and the WordPiece ids of `text` (the caller appends `eos`, [SEP])."""
        return [self.bos] + self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self.bos] + e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self.hf.id_to_token(i) or "[UNK]" for i in ids]

    def token_labels(self, ids: Iterable[int]) -> list[str]:
        return self.token_strings(ids)


HYPHEN = re.compile(r"(\w) - (?=\w)")  # WordPiece output: a hyphen between words, spaced
CONTRACTION = re.compile(r" ' (s|t|re|ve|ll|d|m)\b")


class RenumberedVocab(PretrainedVocab):
    """A pretrained WordPiece vocabulary on both sides of a warm-started encoder-decoder
    (`model.pretrained_decoder`), renumbered so detr's target specials hold their usual ids.

    Search, batching and the exporters know the target's specials by id (<pad> 0, <s> 1, </s> 2,
    <unk> 3). Here [CLS], [SEP] and [UNK] are moved to ids 1, 2 and 3, each swapped with the entry
    there ([unused0..2] in BERT's vocabulary); `order` maps a new id to the pretrained one, and the
    model reorders its embedding rows with it (`PretrainedEncoder.reorder_vocabulary`). The source
    side reads `[CLS] text [SEP]` as the encoder was trained on; the target side
    (`RenumberedTargetVocab`) has no [CLS] in front: the decoder starts from it.
    """

    kind = "pretrained-renumbered"
    starts_with_bos = True

    def __init__(self, hf: HFTokenizer) -> None:
        super().__init__(hf)
        order = list(range(hf.get_vocab_size()))
        for new, token in ((BOS, "[CLS]"), (EOS, "[SEP]"), (UNK, "[UNK]")):
            if hf.token_to_id(token) is None:
                raise CheckpointError(f"pretrained tokenizer: needs a {token} token")
            old = order.index(hf.token_to_id(token))
            order[new], order[old] = order[old], order[new]
        self.order = order  # new id → the pretrained vocabulary's id
        self.renumber = [0] * len(order)
        for new, old in enumerate(order):
            self.renumber[old] = new
        self.bos, self.eos = BOS, EOS

    def _ids(self, ids: list[int]) -> list[int]:
        ids = [self.renumber[i] for i in ids]
        return [BOS] + ids if self.starts_with_bos else ids

    def encode(self, text: str) -> list[int]:
        return self._ids(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._ids(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. BERT's pre-tokenizer splits at every punctuation mark and its decoder puts
        a space around each; hyphens between words and apostrophes of contractions are joined again
        ("peer-to-peer", "it's"), as a detokenizer would."""
        text = self.hf.decode([self.order[i] for i in ids], skip_special_tokens=True)
        return CONTRACTION.sub(r"'\1", HYPHEN.sub(r"\1-", text))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self.hf.id_to_token(self.order[i]) or "[UNK]" for i in ids]


class RenumberedTargetVocab(RenumberedVocab):
    """`RenumberedVocab` for the target side: no [CLS] in front (the decoder starts from <s>, that is [CLS])."""

    kind = "pretrained-renumbered-target"
    starts_with_bos = False


SUBWORD_KINDS = {cls.kind: cls for cls in (Subwords, PretrainedVocab, RenumberedVocab, RenumberedTargetVocab)}


class Tokenizer:
    """Source and target subword vocabularies (the same object when joint)."""

    def __init__(self, src: Subwords, tgt: Subwords | None = None) -> None:
        self.src = src
        self.tgt = tgt if tgt is not None else src

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    @property
    def one_id_space(self) -> bool:
        """Whether an id means the same subword on both sides (a joint vocabulary, or two segmenters over
        one vocabulary, as an OPUS-MT model's source.spm and target.spm): what shared embeddings need."""
        return self.joint or self.src.hf.get_vocab(with_added_tokens=True) == self.tgt.hf.get_vocab(
            with_added_tokens=True)

    def fingerprint(self) -> str:
        """A short hash of the vocabularies: a run stores it, so another run's tokenizer is caught at load."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "joint": self.joint,
            "src_kind": self.src.kind,
            "src": json.loads(self.src.hf.to_str()),
            "tgt": None if self.joint else json.loads(self.tgt.hf.to_str()),
        }
        if self.tgt.kind != Subwords.kind and not self.joint:  # only then: earlier runs keep their fingerprints
            data["tgt_kind"] = self.tgt.kind
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save`.

        Raises:
            CheckpointError: missing, unreadable or not a detr tokenizer file.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            src = SUBWORD_KINDS[data.get("src_kind", "detr")](HFTokenizer.from_str(json.dumps(data["src"])))
            tgt = None if data["joint"] else \
                SUBWORD_KINDS[data.get("tgt_kind", "detr")](HFTokenizer.from_str(json.dumps(data["tgt"])))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: tokenizer file not found") from None
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, Exception) as err:
            raise CheckpointError(f"{path}: not a valid detr tokenizer: {err}") from None
        return cls(src, tgt)


def _new_hf(model_type: str, lowercase: bool, normalization: str) -> tuple[HFTokenizer, object]:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if model_type == "bpe":
        hf = HFTokenizer(models.BPE(unk_token="<unk>"))
        make_trainer = lambda size: trainers.BpeTrainer(  # noqa: E731
            vocab_size=size, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False)
    else:
        hf = HFTokenizer(models.Unigram())
        make_trainer = lambda size: trainers.UnigramTrainer(  # noqa: E731
            vocab_size=size, special_tokens=SPECIALS, unk_token="<unk>", initial_alphabet=alphabet,
            show_progress=False)
    steps = []
    if normalization != "none":
        steps.append(normalizers.NFC() if normalization == "nfc" else normalizers.NFKC())
    if lowercase:
        steps.append(normalizers.Lowercase())
    if steps:
        hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.encode_special_tokens = True  # learn "<pad>" in training text as text
    return hf, make_trainer


def train_subwords(
    texts: Iterable[str], vocab_size: int, model_type: str = "bpe", lowercase: bool = False,
    normalization: str = "none",
) -> Subwords:
    """Learn one subword vocabulary of `vocab_size` entries from `texts`."""
    hf, make_trainer = _new_hf(model_type, lowercase, normalization)
    hf.train_from_iterator((" " + t for t in texts), trainer=make_trainer(vocab_size))
    return Subwords(hf)


def train_tokenizer(
    src_texts: Iterable[str],
    tgt_texts: Iterable[str] | None,
    vocab_size: int,
    model_type: str = "bpe",
    joint: bool = True,
    lowercase: bool = False,
    normalization: str = "none",
) -> Tokenizer:
    """Learn a joint (one vocabulary, both sides) or separate source/target tokenizer.

    Args:
        src_texts, tgt_texts: training text of each side (tgt may be None: source only,
            as for classification).
        vocab_size: entries per vocabulary, specials and the 256 bytes included.
    """
    options = dict(vocab_size=vocab_size, model_type=model_type, lowercase=lowercase, normalization=normalization)
    if tgt_texts is None:
        return Tokenizer(train_subwords(src_texts, **options))
    if joint:
        return Tokenizer(train_subwords(_chain(src_texts, tgt_texts), **options))
    return Tokenizer(train_subwords(src_texts, **options), train_subwords(tgt_texts, **options))


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for it in iterables:
        yield from it


def build_tokenizer(config: DataConfig, pretrained: Path | None = None, both_sides: bool = False) -> Tokenizer:
    """Load `config.tokenizer` if set, else learn one on (up to `tokenizer_max_lines` of) the training data.

    `pretrained`: a pretrained encoder's folder; its vocabulary is the source side and only
    the target side is learned (`joint_vocab` does not apply), or, with `both_sides` (a pretrained
    decoder too), its vocabulary renumbered (`RenumberedVocab`) is both sides and nothing is learned.
    """
    if config.tokenizer is not None:
        return Tokenizer.load(config.tokenizer)
    check_split(config, "train")

    def side(name: str) -> Iterator[str]:
        for e in itertools.islice(read_examples(config, "train"), config.tokenizer_max_lines):
            yield getattr(e, name)

    if pretrained is not None and both_sides:
        return Tokenizer(RenumberedVocab.from_folder(pretrained), RenumberedTargetVocab.from_folder(pretrained))
    if pretrained is not None:
        if config.multilingual:
            raise ConfigError("data.tgt_lang: a multilingual run needs detr's own source vocabulary, "
                              "not a pretrained encoder's")
        return Tokenizer(PretrainedVocab.from_folder(pretrained),
                         train_subwords(side("tgt"), config.vocab_size, config.subword, config.lowercase,
                                        config.normalization))
    tokenizer = train_tokenizer(side("src"), side("tgt"), config.vocab_size, config.subword, config.joint_vocab,
                                config.lowercase, config.normalization)
    if config.multilingual:
        tokenizer.src.add_language_tags(config.languages)
    return tokenizer


class TextIds:
    """Text → ids for an encoder: detr's own subwords (<s> text </s>) or a pretrained
    Hugging Face tokenizer ([CLS] text [SEP]); both truncate to `max_len` ids."""

    def __init__(self, max_len: int, subwords: Subwords | None = None, hf: Any = None) -> None:
        self.max_len, self.subwords, self.hf = max_len, subwords, hf

    @property
    def vocab_size(self) -> int:
        return self.subwords.vocab_size if self.subwords is not None else len(self.hf)

    def sentence(self, text: str) -> tuple[list[int], bool]:
        """Ids of one sentence and whether it was truncated."""
        if self.subwords is not None:
            ids = self.subwords.encode(text)
            return [BOS] + ids[: self.max_len - 2] + [EOS], len(ids) > self.max_len - 2
        ids = self.hf(text, truncation=False)["input_ids"]
        if len(ids) > self.max_len:
            return ids[: self.max_len - 1] + ids[-1:], True
        return ids, False

    def pair(self, first: str, second: str) -> tuple[list[int], bool]:
        """Ids of a sentence pair and whether it was truncated: `[CLS] a [SEP] b [SEP]` for a pretrained
        tokenizer (its segment ids follow from the [SEP]s), `<s> a </s> b </s>` for detr's own; the
        longer text is cut first."""
        if self.subwords is not None:
            a, b = self.subwords.encode(first), self.subwords.encode(second)
            over = len(a) + len(b) + 3 - self.max_len
            for _ in range(max(over, 0)):
                (a if len(a) >= len(b) else b).pop()
            return [BOS] + a + [EOS] + b + [EOS], over > 0
        full = len(self.hf(first, second, truncation=False)["input_ids"])
        ids = self.hf(first, second, truncation="longest_first", max_length=self.max_len)["input_ids"]
        return ids, full > self.max_len

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], bool]:
        """`sentence(text)`, or `pair(text, pair)` when there is a second text."""
        return self.sentence(text) if pair is None else self.pair(text, pair)

    def words(self, words: list[str]) -> tuple[list[int], list[int]]:
        """Ids of a word sequence and, per id, the index of the word it starts (-1: not a first subword)."""
        if self.subwords is not None:
            ids, first = [BOS], [-1]
            for i, w in enumerate(words):
                pieces = self.subwords.encode(w)
                ids += pieces
                first += [i] + [-1] * (len(pieces) - 1)
            ids, first = ids[: self.max_len - 1] + [EOS], first[: self.max_len - 1] + [-1]
            return ids, first
        enc = self.hf(words, is_split_into_words=True, truncation=True, max_length=self.max_len)
        first, previous = [], None
        for w in enc.word_ids():
            first.append(w if w is not None and w != previous else -1)
            previous = w if w is not None else previous
        return enc["input_ids"], first

    def tokens(self, ids: list[int]) -> list[str]:
        if self.subwords is not None:
            return self.subwords.token_labels(ids)
        return self.hf.convert_ids_to_tokens(ids)

"""What a run learns: translation, sentence classification or token tagging.

A task knows its examples, its vocabulary (subwords, and labels), its model, the loss of
a batch and its validation metrics; `detr.trainer.Trainer` runs any task the same way.

    translate   parallel text → Seq2Seq; label-smoothed cross-entropy per target token; loss, ppl, BLEU
    classify    (text, label) → SequenceClassifier; cross-entropy per sentence; loss, accuracy, macro-F1
    tag         (words, tags) → TokenTagger; cross-entropy on each word's first subword; loss, entity F1
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr.atomic import atomic_write_text
from detr.checkpoint import PRETRAINED
from detr.config import Config
from detr.data import (
    TAG,
    Batch,
    BatchStream,
    Encoded,
    Example,
    build_tokenizer,
    check_split,
    data_format,
    iob1_to_iob2,
    pack_by_tokens,
    pad,
    read_conll,
    read_examples,
    read_jsonl,
    read_tsv,
    split_files,
    training_stream,
)
from detr.errors import CheckpointError, ConfigError, DataError
from detr.heads import (
    build_head,
    check_width,
    load_pretrained_encoder,
    resolve_pretrained,
    save_pretrained_files,
)
from detr.metrics import bleu, classification_scores, entity_scores
from detr.model import build_model
from detr.tokenizer import BOS, EOS, PAD, Subwords, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER, LABELS = "tokenizer.json", "labels.json"
IGNORE = -100  # target of positions the loss skips (later subwords of a word, specials, padding)


# ----------------------------------------------------------------------------- translation


class TranslateTask:
    """Parallel text → `Seq2Seq`; validation loss, perplexity and greedy BLEU."""

    name = "translate"
    unit = "tokens"  # what `count` counts, for throughput
    metrics = {"loss": True, "ppl": True, "bleu": False}  # name → lower is better
    default_metric = "bleu"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.valid: list[Example] = []

    def check_data(self) -> None:
        check_split(self.config.data, "train")
        if self.config.data.valid is not None:
            check_split(self.config.data, "valid")
        if self.config.model.pretrained is not None:
            check_width(resolve_pretrained(self.config.model.pretrained), self.config.model)
            if self.config.model.share_embeddings:
                raise ConfigError("model.share_embeddings: the pretrained encoder keeps its own vocabulary; "
                                  "set model.share_embeddings: false")

    def setup(self, run_dir: Path, resuming: bool) -> None:
        """Learn (or, when resuming, load) the tokenizer; vocabulary sizes go into the model config.

        With `model.pretrained` the source side is the pretrained encoder's own vocabulary
        and only the target side is learned."""
        path = run_dir / TOKENIZER
        pretrained = self.config.model.pretrained
        if resuming:
            self.tokenizer = Tokenizer.load(path)
        else:
            folder = resolve_pretrained(pretrained) if pretrained is not None else None
            if self.config.data.tokenizer is None:
                log.info("learning a %s vocabulary of %d from %s", self.config.data.subword,
                         self.config.data.vocab_size, self.config.data.train)
            self.tokenizer = build_tokenizer(self.config.data, folder)
            if folder is not None:
                save_pretrained_files(folder, run_dir / PRETRAINED)
            self.tokenizer.save(path)
        m = self.config.model
        m.src_vocab_size, m.tgt_vocab_size = self.tokenizer.src.vocab_size, self.tokenizer.tgt.vocab_size
        if m.share_embeddings and not self.tokenizer.joint:
            raise ConfigError("model.share_embeddings needs a joint vocabulary: set data.joint_vocab: true")
        if self.config.data.valid is not None:
            self.valid = list(read_examples(self.config.data, "valid"))
            if not self.valid:
                raise DataError(f"{self.config.data.valid}: the validation set is empty")

    def build_model(self) -> nn.Module:
        encoder = None
        if self.config.model.pretrained is not None:  # warm start: pretrained encoder, new decoder
            encoder = load_pretrained_encoder(resolve_pretrained(self.config.model.pretrained))
        return build_model(self.config.model, encoder)

    def stream(self, max_tokens: int, seed: int) -> BatchStream:
        return training_stream(self.config.data, self.tokenizer, max_tokens, seed)

    @staticmethod
    def count(batch: Batch) -> int:
        return batch.num_tgt_tokens

    @staticmethod
    def batch_loss(model: nn.Module, batch: Batch, label_smoothing: float) -> Tensor:
        """Summed cross-entropy over the batch's target tokens (padding ignored)."""
        logits = model(batch.src, batch.tgt_in)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=label_smoothing, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loss_of: Callable[[Batch], Tensor], max_tokens: int,
                 max_sentences: int) -> dict[str, float]:
        from detr.translator import Translator

        data = self.config.data
        loss = token_loss(self.valid, self.tokenizer, data.max_len, max_tokens, loss_of, str(data.valid))
        scored = self.valid[: max_sentences or None]
        decode = dataclasses.replace(self.config.decode, beam_size=1, nbest=1)
        hyps = Translator(model, self.tokenizer, decode, data.max_len).translate([e.src for e in scored])
        return {"loss": loss, "ppl": math.exp(min(loss, 100.0)), "bleu": bleu(hyps, [[e.tgt for e in scored]]).score}


def token_loss(examples: list[Example], tokenizer: Tokenizer, max_len: int, max_tokens: int,
               loss_of: Callable[[Batch], Tensor], name: str = "") -> float:
    """Mean cross-entropy per target token (</s> included) of `examples` under teacher forcing;
    over-long examples are truncated to `max_len`. `loss_of` sums a batch's loss."""
    stream = BatchStream(lambda: examples, Encoded(tokenizer, max_len, "truncate"), max_tokens,
                         max(len(examples), 1), 0, shuffle=False, name=name)
    nll = tokens = 0.0
    with torch.no_grad():
        for batch in stream:
            nll += float(loss_of(batch))
            tokens += batch.num_tgt_tokens
    return nll / max(tokens, 1)


# ----------------------------------------------------------------------------- labelled data


@dataclass
class Labelled:
    """A sentence with its label (classify: `text`, `label`) or a word sequence with tags (tag: `words`, `tags`)."""

    where: str
    text: str = ""
    label: str = ""
    words: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)


def read_labelled(config: Config, split: str) -> Iterator[Labelled]:
    """Examples of `split` for classify (TSV/JSONL text + label) or tag (CoNLL, or JSONL word and tag lists).

    Raises:
        DataError: a missing column/field, a malformed CoNLL line or an illegal tag (file and line named).
    """
    data = config.data
    path = getattr(data, split)
    if path is None:
        raise DataError(f"data.{split} is not set")
    fmt = "conll" if data.format == "conll" else data_format(data, path)
    if config.task == "classify":
        if fmt not in ("tsv", "jsonl"):
            raise ConfigError(f"data.{split}: classification reads .tsv or .jsonl files (got {path})")
        reader = read_tsv if fmt == "tsv" else read_jsonl
        for where, (text, label) in reader(path, [data.src_field, data.label_field]):
            if not label.strip():
                raise DataError(f"{where}: empty label in column '{data.label_field}'")
            if text.strip():
                yield Labelled(where, text=text, label=label.strip().strip('"'))
        return
    if fmt == "jsonl":
        for where, (words, tags) in read_jsonl(path, [data.tokens_field, data.tags_field]):
            words, tags = json.loads(words), json.loads(tags)
            if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
                raise DataError(f"{where}: '{data.tokens_field}' and '{data.tags_field}' must be lists of equal length")
            bad = [t for t in tags if not isinstance(t, str) or not TAG.match(t)]
            if bad:
                raise DataError(f"{where}: illegal tag {bad[0]!r} (expected O, B-TYPE or I-TYPE)")
            if words:
                yield Labelled(where, words=[str(w) for w in words], tags=iob1_to_iob2(tags))
        return
    for sentence in read_conll(path):
        yield Labelled(sentence.where, words=sentence.tokens, tags=sentence.tags)


class TextIds:
    """Text → ids for an encoder: detr's own subwords (<s> text </s>) or a pretrained
    Hugging Face tokenizer ([CLS] text [SEP]); both truncate to `max_len` ids."""

    def __init__(self, max_len: int, subwords: Subwords | None = None, hf=None) -> None:
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


@dataclass
class LabelledBatch:
    src: Tensor  # (B, S) ids
    labels: Tensor  # classify: (B,) label ids; tag: (B, S) tag ids, IGNORE where no word starts
    index: list[int]

    def to(self, device: torch.device) -> LabelledBatch:
        return LabelledBatch(self.src.to(device), self.labels.to(device), self.index)


class LabelledEncoder:
    """Examples → (ids, label ids) for `BatchStream`; counts truncated sentences."""

    def __init__(self, task: LabelTask) -> None:
        self.task = task
        self.max_len = task.text.max_len
        self.filtered = self.truncated = 0

    def __call__(self, examples: list[Labelled]) -> list[tuple[list[int], list[int]]]:
        return [self.task.encode(e, self) for e in examples]


class LabelTask:
    """Sentence classification ("classify") and word tagging ("tag") on one encoder."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.task
        self.unit = "sentences" if self.name == "classify" else "words"
        self.metrics = {"loss": True, "accuracy": False, "f1": False}
        self.default_metric = "accuracy" if self.name == "classify" else "f1"
        self.labels: list[str] = []
        self.text: TextIds | None = None
        self.valid: list[Labelled] = []

    def check_data(self) -> None:
        for split in ("train", "valid"):
            if getattr(self.config.data, split) is not None:
                for f in split_files(self.config.data, split):
                    if not f.is_file():
                        raise DataError(f"{f}: file not found (data.{split})")
        if self.config.model.pretrained is not None:
            resolve_pretrained(self.config.model.pretrained)

    # -- vocabulary and labels

    def setup(self, run_dir: Path, resuming: bool) -> None:
        """Labels from the training data (or the run), checked against the validation data before
        anything is written; then the tokenizer (learned, or the pretrained one) and labels.json."""
        if resuming:
            self.load(run_dir)
        else:
            self.labels = self.read_labels()
        if self.config.data.valid is not None:
            self.valid = list(read_labelled(self.config, "valid"))
            if not self.valid:
                raise DataError(f"{self.config.data.valid}: the validation set is empty")
            self.check_labels(self.valid, str(self.config.data.valid))
        if not resuming:
            self.text = self._learn_text_ids(run_dir)
            atomic_write_text(run_dir / LABELS, json.dumps({"task": self.name, "labels": self.labels}, indent=1))
        if self.config.model.pretrained is None:
            self.config.model.src_vocab_size = self.config.model.tgt_vocab_size = self.text.vocab_size

    def read_labels(self) -> list[str]:
        """The label set of the training data; for tagging, every entity type seen gets both its B- and I- tag."""
        labels = sorted({label for e in read_labelled(self.config, "train") for label in self.targets(e)})
        if not labels:
            raise DataError(f"{self.config.data.train}: no labelled examples")
        if self.name == "tag":
            types = sorted({label[2:] for label in labels if label != "O"})
            labels = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
        return labels

    def targets(self, example: Labelled) -> list[str]:
        return [example.label] if self.name == "classify" else example.tags

    def check_labels(self, examples: list[Labelled], name: str) -> None:
        known = set(self.labels)
        for e in examples:
            for label in self.targets(e):
                if label not in known:
                    raise DataError(f"{e.where}: label {label!r} never occurs in the training data "
                                    f"(known: {', '.join(self.labels[:12])}{', ...' if len(known) > 12 else ''})")

    def _learn_text_ids(self, run_dir: Path) -> TextIds:
        data, pretrained = self.config.data, self.config.model.pretrained
        if pretrained is not None:
            from transformers import AutoTokenizer

            folder = resolve_pretrained(pretrained)
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            save_pretrained_files(folder, run_dir / PRETRAINED, hf)  # the run holds all it needs to predict later
            return TextIds(data.max_len, hf=hf)
        if data.tokenizer is not None:
            tokenizer = Tokenizer.load(data.tokenizer)
        else:
            texts = (e.text if self.name == "classify" else " ".join(e.words)
                     for e in read_labelled(self.config, "train"))
            tokenizer = train_tokenizer(texts, None, data.vocab_size, data.subword, True, data.lowercase,
                                        data.normalization)
        tokenizer.save(run_dir / TOKENIZER)
        return TextIds(data.max_len, subwords=tokenizer.src)

    def load(self, run_dir: Path) -> None:
        """Labels and text ids of a trained run."""
        try:
            saved = json.loads((run_dir / LABELS).read_text(encoding="utf-8"))
            self.labels = list(saved["labels"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{run_dir / LABELS}: missing or unreadable: {err}") from None
        if self.config.model.pretrained is not None:
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(run_dir / PRETRAINED), local_files_only=True)
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{run_dir / PRETRAINED}: cannot load the tokenizer: {err}") from None
            self.text = TextIds(self.config.data.max_len, hf=hf)
        else:
            self.text = TextIds(self.config.data.max_len, subwords=Tokenizer.load(run_dir / TOKENIZER).src)

    # -- model, batches, loss

    def build_model(self, run_dir: Path | None = None, pretrained_weights: bool = True) -> nn.Module:
        encoder = None
        if self.config.model.pretrained is not None:
            folder = resolve_pretrained(self.config.model.pretrained) if pretrained_weights else run_dir / PRETRAINED
            encoder = load_pretrained_encoder(folder, weights=pretrained_weights)
        return build_head(self.name, self.config.model, len(self.labels), encoder)

    def encode(self, e: Labelled, counter: LabelledEncoder | None = None) -> tuple[list[int], list[int]]:
        index = {label: i for i, label in enumerate(self.labels)}
        if self.name == "classify":
            ids, cut = self.text.sentence(e.text)
            target = [index.get(e.label, IGNORE)]
        else:
            ids, first = self.text.words(e.words)
            cut = sum(f >= 0 for f in first) < len(e.words)
            target = [index.get(e.tags[w], IGNORE) if w >= 0 and e.tags else IGNORE for w in first]
        if cut and counter is not None:
            counter.truncated += 1
        return ids, target

    def collate(self, items: list[tuple[list[int], list[int]]], index: list[int]) -> LabelledBatch:
        src = pad([ids for ids, _ in items])
        if self.name == "classify":
            labels = torch.tensor([t[0] for _, t in items])
        else:
            labels = pad([t for _, t in items])
            labels[src == PAD] = IGNORE
        return LabelledBatch(src, labels, index)

    def stream(self, max_tokens: int, seed: int, split: str = "train", shuffle: bool = True) -> BatchStream:
        examples = (lambda: read_labelled(self.config, "train")) if split == "train" else (lambda: self.valid)
        return BatchStream(examples, LabelledEncoder(self), max_tokens, self.config.data.pool_size, seed,
                           shuffle=shuffle, name=str(getattr(self.config.data, split)),
                           size=lambda item: (len(item[0]),), collate=self.collate)

    def count(self, batch: LabelledBatch) -> int:
        return int((batch.labels != IGNORE).sum())

    @staticmethod
    def batch_loss(model: nn.Module, batch: LabelledBatch, label_smoothing: float) -> Tensor:
        logits = model(batch.src)  # (B, C) or (B, S, C)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch.labels.reshape(-1),
                               ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")

    # -- prediction and evaluation

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: list[Labelled], max_tokens: int) -> list[tuple[list[str], Tensor]]:
        """Per example: the predicted label(s) (one per word for tag: words past the maximum length get "O")
        and the probabilities (classify: (C,); tag: (words, C))."""
        model.eval()
        device = next(model.parameters()).device
        encoded = [self.encode(e) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: len(encoded[i][0]))
        out: list[tuple[list[str], Tensor] | None] = [None] * len(examples)
        for group in pack_by_tokens([(len(ids),) for ids, _ in encoded], max_tokens, order):
            src = pad([encoded[i][0] for i in group]).to(device)
            probs = model(src).float().softmax(-1).cpu()
            for row, i in enumerate(group):
                if self.name == "classify":
                    out[i] = ([self.labels[int(probs[row].argmax())]], probs[row])
                    continue
                _, first = self.text.words(examples[i].words)
                word_probs = torch.zeros(len(examples[i].words), len(self.labels))
                word_probs[:, self.labels.index("O")] = 1.0  # words cut by truncation
                for pos, w in enumerate(first):
                    if w >= 0:
                        word_probs[w] = probs[row, pos]
                out[i] = ([self.labels[int(k)] for k in word_probs.argmax(-1)], word_probs)
        return out  # type: ignore[return-value]

    def evaluate(self, model: nn.Module, loss_of: Callable[[LabelledBatch], Tensor], max_tokens: int,
                 max_sentences: int) -> dict[str, float]:
        loss = count = 0.0
        with torch.no_grad():
            for batch in self.stream(max_tokens, 0, "valid", shuffle=False):
                loss += float(loss_of(batch))
                count += self.count(batch)
        scored = self.valid[: max_sentences or None]
        predicted = [labels for labels, _ in self.predict(model, scored, max_tokens)]
        report = self.report(scored, predicted)
        return {"loss": loss / max(count, 1), "accuracy": report["accuracy"], "f1": report["f1"]}

    def report(self, examples: list[Labelled], predicted: list[list[str]]) -> dict:
        if self.name == "classify":
            return classification_scores([e.label for e in examples], [p[0] for p in predicted], self.labels)
        return entity_scores([e.tags for e in examples], predicted)


def make_task(config: Config) -> TranslateTask | LabelTask:
    return TranslateTask(config) if config.task == "translate" else LabelTask(config)


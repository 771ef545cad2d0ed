"""What classify and tag share: labels learned from the data, an encoder with a head, labelled batches.

`LabelTask` implements the `Task` interface once; `ClassifyTask` and `TagTask` fill in the
few steps where a sentence label and per-word tags differ (reading, targets, the head).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from detr.atomic import atomic_write_text
from detr.batching import BatchStream, pad
from detr.config import Config, ModelConfig
from detr.errors import CheckpointError, DataError
from detr.labeller import Labeller, check_labels
from detr.loss import IGNORE, label_loss
from detr.pretrained import load_hf_tokenizer, resolve_pretrained, save_pretrained_files
from detr.rundir import RunDir
from detr.tokenizer import PAD, TextIds, Tokenizer, train_tokenizer


@dataclass
class LabelledBatch:
    """Padded ids and label ids of one batch; `index` holds each row's position in its pool."""

    src: Tensor  # (B, S) ids
    labels: Tensor  # classify: (B,) label ids; tag: (B, S) tag ids, IGNORE where no word starts
    index: list[int]

    def to(self, device: torch.device) -> LabelledBatch:
        return LabelledBatch(self.src.to(device), self.labels.to(device), self.index)


class LabelledEncoder:
    """Examples → (ids, label ids) for `BatchStream` (an `ExampleEncoder`); counts truncated inputs."""

    def __init__(self, task: LabelTask) -> None:
        self.task = task
        self.max_len = task.text.max_len
        self.index = {label: i for i, label in enumerate(task.labels)}
        self.filtered = self.truncated = 0

    def __call__(self, examples: list[Any]) -> list[tuple[list[int], list[int]]]:
        out = []
        for e in examples:
            ids, targets, cut = self.task.encode(e, self.index)
            self.truncated += cut
            out.append((ids, targets))
        return out


class LabelTask(ABC):
    """A head on an encoder (detr's own, or a pretrained BERT-style one) predicting labels."""

    name: ClassVar[str]
    unit: ClassVar[str]
    metrics: ClassVar[dict[str, bool]] = {"loss": True, "accuracy": False, "f1": False}
    default_metric: ClassVar[str]
    predictor_class: ClassVar[type[Labeller]]

    def __init__(self, config: Config) -> None:
        self.config = config
        self.labels: list[str] = []
        self.text: TextIds | None = None
        self.tokenizer: Tokenizer | None = None  # detr's own subwords (None with a pretrained tokenizer)
        self.valid: list[Any] = []

    # -- what classify and tag each define

    def read(self, split: str) -> Iterator[Any]:
        """The labelled examples of `split` ("train", "valid", "test"), read as the predictor reads them."""
        return self.predictor_class.read(self.config.data, split)

    def targets(self, example: Any) -> list[str]:
        """The labels an example carries (one for a sentence, one per word)."""
        return self.predictor_class.targets(example)

    @abstractmethod
    def training_text(self, example: Any) -> str:
        """The text a tokenizer is learned from."""

    @abstractmethod
    def encode(self, example: Any, index: dict[str, int]) -> tuple[list[int], list[int], bool]:
        """(ids, label ids, truncated) of one example; label ids are IGNORE where nothing is predicted."""

    @abstractmethod
    def collate_labels(self, targets: list[list[int]], src: Tensor) -> Tensor:
        """The label tensor of a batch whose padded ids are `src`."""

    @abstractmethod
    def head(self, encoder: nn.Module, n_labels: int, model: ModelConfig) -> nn.Module:
        """The model: `encoder` with this task's head."""

    def label_set(self, seen: set[str]) -> list[str]:
        """The labels the head predicts, from those seen in the training data."""
        return sorted(seen)

    # -- the Task interface

    def check_data(self) -> None:
        """The training (and validation) file exists, has the task's format and fields: its first
        example is read now, so a wrong file fails in seconds, before any work."""
        for split in ("train", "valid"):
            if getattr(self.config.data, split) is not None:
                next(iter(self.read(split)), None)
        if self.config.model.pretrained is not None:
            resolve_pretrained(self.config.model.pretrained)

    def setup(self, run: RunDir, resuming: bool) -> tuple[int, int]:
        """Labels from the training data (or the run), checked against the validation data before
        anything is written; then the tokenizer (learned, or the pretrained one) and labels.json."""
        if resuming:
            self.load(run)
        else:
            self.labels = self.read_labels()
        if self.config.data.valid is not None:
            self.valid = list(self.read("valid"))
            if not self.valid:
                raise DataError(f"{self.config.data.valid}: the validation set is empty")
            check_labels(self.valid, self.labels, self.targets)
        if not resuming:
            self.text = self._learn_text_ids(run)
            atomic_write_text(run.labels, json.dumps({"task": self.name, "labels": self.labels}, indent=1))
        return self.text.vocab_size, self.text.vocab_size

    def read_labels(self) -> list[str]:
        """The label set of the training data (see `label_set`).

        Raises:
            DataError: the training data holds no labelled example.
        """
        seen = {label for e in self.read("train") for label in self.targets(e)}
        if not seen:
            raise DataError(f"{self.config.data.train}: no labelled examples")
        return self.label_set(seen)


    def _learn_text_ids(self, run: RunDir) -> TextIds:
        data, pretrained = self.config.data, self.config.model.pretrained
        if pretrained is not None:
            folder = resolve_pretrained(pretrained)
            hf = load_hf_tokenizer(folder)
            save_pretrained_files(folder, run.pretrained, hf)  # the run holds all it needs to predict later
            return TextIds(data.max_len, hf=hf)
        if data.tokenizer is not None:
            tokenizer = Tokenizer.load(data.tokenizer)
        else:
            tokenizer = train_tokenizer((self.training_text(e) for e in self.read("train")), None, data.vocab_size,
                                        data.subword, True, data.lowercase, data.normalization)
        tokenizer.save(run.tokenizer)
        self.tokenizer = tokenizer
        return TextIds(data.max_len, subwords=tokenizer.src)

    def load(self, run: RunDir) -> None:
        """Labels and text ids of a trained run."""
        try:
            saved = json.loads(run.labels.read_text(encoding="utf-8"))
            self.labels = [str(label) for label in saved["labels"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{run.labels}: missing or unreadable: {err}") from None
        if self.config.model.pretrained is not None:
            self.text = TextIds(self.config.data.max_len, hf=load_hf_tokenizer(run.pretrained))
        else:
            self.tokenizer = Tokenizer.load(run.tokenizer)
            self.text = TextIds(self.config.data.max_len, subwords=self.tokenizer.src)

    def build_model(self, model: ModelConfig, encoder: nn.Module | None = None) -> nn.Module:
        """The task's head with one output per label, on `encoder` (or detr's own encoder of `model`)."""
        if encoder is not None and self.text is not None and self.text.hf is not None:
            encoder.sep_id = self.text.hf.sep_token_id  # sentence pairs get BERT's segment ids
        return self.head(encoder, len(self.labels), model)

    def collate(self, items: list[tuple[list[int], list[int]]], index: list[int]) -> LabelledBatch:
        """Encoded examples → a padded `LabelledBatch`."""
        src = pad([ids for ids, _ in items])
        return LabelledBatch(src, self.collate_labels([t for _, t in items], src), index)

    def stream(self, max_tokens: int, seed: int) -> BatchStream:
        """The shuffled, resumable stream of training batches (lengths in subword ids)."""
        return self._stream(lambda: self.read("train"), max_tokens, seed, str(self.config.data.train), True)

    def _stream(self, examples: Callable[[], Any], max_tokens: int, seed: int, name: str,
                shuffle: bool) -> BatchStream:
        return BatchStream(examples, LabelledEncoder(self), max_tokens, self.config.data.pool_size, seed,
                           shuffle=shuffle, name=name, size=lambda item: (len(item[0]),), collate=self.collate)

    def count(self, batch: LabelledBatch) -> int:
        """Labels the loss reads in `batch`: sentences (classify) or words' first subwords (tag)."""
        return int((batch.labels != IGNORE).sum())

    def batch_loss(self, model: nn.Module, batch: LabelledBatch, label_smoothing: float) -> Tensor:
        """Summed cross-entropy of the batch's labels."""
        return label_loss(model(batch.src), batch.labels, label_smoothing)  # logits (B, C) or (B, S, C)

    def validate(self, model: nn.Module, loss_of: Callable[[LabelledBatch], Tensor], max_tokens: int,
                 max_sentences: int) -> dict[str, float]:
        """Loss per label, and accuracy and F1 (macro-F1 for classify, entity F1 for tag) of the
        first `max_sentences` validation examples."""
        loss = count = 0.0
        with torch.no_grad():
            for batch in self._stream(lambda: self.valid, max_tokens, 0, str(self.config.data.valid), False):
                loss += float(loss_of(batch))
                count += self.count(batch)
        scored = self.valid[: max_sentences or None]
        predictor = self.predictor(model, self.config)
        report = predictor.report(scored, predictor.predict(scored))
        return {"loss": loss / max(count, 1), "accuracy": report["accuracy"], "f1": report["f1"]}

    def predictor(self, model: nn.Module, config: Config) -> Labeller:
        """A `Classifier` or `Tagger` for `model`, batching by `config.decode`."""
        return self.predictor_class(model, self.text, self.labels, config.decode, config.data)

    def fingerprint(self) -> str | None:
        """The fingerprint of detr's own tokenizer (None with a pretrained tokenizer, which the run keeps)."""
        return self.tokenizer.fingerprint() if self.tokenizer is not None else None


def pad_labels(targets: list[list[int]], src: Tensor) -> Tensor:
    """Per-position label ids padded like `src`, IGNORE at padding."""
    labels = pad(targets)
    labels[src == PAD] = IGNORE
    return labels

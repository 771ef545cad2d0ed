"""Word tagging (NER, BIO tags): (words, tags) → `TokenTagger`, read on each word's first subword."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from detr.config import ModelConfig
from detr.heads import TokenTagger, head_encoder
from detr.labeller import Tagger
from detr.loss import IGNORE
from detr.readers import Tagged
from detr.tasks.labelled import LabelTask, pad_labels


class TagTask(LabelTask):
    """One IOB2 tag per word; cross-entropy on each word's first subword; validation loss, token
    accuracy and entity-level F1 (seqeval)."""

    name: ClassVar[str] = "tag"
    unit: ClassVar[str] = "words"
    default_metric: ClassVar[str] = "f1"
    predictor_class = Tagger

    def training_text(self, example: Tagged) -> str:
        return " ".join(example.words)

    def label_set(self, seen: set[str]) -> list[str]:
        """O, then B- and I- of every entity type seen (a type seen only as B- can still continue)."""
        types = sorted({label[2:] for label in seen if label != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]

    def encode(self, example: Tagged, index: dict[str, int]) -> tuple[list[int], list[int], bool]:
        ids, first = self.text.words(example.words)
        cut = sum(f >= 0 for f in first) < len(example.words)
        return ids, [index.get(example.tags[w], IGNORE) if w >= 0 else IGNORE for w in first], cut

    def collate_labels(self, targets: list[list[int]], src: Tensor) -> Tensor:
        return pad_labels(targets, src)  # (B, S)

    def head(self, encoder: nn.Module | None, n_labels: int, model: ModelConfig) -> nn.Module:
        return TokenTagger(head_encoder(model, encoder), n_labels, model.dropout)

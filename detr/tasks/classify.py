"""Sentence classification (sentiment, topic): (text, label) → `SequenceClassifier`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.heads import SequenceClassifier, head_encoder
from detr.labeller import Classifier
from detr.loss import IGNORE
from detr.readers import Classified
from detr.tasks.labelled import LabelTask


class ClassifyTask(LabelTask):
    """One label per sentence, from the pooled encoder states; cross-entropy per sentence;
    validation loss, accuracy and macro-F1."""

    name: ClassVar[str] = "classify"
    unit: ClassVar[str] = "sentences"
    default_metric: ClassVar[str] = "accuracy"
    predictor_class = Classifier

    def training_text(self, example: Classified) -> str:
        return example.text if example.pair is None else f"{example.text} {example.pair}"

    def encode(self, example: Classified, index: dict[str, int]) -> tuple[list[int], list[int], bool]:
        ids, cut = self.text.encode(example.text, example.pair)
        return ids, [index.get(example.label, IGNORE)], cut

    def collate_labels(self, targets: list[list[int]], src: Tensor) -> Tensor:
        return torch.tensor([t[0] for t in targets])  # (B,)

    def head(self, encoder: nn.Module | None, n_labels: int, model: ModelConfig) -> nn.Module:
        return SequenceClassifier(head_encoder(model, encoder), n_labels, model.pooling, model.dropout)

"""Trained classify/tag runs: labels for sentences, tags for words, and the scoring report.

    classifier = detr.load("runs/sst2")
    classifier.classify(["a gorgeous film"])               # → [("1", {"0": 0.03, "1": 0.97})]
    tagger = detr.load("runs/conll")
    tagger.tag([["John", "lives", "in", "Paris"]])          # → [[("John", "B-PER"), ..., ("Paris", "B-LOC")]]

Both batch their inputs by length under `decode.max_tokens` and `decode.batch_size` (the
run's `decode` section), through the same packer as training and translation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detr.batching import pack_by_tokens, pad
from detr.config import DataConfig, DecodeConfig
from detr.errors import DataError
from detr.metrics import classification_scores, entity_scores
from detr.readers import Classified, Tagged, read_classified, read_tagged
from detr.tokenizer import TextIds


class Labeller(ABC):
    """What a `Classifier` and a `Tagger` share: the model, its label set, batched prediction."""

    def __init__(self, model: nn.Module, text: TextIds, labels: list[str], decode: DecodeConfig,
                 data: DataConfig) -> None:
        """
        Args:
            model: a `SequenceClassifier` or `TokenTagger` (put in eval mode here).
            text: text → encoder ids, as in training.
            labels: the run's label set (`labels.json`), in the model's output order.
            decode: batching of predictions (`max_tokens`, `batch_size`).
            data: how labelled files are read (format, fields), for `score_file`.
        """
        self.model, self.text, self.labels = model.eval(), text, labels
        self.decode, self.data = decode, data

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probabilities(self, ids: list[list[int]]) -> list[Tensor]:
        """Label probabilities of each id list: classify (C,), tag (S, C); in input order."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Tensor | None] = [None] * len(ids)
        for group in pack_by_tokens([(len(x),) for x in ids], self.decode.max_tokens, order,
                                    max_items=self.decode.batch_size):
            probs = self.model(pad([ids[i] for i in group]).to(self.device)).float().softmax(-1).cpu()
            for row, i in enumerate(group):
                out[i] = probs[row]
        return out  # type: ignore[return-value]

    @staticmethod
    @abstractmethod
    def read(data: DataConfig, split: str) -> Iterator[Any]:
        """The labelled examples of a split, read like the training data."""

    @staticmethod
    @abstractmethod
    def targets(example: Any) -> list[str]:
        """The labels an example carries."""

    @abstractmethod
    def predict(self, examples: list[Any]) -> list[Any]:
        """The prediction for each example (a label, or one tag per word)."""

    @abstractmethod
    def report(self, examples: list[Any], predicted: list[Any]) -> dict:
        """The scores of `predicted` against the examples' labels."""

    def score_file(self, path: str | Path) -> dict:
        """The report on a labelled file read like the training data (same format and fields).

        Raises:
            DataError: unreadable file, no examples, or a label the training data never had (line named).
        """
        examples = list(self.read(replace(self.data, test=str(path)), "test"))
        if not examples:
            raise DataError(f"{path}: no labelled examples")
        check_labels(examples, self.labels, self.targets)
        return self.report(examples, self.predict(examples))


class Classifier(Labeller):
    """Sentence classification: one label per text, with every label's probability."""

    @property
    def pairs(self) -> bool:
        """Whether the run classifies sentence pairs (`data.text_pair_field`)."""
        return self.data.text_pair_field is not None

    def classify(self, texts: list[str] | list[tuple[str, str]]) -> list[tuple[str, dict[str, float]]]:
        """(label, {label: probability}) per text, or per (text, text) pair for a pair run; a blank
        text (or a pair with a blank side) gets ("", {}).

        Raises:
            DataError: a pair given to a single-text run, or a single text to a pair run.
        """
        for n, t in enumerate(texts, start=1):
            if isinstance(t, str) == self.pairs:
                want = "(text, text) pairs" if self.pairs else "single texts"
                raise DataError(f"input {n}: this run classifies {want}")
        kept = [i for i, t in enumerate(texts) if all(s.strip() for s in ([t] if isinstance(t, str) else t))]
        out: list[tuple[str, dict[str, float]]] = [("", {}) for _ in texts]
        ids = [self.text.sentence(texts[i])[0] if isinstance(texts[i], str) else self.text.pair(*texts[i])[0]
               for i in kept]
        for i, probs in zip(kept, self.probabilities(ids)):
            out[i] = (self.labels[int(probs.argmax())], {label: float(p) for label, p in zip(self.labels, probs)})
        return out

    def report(self, examples: list[Classified], predicted: list[str]) -> dict:
        """Accuracy, macro-F1, per-class scores and the confusion matrix of `predicted` against `examples`."""
        return classification_scores([e.label for e in examples], predicted, self.labels)

    def predict(self, examples: list[Classified]) -> list[str]:
        """The predicted label of each example."""
        return [label for label, _ in self.classify([e.text if e.pair is None else (e.text, e.pair)
                                                     for e in examples])]

    @staticmethod
    def read(data: DataConfig, split: str) -> Iterator[Classified]:
        return read_classified(data, split)

    @staticmethod
    def targets(example: Classified) -> list[str]:
        return [example.label]

    def saliency_targets(self, text: str) -> tuple[list[int], list[tuple[int, ...]], list[str], str, float | None]:
        """For `detr inspect`: the ids of `text`, the output to explain (the predicted label), its
        name, the output text and its probability."""
        ids = self.text.sentence(text)[0]
        probs = self.probabilities([ids])[0]
        label = int(probs.argmax())
        return ids, [(label,)], [self.labels[label]], self.labels[label], float(probs[label])

    @staticmethod
    def format_report(report: dict) -> str:
        """The report as a table: per class precision, recall, F1, support; then the confusion matrix."""
        labels = report["labels"]
        width = max(12, *(len(label) for label in labels))
        lines = [f"{'':>{width}} precision    recall        f1   support"]
        for label in labels:
            c = report["per_class"][label]
            lines.append(f"{label:>{width}} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:9d}")
        lines += ["", f"accuracy {report['accuracy']:.4f}  macro-F1 {report['f1']:.4f}  ({report['n']} sentences)", "",
                  "confusion matrix (rows: gold, columns: predicted):",
                  f"{'':>{width}} " + " ".join(f"{label[:8]:>8}" for label in labels)]
        for label, row in zip(labels, report["confusion"]):
            lines.append(f"{label:>{width}} " + " ".join(f"{n:8d}" for n in row))
        return "\n".join(lines)


class Tagger(Labeller):
    """Word tagging (NER): one IOB2 tag per word, read on each word's first subword."""

    def tag(self, sentences: list[list[str]] | list[str]) -> list[list[tuple[str, str]]]:
        """(word, tag) per word; a sentence is a word list, or a string split on whitespace."""
        words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
        out: list[list[tuple[str, str]]] = [[] for _ in words]
        kept = [i for i, w in enumerate(words) if w]
        for i, tags in zip(kept, self.predict_words([words[i] for i in kept])):
            out[i] = list(zip(words[i], tags))
        return out

    def predict_words(self, sentences: list[list[str]]) -> list[list[str]]:
        """One tag per word of each sentence; words cut off by the length limit get "O"."""
        encoded = [self.text.words(words) for words in sentences]
        outside = self.labels.index("O")
        tags = []
        for words, (_, first), probs in zip(sentences, encoded, self.probabilities([ids for ids, _ in encoded])):
            best = [outside] * len(words)
            for pos, w in enumerate(first):
                if w >= 0:
                    best[w] = int(probs[pos].argmax())
            tags.append([self.labels[k] for k in best])
        return tags

    def report(self, examples: list[Tagged], predicted: list[list[str]]) -> dict:
        """seqeval's entity-level precision, recall and F1 (and token accuracy) of `predicted`."""
        return entity_scores([e.tags for e in examples], predicted)

    def predict(self, examples: list[Tagged]) -> list[list[str]]:
        """The predicted tags of each example's words."""
        return self.predict_words([e.words for e in examples])

    @staticmethod
    def read(data: DataConfig, split: str) -> Iterator[Tagged]:
        return read_tagged(data, split)

    @staticmethod
    def targets(example: Tagged) -> list[str]:
        return example.tags

    def saliency_targets(self, text: str) -> tuple[list[int], list[tuple[int, ...]], list[str], str, float | None]:
        """For `detr inspect`: the ids of `text` split into words, the outputs to explain (each word's
        predicted tag at its first subword), their names ("word/TAG"), the output text and no score."""
        words = text.split()
        ids, first = self.text.words(words)
        probs = self.probabilities([ids])[0]
        picks = [(p, int(probs[p].argmax())) for p, w in enumerate(first) if w >= 0]
        names = [f"{words[first[p]]}/{self.labels[tag]}" for p, tag in picks]
        return ids, picks, names, " ".join(names), None

    @staticmethod
    def format_report(report: dict) -> str:
        """seqeval's per-type table, then entity F1, precision, recall and token accuracy."""
        return (f"{report['report'].rstrip()}\n\nentity F1 {report['f1']:.4f}  precision {report['precision']:.4f}  "
                f"recall {report['recall']:.4f}  token accuracy {report['accuracy']:.4f}  ({report['n']} sentences)")


def check_labels(examples: list[Any], labels: list[str], targets: Callable[[Any], list[str]]) -> None:
    """Raises DataError naming the place (`example.where`) of a label not in `labels`, the training data's."""
    known = set(labels)
    for example in examples:
        for label in targets(example):
            if label not in known:
                raise DataError(f"{example.where}: label {label!r} never occurs in the training data "
                                f"(known: {', '.join(labels[:12])}{', ...' if len(known) > 12 else ''})")

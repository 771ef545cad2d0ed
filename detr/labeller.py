"""A trained classify/tag run: labels for sentences, tags for words, and the evaluation report.

    labeller = detr.load("runs/sst2")
    labeller.classify(["a gorgeous film"])                  # → [("1", {"0": 0.03, "1": 0.97})]
    tagger = detr.load("runs/conll")
    tagger.tag([["John", "lives", "in", "Paris"]])           # → [[("John", "B-PER"), ..., ("Paris", "B-LOC")]]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from detr.checkpoint import CONFIG, MODEL, load_weights
from detr.config import Config, load_config
from detr.errors import CheckpointError, ConfigError, DataError
from detr.tasks import LABELS, Labelled, LabelTask, read_labelled


class Labeller:
    """Predictions of a `SequenceClassifier` or `TokenTagger` run, in input order."""

    def __init__(self, task: LabelTask, model, max_tokens: int = 4096) -> None:
        self.task, self.model, self.max_tokens = task, model.eval(), max_tokens

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    def classify(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        """(label, {label: probability}) per text; a blank text gets ("", {})."""
        if self.task.name != "classify":
            raise ConfigError(f"this run tags words (task {self.task.name}); use tag()")
        kept = [i for i, t in enumerate(texts) if t.strip()]
        out: list[tuple[str, dict[str, float]]] = [("", {}) for _ in texts]
        predicted = self.task.predict(self.model, [Labelled(f"line {i + 1}", text=texts[i]) for i in kept],
                                      self.max_tokens)
        for i, (labels, probs) in zip(kept, predicted):
            out[i] = (labels[0], {label: float(p) for label, p in zip(self.labels, probs)})
        return out

    def tag(self, sentences: list[list[str]] | list[str]) -> list[list[tuple[str, str]]]:
        """(word, tag) per word; a sentence is a word list, or a string split on whitespace."""
        if self.task.name != "tag":
            raise ConfigError(f"this run classifies sentences (task {self.task.name}); use classify()")
        words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
        kept = [i for i, w in enumerate(words) if w]
        out: list[list[tuple[str, str]]] = [[] for _ in words]
        predicted = self.task.predict(self.model, [Labelled(f"sentence {i + 1}", words=words[i]) for i in kept],
                                      self.max_tokens)
        for i, (tags, _) in zip(kept, predicted):
            out[i] = list(zip(words[i], tags))
        return out

    def evaluate(self, path: str | Path) -> dict:
        """The report on a labelled file read like the training data (same format and fields).

        Raises:
            DataError: unreadable file, or a label the training data never had (line named).
        """
        config = dataclasses.replace(self.task.config, data=dataclasses.replace(self.task.config.data, test=str(path)))
        examples = list(read_labelled(config, "test"))
        if not examples:
            raise DataError(f"{path}: no labelled examples")
        self.task.check_labels(examples, str(path))
        predicted = [labels for labels, _ in self.task.predict(self.model, examples, self.max_tokens)]
        return self.task.report(examples, predicted)


def load_labeller(run_dir: str | Path, device: str = "cpu", config: Config | None = None) -> Labeller:
    """The `Labeller` of a classify/tag run directory.

    Raises:
        CheckpointError: a missing or corrupt file of the run.
    """
    run_dir = Path(run_dir)
    if config is None:
        try:
            config = load_config(run_dir / CONFIG)
        except ConfigError as err:
            raise CheckpointError(f"invalid run config: {err}") from None
    if not (run_dir / LABELS).is_file():
        raise CheckpointError(f"{run_dir / LABELS}: not found (is {run_dir} a classify/tag run?)")
    task = LabelTask(config)
    task.load(run_dir)
    model = task.build_model(run_dir, pretrained_weights=False).to(device)
    load_weights(model, run_dir / MODEL)
    return Labeller(task, model, config.train.max_tokens)

"""What a run learns: one class per task behind one interface (`Task`), chosen by `config.task`.

    translate   parallel text → Seq2Seq; label-smoothed cross-entropy per target token; loss, ppl, BLEU
    classify    (text, label) → SequenceClassifier; cross-entropy per sentence; loss, accuracy, macro-F1
    tag         (words, tags) → TokenTagger; cross-entropy on each word's first subword; loss, entity F1

`TASKS` is the only place a task's name selects code.
"""

from __future__ import annotations

from detr.config import Config
from detr.errors import ConfigError
from detr.tasks.base import Task
from detr.tasks.classify import ClassifyTask
from detr.tasks.tag import TagTask
from detr.tasks.translate import TranslateTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TranslateTask, ClassifyTask, TagTask)}


def make_task(config: Config) -> Task:
    """The task object `config.task` names, made with `config`."""
    try:
        cls = TASKS[config.task]
    except KeyError:
        raise ConfigError(f"task: unknown task {config.task!r}; choose one of {', '.join(TASKS)}") from None
    return cls(config)


__all__ = ["TASKS", "ClassifyTask", "TagTask", "Task", "TranslateTask", "make_task"]

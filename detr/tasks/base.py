"""The task interface: everything the trainer and the run loader know about a task.

The trainer runs any task the same way, in this order:

    task = make_task(config)                       # the registry in detr.tasks
    task.check_data()                              # fail fast, before the run directory is touched
    src, tgt = task.setup(run, resuming)           # vocabulary and labels; returns the vocabulary sizes
    config = config.with_vocab(src, tgt)           # the effective config, saved as config.yaml
    model = task.build_model(config.model, encoder)
    for batch in task.stream(max_tokens, seed):    # training batches
        loss = task.batch_loss(model, batch, smoothing) / sum(task.count(b) for b in step)
    task.validate(model, loss_of, max_tokens, max_sentences)   # every train.eval_every steps

and the run loader (`detr.checkpoint.load_run`) rebuilds a trained run with
`task.load(run)`, `task.build_model(...)` and `task.predictor(model, config)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from detr.batching import BatchStream
from detr.config import Config, ModelConfig
from detr.rundir import RunDir


class Task(Protocol):
    """What a run learns: its examples, vocabulary (and labels), model, loss, metrics and predictor."""

    name: ClassVar[str]  # the value of `config.task` that selects this class
    unit: ClassVar[str]  # what `count` counts, for throughput in the log ("tokens", "sentences", "words")
    metrics: ClassVar[dict[str, bool]]  # validation metric name → True when lower is better
    default_metric: ClassVar[str]  # `train.early_stopping_metric: auto` means this one

    config: Config  # the configuration the task was made with (vocabulary sizes possibly unset)

    def check_data(self) -> None:
        """Check that the configured data files exist and have the task's format, before any work.

        Raises:
            DataError, ConfigError: naming the file (and line) or the config key.
        """

    def setup(self, run: RunDir, resuming: bool) -> tuple[int, int]:
        """Learn (new run) or load (resumed run) the tokenizer and labels; a new run writes them into
        `run`. Reads the validation set. Called once, before the model is built.

        Returns:
            (src_vocab_size, tgt_vocab_size) the model must have; `Config.with_vocab` makes the
            effective config from them.
        """

    def load(self, run: RunDir) -> None:
        """Read what a trained run needs to predict (tokenizer, labels) from `run`.

        Raises:
            CheckpointError: a missing or unreadable file, named.
        """

    def build_model(self, model: ModelConfig, encoder: nn.Module | None = None) -> nn.Module:
        """A freshly initialised model of `model` (vocabulary sizes set) on `encoder`, a pretrained
        encoder (`detr.pretrained.encoder_for`), or on detr's own encoder when None."""

    def stream(self, max_tokens: int, seed: int) -> BatchStream:
        """The shuffled, resumable stream of training batches of at most `max_tokens` padded tokens."""

    def count(self, batch: Any) -> int:
        """How many loss terms `batch` holds (target tokens, sentences or tagged words)."""

    def batch_loss(self, model: nn.Module, batch: Any, label_smoothing: float) -> Tensor:
        """The loss of `batch` summed over its `count` terms (the trainer divides once per step)."""

    def validate(self, model: nn.Module, loss_of: Callable[[Any], Tensor], max_tokens: int,
                 max_sentences: int) -> dict[str, float]:
        """Validation metrics (every name of `metrics`) on the validation set read in `setup`.

        Args:
            loss_of: the trainer's summed loss of a batch (its device and precision), no smoothing.
            max_tokens: batch budget for the loss.
            max_sentences: score only the first this many examples by decoding (0: all).
        """

    def predictor(self, model: nn.Module, config: Config) -> Any:
        """What predicts with a trained `model` of this task: a `Translator`, `Classifier` or `Tagger`."""

    def fingerprint(self) -> str | None:
        """A hash of the vocabulary the model was trained with (None: none of detr's own), stored with
        the weights so that a run with another run's tokenizer is caught at load."""

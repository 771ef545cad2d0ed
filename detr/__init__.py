"""detr: Decoding in Transformers — an encoder-decoder Transformer toolkit built from its principles.

    import detr
    config = detr.load_config("configs/tiny.yaml", ["train.max_steps=200"])
    detr.train(config)                                   # → runs/tiny
    detr.load("runs/tiny").translate(["we have one red dog."])  # → ["wir haben einen roten Hund."]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detr import openmp  # noqa: F401  (first: CTranslate2 before torch)
from detr.checkpoint import Run, load_run
from detr.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig, load_config
from detr.constraints import Constraints
from detr.errors import CheckpointError, ConfigError, DataError, DetrError, TrainingError
from detr.labeller import Classifier, Tagger
from detr.layers import AttentionRecord
from detr.model import KVCache, Seq2Seq, build_model
from detr.trainer import TrainResult, train
from detr.translator import Translator

__version__ = "0.1.0"


def load(run_dir: str | Path, device: str = "cpu", weights: str | Path | None = None) -> Any:
    """The predictor of any run directory written by `detr train`: a `Translator` (task translate),
    a `Classifier` (classify) or a `Tagger` (tag), with its weights in eval mode and, on the CPU,
    its Linear layers packed for inference (`detr.quantize.PackedLinear`).

    Args:
        run_dir: the run directory.
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        weights: a safetensors file to use instead of `run_dir/model.safetensors` (an averaged or
            intermediate checkpoint), for every kind of run.

    Raises:
        CheckpointError: a missing or corrupt run directory (one line naming the file).
    """
    return load_run(run_dir, device, weights).predictor()


def load_ensemble(run_dirs: list[str | Path], device: str = "cpu") -> Translator:
    """One `Translator` over several translation runs that share a tokenizer: their
    log-probabilities are averaged at every step (see `Translator.ensemble`).

    Raises:
        CheckpointError: a missing or corrupt run; ConfigError: a run that is not a translation run,
            or whose vocabulary differs from the first's.
    """
    members = [load(run, device) for run in run_dirs]
    for run, member in zip(run_dirs, members):
        if not isinstance(member, Translator):
            raise ConfigError(f"{run}: not a translation run; an ensemble is made of translation runs")
    return Translator.ensemble(members, [str(run) for run in run_dirs])


__all__ = [
    "AttentionRecord", "CheckpointError", "Classifier", "Config", "ConfigError", "Constraints", "DataConfig",
    "DataError",
    "DecodeConfig", "DetrError", "KVCache", "ModelConfig", "Run", "Seq2Seq", "Tagger", "TrainConfig", "TrainResult",
    "TrainingError", "Translator", "build_model", "load", "load_config", "load_ensemble", "load_run", "train",
    "__version__",
]

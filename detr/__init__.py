"""detr: Decoding in Transformers — an encoder-decoder Transformer toolkit built from its principles.

    import detr
    config = detr.load_config("configs/tiny.yaml", ["train.max_steps=200"])
    detr.train(config)                                   # → runs/tiny
    detr.load("runs/tiny").translate(["we have one red dog."])  # → ["wir haben einen roten Hund."]
"""

from detr.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig, load_config
from detr.errors import CheckpointError, ConfigError, DataError, DetrError, TrainingError
from detr.layers import AttentionRecord
from detr.model import KVCache, Seq2Seq, build_model

__version__ = "0.1.0"


def train(config: Config, resume: bool = False, progress: bool = False):
    """Train as `config` describes; returns a `detr.trainer.TrainResult`. See `detr.trainer.Trainer`."""
    from detr.trainer import train as _train  # imported on use: `import detr` stays light

    return _train(config, resume, progress)


def load(run_dir, device: str = "cpu", weights=None):
    """What a run directory written by `detr train` predicts with: a `detr.translator.Translator`
    (task translate) or a `detr.labeller.Labeller` (classify, tag)."""
    from pathlib import Path

    from detr.tasks import LABELS

    if (Path(run_dir) / LABELS).is_file():
        from detr.labeller import load_labeller

        return load_labeller(run_dir, device)
    from detr.translator import load as _load

    return _load(run_dir, device, weights)


__all__ = [
    "AttentionRecord", "CheckpointError", "Config", "ConfigError", "DataConfig", "DataError", "DecodeConfig",
    "DetrError", "KVCache", "ModelConfig", "Seq2Seq", "TrainConfig", "TrainingError", "build_model", "load",
    "load_config", "train", "__version__",
]

"""detr: Decoding in Transformers — an encoder-decoder Transformer toolkit built from its principles."""

from detr.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig, load_config
from detr.errors import CheckpointError, ConfigError, DataError, DetrError, TrainingError
from detr.layers import AttentionRecord
from detr.model import KVCache, Seq2Seq, build_model

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord", "CheckpointError", "Config", "ConfigError", "DataConfig", "DataError", "DecodeConfig",
    "DetrError", "KVCache", "ModelConfig", "Seq2Seq", "TrainConfig", "TrainingError", "build_model",
    "load_config", "__version__",
]

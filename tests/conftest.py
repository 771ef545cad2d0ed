"""Shared fixtures: tiny models, paths to ../shared/data (tests needing it skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Determinism and speed on small CI machines.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data(relative: str) -> Path:
    """Path inside ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def tiny_config():
    from detr import ModelConfig

    return ModelConfig.preset("tiny", src_vocab_size=50, tgt_vocab_size=60)

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


def train_toy(root: Path, steps: int = 250, test: int = 200, **settings: object) -> Path:
    """Train `configs/tiny.yaml` (with `settings`, dotted keys) for `steps` on a toy corpus written to
    root/data; the run is root/run. Returns `root`."""
    from detr import load_config, train
    from detr.toy import make_toy_corpus

    make_toy_corpus(root / "data", train=3000, valid=50, test=test, seed=7)
    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(root / "run"), "data.train": str(root / "data" / "train"),
        "data.valid": str(root / "data" / "valid"), "data.test": str(root / "data" / "test"),
        "train.max_steps": steps, "train.eval_every": steps, "train.save_every": steps, "train.threads": 1,
        **settings})
    train(config)
    return root


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """A tiny English→German model trained for a few seconds on the toy corpus (shared by tests)."""
    return train_toy(tmp_path_factory.mktemp("toy_run"))

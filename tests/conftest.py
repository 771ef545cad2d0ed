"""Shared fixtures: tiny models, paths to ../shared/data (tests needing it skip when absent)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Determinism and speed on small CI machines. The suite runs in two worker processes on two cores,
# so every `detr` process a test starts (CLI, server, torchrun rank) gets one thread as well: two
# threads beside another busy process wait on each other and run several times slower.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def detr_cli(*args: str, stdin: str | bytes | None = None, text: bool = True,
             **kwargs: object) -> subprocess.CompletedProcess:
    """Run `python -m detr ARGS` from the repository root, capturing its output (str, or bytes with
    text=False; a str stdin is encoded as UTF-8 then)."""
    if not text and isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    return subprocess.run([sys.executable, "-m", "detr", *args], input=stdin, capture_output=True, text=text,
                          cwd=ROOT, **kwargs)


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
    """A tiny English→German model trained for a few seconds on the toy corpus, once per test session:
    the xdist workers share it through a lock in their session's common temporary folder. Tests read
    it; one that changes a run copies it first."""
    base = tmp_path_factory.getbasetemp()  # an xdist worker's is one folder below the session's
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy_run"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            train_toy(root)
            (root / ".done").touch()
    return root

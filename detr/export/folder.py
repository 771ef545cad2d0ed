"""What every export folder shares: written beside its destination and renamed into place (a failure
leaves no half-written folder), a marker file saying what it was made from (its absence: a partial
export), the check that decides whether a cached conversion inside a run is still current, and the
probe batch an export is compared with detr on before it is kept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from detr.config import ModelConfig
from detr.errors import CheckpointError, ConfigError
from detr.rundir import RunDir
from detr.tokenizer import BOS, EOS, PAD, SPECIALS

MARKER = "detr-export.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(run_dir: str | Path, weights: str | Path | None) -> Path:
    """The weights an export is made from: `weights`, else the run's `model.safetensors`."""
    return Path(weights) if weights is not None else RunDir(run_dir).model


def check_destination(out: Path) -> None:
    """Refuse an `out` that exists and is not an earlier export (it would be replaced)."""
    if out.exists() and not (out / MARKER).is_file():
        raise ConfigError(f"{out}: exists and is not a detr export; choose a new --out")


def write_folder(out: Path, fill: Callable[[Path], dict]) -> Path:
    """Make the export folder `out`: `fill(staging)` writes the files into an empty folder beside `out`
    and returns the marker's contents; then the marker is written and the folder renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        marker = fill(staging)
        (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_marker(folder: Path, files: tuple[str, ...], kind: str, fmt: str) -> dict:
    """The marker of a `kind` export in `folder`, after checking that `files` are all there.

    Raises:
        CheckpointError: a partial or corrupt export (one line naming what is missing).
    """
    missing = [name for name in (MARKER, *files) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a complete {kind} export (missing {', '.join(missing)}); export it again")
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / MARKER}: unreadable ({err}); export it again") from None
    if not isinstance(marker, dict) or marker.get("format") != fmt:
        raise CheckpointError(f"{folder / MARKER}: not a detr {kind} export marker; export it again")
    return marker


def is_current(folder: Path, weights: Path, read: Callable[[Path], dict]) -> bool:
    """Whether the conversion in `folder` is complete (`read` accepts it) and made from `weights`."""
    try:
        return read(folder)["weights_sha256"] == file_digest(weights)
    except CheckpointError:
        return False


def probe(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed source batch (3, 9) with one row padded, and a target prefix (3, 6), to compare a
    conversion's output with detr's on."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(len(SPECIALS), config.src_vocab_size, (3, 9), generator=generator)
    src[:, -1] = EOS
    src[1, 5:] = PAD
    src[1, 4] = EOS
    tgt = torch.randint(len(SPECIALS), config.tgt_vocab_size, (3, 6), generator=generator)
    tgt[:, 0] = BOS
    return src, tgt

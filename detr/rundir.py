"""The run directory: the one place its file names are defined, and its writer's lock.

    runs/NAME/
      config.yaml          the effective, validated configuration (vocabulary sizes from the tokenizer)
      tokenizer.json       the tokenizer used in training (translate; classify/tag on detr's own encoder)
      labels.json          classify/tag: the label set
      pretrained/          a pretrained encoder's config.json (and, for classify/tag, its tokenizer files)
      model.safetensors    weights to predict with: the best on validation, else the last
      trainer_state.pt     optimizer, RNG states, data position, step, best metric
      checkpoints/         step_XXXXXXXX.safetensors, the last `train.keep_last` saves
      metrics.jsonl        one JSON object per log or validation step
      events.*             TensorBoard logs
      engines/NAME/        conversions for other inference engines (`detr translate --engine`), made on demand
      .detr-world          while ranks start under torchrun: rank 0's token, read by the others to check
                           that they see the same directory

The one training process writing a run holds an OS lock (flock) on the directory itself.

Everything else in detr reaches these files through a `RunDir`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from detr.errors import ConfigError

_STEP_FILE = re.compile(r"step_(\d+)\.safetensors$")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path  # a str is accepted and made a Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def trainer_state(self) -> Path:
        return self.root / "trainer_state.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def world_marker(self) -> Path:
        return self.root / ".detr-world"

    def engine_cache(self, name: str) -> Path:
        """A conversion of the run's weights for another engine (`detr translate --engine`), e.g.
        "ctranslate2-int8"."""
        return self.root / "engines" / name

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.safetensors"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the saved checkpoints, oldest first."""
        found = []
        for p in self.checkpoints.glob("step_*.safetensors") if self.checkpoints.is_dir() else []:
            m = _STEP_FILE.search(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def holds_run(self) -> bool:
        """Whether training has written weights or state here."""
        return self.trainer_state.is_file() or self.model.is_file() or bool(self.list_checkpoints())

    def lock(self) -> WriterLock:
        """Take the run's writer lock (see `WriterLock`)."""
        return WriterLock(self.root)


class WriterLock:
    """An exclusive OS lock (flock) on the run directory itself, for the life of one training process.

    The lock is taken on the directory's own descriptor, so it writes nothing (a run that fails
    its checks leaves its directory as it was). The OS releases it when the process ends,
    however it ends (a kill included), so no stale lock is ever cleaned up by hand. A second
    writer is told the holder's pid, read from /proc/locks. Readers (translate, evaluate) never
    take it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        """Raises ConfigError naming the holder's pid when another process writes this run."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            inode = os.fstat(fd).st_ino
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"run_dir: {self.folder} is being written by another detr process "
                                  f"(pid {holder_of(inode)}); wait for it to finish or choose another "
                                  f"--run_dir") from None
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(inode: int) -> str:
    """The pid holding a flock on the file with this inode, from /proc/locks ("unknown" elsewhere)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return fields[4]
    return "unknown"

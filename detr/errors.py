"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

import re


class DetrError(Exception):
    """Base class of every error detr raises for bad input, config or files."""

    exit_code = 2
    quiet = False  # True: already said by another process (rank 0 of a torchrun job); exit without a line


class ConfigError(DetrError):
    """An invalid configuration key, type or value."""


class DataError(DetrError):
    """A data file that cannot be read as configured (names file and line)."""


class CheckpointError(DetrError):
    """A missing, corrupt or incompatible run directory or checkpoint."""


class TrainingError(DetrError):
    """Training cannot go on (for example, the loss stayed non-finite)."""


def first_line(err: BaseException) -> str:
    """The gist of an error: its first sentence (without the source-file prefix gloo puts first)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    text = text.splitlines()[0].split(". ")[0] if text else ""
    return text or type(err).__name__

"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


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

"""Saving and loading what training writes: weights, trainer state, averaged checkpoints, and
the one loader of a trained run (`load_run`), whatever its task.

File names live in `detr.rundir`. Every file is written atomically, so a run killed at any
moment leaves a consistent directory. Weights are safetensors (loading runs no code) and
carry the fingerprint of the tokenizer they were trained with; the trainer state is loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from detr.atomic import atomic_path
from detr.config import Config, load_config
from detr.errors import CheckpointError, ConfigError
from detr.pretrained import encoder_for
from detr.quantize import quantize
from detr.rundir import RunDir
from detr.tasks import Task, make_task

log = logging.getLogger(__name__)

TOKENIZER_KEY = "detr.tokenizer"  # safetensors metadata: fingerprint of the tokenizer the weights were trained with


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's saved checkpoints, oldest first."""
    return RunDir(run_dir).list_checkpoints()


def save_weights(model: torch.nn.Module, path: str | Path, fingerprint: str | None = None) -> None:
    """Write the model's weights atomically; a tensor shared by several names is stored once,
    under the first name in sorted order.

    The file's bytes depend only on the weights (safetensors' own `save_model` lists shared
    names in a per-process random order, which would defeat comparing files bitwise).
    """
    by_storage: dict[tuple, list[str]] = {}
    state = model.state_dict()
    for name, t in state.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    tensors = {min(names): state[min(names)].detach().contiguous() for names in by_storage.values()}
    with atomic_path(path) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp), metadata=weights_metadata(fingerprint))


def weights_metadata(fingerprint: str | None) -> dict[str, str]:
    """The one metadata entry of a weights file: the tokenizer fingerprint, else the usual format tag.

    One entry only: safetensors writes several in a per-process random order, and a run's files
    must be the same bytes whenever they hold the same weights (exact resume is checked bitwise).
    """
    return {TOKENIZER_KEY: fingerprint} if fingerprint else {"format": "pt"}


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by `save_weights` into `model` (same architecture).

    Raises:
        CheckpointError: missing, truncated or corrupt file, or weights of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=_device_of(model))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    except RuntimeError as err:  # shape mismatch
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not fit the model in config.yaml: {first}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model in config.yaml "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values; these weights cannot predict")


def weights_fingerprint(path: str | Path) -> str | None:
    """The tokenizer fingerprint stored with weights (None in weights saved before fingerprints)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(TOKENIZER_KEY)
    except (SafetensorError, OSError):
        return None


def _device_of(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).device)


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read `trainer_state.pt` without executing code (`weights_only=True`).

    Raises:
        CheckpointError: missing, unreadable, or holding anything but plain tensors and values.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: trainer state not found") from None
    except Exception as err:  # torch raises many types for a damaged or tampered pickle
        # Its message advises weights_only=False, which would execute whatever the file holds: never say that.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "tampered or corrupt (it holds more than tensors and plain values)" \
            if "weights_only" in str(err) or "Unsupported" in first else f"unreadable ({first})"
        raise CheckpointError(f"{path}: the trainer state is {kind}; it is not loaded") from None


@dataclass
class Run:
    """A trained run, read once from its directory: the effective config, the task (with its
    tokenizer and labels) and the model with its weights, in eval mode."""

    config: Config
    task: Task
    model: nn.Module
    run_dir: Path

    def predictor(self) -> Any:
        """What predicts with this run: a `Translator`, `Classifier` or `Tagger`. On the CPU the
        model's Linear layers are packed for inference first (`detr.quantize.PackedLinear`)."""
        quantize(self.model, "float32")
        return self.task.predictor(self.model, self.config)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", weights: str | Path | None = None) -> Run:
    """Load any run written by `detr train` — translate, classify, tag, warm-started — for prediction.

    The task is the one `config.yaml` names (`task:`); its tokenizer and labels come from the
    run directory, the model's architecture from the config (and `pretrained/` for a pretrained
    encoder), the weights from `model.safetensors` or `weights`.

    Args:
        run_dir: a directory written by `detr train`.
        device: where to put the model.
        weights: a safetensors file to load instead of `run_dir/model.safetensors`
            (an averaged or intermediate checkpoint).

    Raises:
        CheckpointError: a missing or corrupt file, files that do not belong together (a tokenizer
            of another run, weights of another shape), or non-finite weights; one line naming the file.
    """
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise CheckpointError(f"{run.root}: run directory not found")
    if not run.config.is_file():
        raise CheckpointError(f"{run.config}: not found (is {run.root} a detr run directory?)")
    try:
        config = load_config(run.config)
    except ConfigError as err:
        raise CheckpointError(f"invalid run config: {err}") from None
    task = make_task(config)
    task.load(run)
    weights_path = Path(weights) if weights is not None else run.model
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: weights file not found")
    stored, have = weights_fingerprint(weights_path), task.fingerprint()
    if stored is not None and have is not None and stored != have:
        raise CheckpointError(f"{run.tokenizer}: this tokenizer is not the one {weights_path.name} was trained with "
                              f"(fingerprint {have}, the weights expect {stored}); was it copied from another run?")
    try:
        config.model.require_vocab()
    except ConfigError as err:
        raise CheckpointError(f"{run.config}: {err}") from None
    model = task.build_model(config.model, encoder_for(config.model, run.pretrained)).to(device)
    load_weights(model, weights_path)
    model.eval()
    return Run(config, task, model, run.root)


def average_checkpoints(run_dir: str | Path, last: int, out: str | Path | None = None) -> tuple[Path, list[int]]:
    """Average the weights of the last `last` checkpoints of a run (Vaswani et al. average the last 5).

    Returns:
        The file written (default `run_dir/average_last{K}.safetensors`) and the steps averaged.

    Raises:
        CheckpointError: fewer checkpoints than asked, or checkpoints that do not match.
    """
    if last <= 0:
        raise CheckpointError(f"--last must be positive, got {last}")
    found = RunDir(run_dir).list_checkpoints()
    if len(found) < last:
        raise CheckpointError(f"{run_dir}: asked to average {last} checkpoints, found {len(found)} "
                              f"in {RunDir(run_dir).checkpoints}")
    chosen = found[-last:]
    total: dict[str, torch.Tensor] = {}
    for _, path in chosen:
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
        if total and weights.keys() != total.keys():
            raise CheckpointError(f"{path}: holds other tensors than {chosen[0][1]}")
        for name, t in weights.items():
            if name in total and total[name].shape != t.shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(total[name].shape)}")
            total[name] = total[name] + t.double() if name in total else t.double()
    averaged = {name: (t / last).to(weights[name].dtype).contiguous() for name, t in total.items()}
    out = Path(out) if out is not None else Path(run_dir) / f"average_last{last}.safetensors"
    try:
        with atomic_path(out) as tmp:
            save_file(averaged, str(tmp), metadata=weights_metadata(weights_fingerprint(chosen[-1][1])))
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write the averaged weights: {err.strerror or err}") from None
    return out, [s for s, _ in chosen]

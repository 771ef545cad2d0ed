"""The run directory: what training writes and what decoding needs.

    runs/NAME/
      config.yaml          the effective, validated configuration
      tokenizer.json       the tokenizer used in training
      model.safetensors    weights to decode with: the best on validation, else the last
      trainer_state.pt     optimizer, RNG states, data position, step, best metric
      checkpoints/         step_XXXXXXXX.safetensors, the last `train.keep_last` saves
      metrics.jsonl        one JSON object per log or validation step
      events.*             TensorBoard logs

Every file is written atomically, so a run killed at any moment leaves a consistent
directory. Weights are safetensors (loading runs no code); the trainer state is loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from detr.atomic import atomic_path
from detr.config import Config, load_config
from detr.errors import CheckpointError, ConfigError
from detr.model import Seq2Seq, build_model
from detr.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
PRETRAINED = "pretrained"  # a pretrained encoder's config.json (and tokenizer files), when the run has one
MODEL = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
_STEP_FILE = re.compile(r"step_(\d+)\.safetensors$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the saved checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    for p in folder.glob("step_*.safetensors") if folder.is_dir() else []:
        m = _STEP_FILE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
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
        save_file(dict(sorted(tensors.items())), str(tmp), metadata={"format": "pt"})


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


def _device_of(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).device)


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read `trainer_state.pt` without executing code (`weights_only=True`).

    Raises:
        CheckpointError: missing or unreadable.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: trainer state not found") from None
    except Exception as err:  # torch raises many types for a damaged pickle
        raise CheckpointError(f"{path}: cannot read the trainer state: {err}") from None


@dataclass
class Run:
    """What a run directory holds, ready to decode with."""

    config: Config
    tokenizer: Tokenizer
    model: Seq2Seq
    run_dir: Path


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", weights: str | Path | None = None) -> Run:
    """Load config, tokenizer and model from a run directory, in eval mode.

    Args:
        run_dir: a directory written by `detr train`.
        device: where to put the model.
        weights: a safetensors file to load instead of `run_dir/model.safetensors`
            (an averaged or intermediate checkpoint).

    Raises:
        CheckpointError: a missing or corrupt file, or files that do not belong together.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    for name in (CONFIG, TOKENIZER):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name}: not found (is {run_dir} a detr run directory?)")
    try:
        config = load_config(run_dir / CONFIG)
    except ConfigError as err:
        raise CheckpointError(f"invalid run config: {err}") from None
    tokenizer = Tokenizer.load(run_dir / TOKENIZER)
    if (tokenizer.src.vocab_size, tokenizer.tgt.vocab_size) != (config.model.src_vocab_size,
                                                                 config.model.tgt_vocab_size):
        raise CheckpointError(
            f"{run_dir}: tokenizer vocabularies ({tokenizer.src.vocab_size}, {tokenizer.tgt.vocab_size}) do not "
            f"match the model's ({config.model.src_vocab_size}, {config.model.tgt_vocab_size}) in {CONFIG}")
    encoder = None
    if config.model.pretrained is not None:  # its architecture is in the run; its weights are in the safetensors
        from detr.heads import load_pretrained_encoder

        encoder = load_pretrained_encoder(run_dir / PRETRAINED, weights=False)
    model = build_model(config.model, encoder).to(device)
    load_weights(model, weights if weights is not None else run_dir / MODEL)
    model.eval()
    return Run(config, tokenizer, model, run_dir)


def average_checkpoints(run_dir: str | Path, last: int, out: str | Path | None = None) -> tuple[Path, list[int]]:
    """Average the weights of the last `last` checkpoints of a run (Vaswani et al. average the last 5).

    Returns:
        The file written (default `run_dir/average_last{K}.safetensors`) and the steps averaged.

    Raises:
        CheckpointError: fewer checkpoints than asked, or checkpoints that do not match.
    """
    if last <= 0:
        raise CheckpointError(f"--last must be positive, got {last}")
    found = list_checkpoints(run_dir)
    if len(found) < last:
        raise CheckpointError(f"{run_dir}: asked to average {last} checkpoints, found {len(found)} "
                              f"in {Path(run_dir) / CHECKPOINTS}")
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
    with atomic_path(out) as tmp:
        save_file(averaged, str(tmp))
    return out, [s for s, _ in chosen]

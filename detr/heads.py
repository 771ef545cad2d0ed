"""Heads on an encoder: a pooled sentence classifier and a per-token tagger.

    ids ─ encoder ─▶ (B, S, D) ─┬─ mean over tokens | first token ─ dropout ─ linear ─▶ (B, C)   SequenceClassifier
                                └─ dropout ─ linear ─────────────────────────────────▶ (B, S, C) TokenTagger

The encoder is detr's own (`OwnEncoder`, trained from scratch) or a pretrained BERT-style
encoder (`detr.pretrained.PretrainedEncoder`), loaded from a local folder, never from the network.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.layers import AttentionRecord, Dropout
from detr.model import Encoder, initialize, padding_mask
from detr.tokenizer import PAD


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

    def embedding_and_layers(self) -> tuple[nn.Module, nn.ModuleList]:
        return self.encoder.embedding_and_layers()


class SequenceClassifier(nn.Module):
    """Sentence → label scores: pool the encoder states, dropout, one linear layer."""

    def __init__(self, encoder: nn.Module, n_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.dropout = Dropout(dropout)
        self.out = init_output(nn.Linear(encoder.d_model, n_labels))

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
        self.dropout = Dropout(dropout)
        self.out = init_output(nn.Linear(encoder.d_model, n_labels))

    def forward(self, ids: Tensor, attention: AttentionRecord | None = None) -> Tensor:
        """ids: (B, S) → logits (B, S, C)."""
        return self.out(self.dropout(self.encoder(ids, attention=attention)))


def init_output(layer: nn.Linear) -> nn.Linear:
    """A new head starts near zero: small random weights, no bias, so early training follows the encoder."""
    with torch.no_grad():
        nn.init.normal_(layer.weight, std=0.02)
        layer.bias.zero_()
    return layer


def head_encoder(config: ModelConfig, encoder: nn.Module | None) -> nn.Module:
    """`encoder` if given (a pretrained one), else a fresh detr encoder of `config`."""
    return encoder if encoder is not None else OwnEncoder(config)

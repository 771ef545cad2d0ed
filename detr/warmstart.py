"""A decoder warm-started from a pretrained BERT-style encoder (BERT2BERT: Rothe, Narayan & Severyn
2020, "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks").

A BERT layer is a post-norm Transformer layer: self-attention → add & norm → feed-forward → add &
norm. detr's post-norm `DecoderLayer` is that layer with cross-attention (and its add & norm) in
between, so layer i of the decoder takes layer i's self-attention (made causal by the decoder's
mask), feed-forward and both norms; cross-attention is new, initialised N(0, initializer_range) as
BERT's own weights were, its norm at gain 1. The embedding is BERT's: word + position + segment 0
under its LayerNorm (`PretrainedEmbedding`); the output projection is tied to the word embeddings.

`model.share_pretrained` (shared BERT2BERT) makes the warm-started parts the encoder's own modules:
one set of weights, trained from both sides. Otherwise the decoder starts from a copy.

The modules that came from the checkpoint are flagged `warm_started`
(`detr.pretrained.pretrained_parameters`), so the trainer gives them `train.pretrained_lr_scale`
as it does the pretrained encoder.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.errors import ConfigError
from detr.layers import Dropout, position_rows


def check_decoder_fits(config: ModelConfig, pretrained: dict[str, Any], where: str) -> None:
    """The decoder of `config` can be built from the pretrained encoder whose config.json is `pretrained`.

    Raises:
        ConfigError: one line naming the first field that differs and the value it needs.
    """
    needs = {
        "d_model": pretrained.get("hidden_size"),
        "n_heads": pretrained.get("num_attention_heads"),
        "d_ff": pretrained.get("intermediate_size"),
        "activation": pretrained.get("hidden_act"),
        "layer_norm_eps": pretrained.get("layer_norm_eps"),
        "norm": "post",
        "positional": "learned",
        "tie_output": True,
    }
    for name, value in needs.items():
        if getattr(config, name) != value:
            raise ConfigError(f"model.{name}={getattr(config, name)!r}, but a decoder warm-started from {where} needs "
                              f"{value!r}: set model.{name}: {value}")
    if config.decoder_layers > pretrained.get("num_hidden_layers", 0):
        raise ConfigError(f"model.n_decoder_layers={config.decoder_layers}, but {where} has "
                          f"{pretrained.get('num_hidden_layers')} layers to start the decoder from")
    if config.max_positions > pretrained.get("max_position_embeddings", 0):
        raise ConfigError(f"model.max_positions={config.max_positions}, but {where} has "
                          f"{pretrained.get('max_position_embeddings')} positions: lower model.max_positions")


class PretrainedEmbedding(nn.Module):
    """BERT's input embedding for the decoder: LayerNorm(word + position + segment 0), then dropout.

    Target position t is position t of the pretrained table; the target is one segment (0).
    """

    def __init__(self, bert_embeddings: nn.Module, dropout: float) -> None:
        super().__init__()
        self.tokens = bert_embeddings.word_embeddings
        self.positions = bert_embeddings.position_embeddings
        self.segments = bert_embeddings.token_type_embeddings
        self.norm = bert_embeddings.LayerNorm
        self.dropout = Dropout(dropout)

    def forward(self, ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        """ids: (B, T), positions offset .. offset+T-1 (one int, or one per row). Returns (B, T, D)."""
        x = self.tokens(ids) + position_rows(self.positions.weight, offset, ids.size(1)) + self.segments.weight[0]
        return self.dropout(self.norm(x))


def warm_start_decoder(decoder: nn.Module, encoder: nn.Module, config: ModelConfig) -> None:
    """Give `decoder` (detr's post-norm `Decoder`) the embedding and layers of the pretrained `encoder`
    (`PretrainedEncoder`), in place: shared with the encoder under `model.share_pretrained`, else copied.

    Raises:
        ConfigError: `config` does not describe the pretrained layers (`check_decoder_fits`).
    """
    hf = encoder.hf
    check_decoder_fits(config, hf.config.to_dict(), config.pretrained_decoder)
    source = hf if config.share_pretrained else copy.deepcopy(hf)
    decoder.embed = PretrainedEmbedding(source.embeddings, config.dropout)
    if config.share_embeddings:
        decoder.embed.tokens = hf.embeddings.word_embeddings
    decoder.embed.warm_started = True
    for layer, bert in zip(decoder.layers, source.encoder.layer):
        attention = layer.self_attn
        attention.q_proj, attention.k_proj, attention.v_proj = \
            bert.attention.self.query, bert.attention.self.key, bert.attention.self.value
        attention.k_proj.bias.requires_grad_(False)  # softmax ignores it (see MultiHeadAttention)
        attention.out_proj = bert.attention.output.dense
        layer.self_block.norm = bert.attention.output.LayerNorm
        layer.ff.w1, layer.ff.w2 = bert.intermediate.dense, bert.output.dense
        layer.ff_block.norm = bert.output.LayerNorm
        for module in (attention, layer.ff, layer.self_block.norm, layer.ff_block.norm):
            module.warm_started = True
        with torch.no_grad():
            for name, p in layer.cross_attn.named_parameters():
                if name.endswith("weight"):
                    p.normal_(0.0, hf.config.initializer_range)
                else:
                    p.zero_()

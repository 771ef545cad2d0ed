"""A model's size and a forward pass on random ids: a quick check that a config builds and runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from detr.config import PRESETS, Config, ModelConfig, load_config, parse_overrides, section_from_dict
from detr.errors import ConfigError
from detr.model import build_model
from detr.tokenizer import BOS


def model_config_of(config_or_preset: str, overrides: list[str]) -> ModelConfig:
    """The ModelConfig of a preset name or of a YAML config file, with dotted overrides."""
    if config_or_preset in PRESETS and not Path(config_or_preset).exists():
        raw = {"model": {}}
        for key, value in parse_overrides(overrides).items():
            section, _, name = key.partition(".")
            if section != "model":
                raise ConfigError(f"override '{key}': only model.* keys apply to a preset")
            raw["model"][name] = value
        return section_from_dict(ModelConfig, raw["model"], "model", f"preset {config_or_preset}",
                                 ModelConfig.preset(config_or_preset))
    config: Config = load_config(config_or_preset, overrides)
    return config.model


def describe_model(config_or_preset: str, overrides: list[str] | None = None, seed: int = 0) -> list[str]:
    """Build the model, count its parameters, run one teacher-forced forward pass.

    Returns:
        Lines of text for the user: sizes, parameter count, and the logits' shape and loss.
    """
    config = model_config_of(config_or_preset, overrides or [])
    torch.manual_seed(seed)
    encoder, described = None, f"layers={config.n_layers}+{config.decoder_layers}"
    if config.pretrained is not None:  # the architecture only: no weights are read
        from detr.heads import check_width, load_pretrained_encoder, resolve_pretrained

        folder = resolve_pretrained(config.pretrained)
        check_width(folder, config)
        encoder = load_pretrained_encoder(folder, weights=False)
        hf = encoder.hf.config
        config = dataclasses.replace(config, src_vocab_size=hf.vocab_size)
        described = f"encoder {config.pretrained} ({hf.num_hidden_layers} layers) + {config.decoder_layers} layers"
    model = build_model(config, encoder).eval()
    B, S, T = 2, 7, 5
    src = torch.randint(4, config.src_vocab_size, (B, S))
    tgt = torch.randint(4, config.tgt_vocab_size, (B, T))
    tgt[:, 0] = BOS
    with torch.no_grad():
        logits = model(src, tgt)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt[:, 1:].flatten())
    tying = "shared (src = tgt = output)" if config.share_embeddings else (
        "tied (tgt = output)" if config.tie_output else "untied")
    return [
        f"model: d_model={config.d_model} n_heads={config.n_heads} d_ff={config.d_ff} "
        f"{described} norm={config.norm} activation={config.activation}",
        f"vocabulary: src={config.src_vocab_size} tgt={config.tgt_vocab_size}, embeddings {tying}",
        f"parameters: {model.num_parameters():,}",
        f"forward pass: src {tuple(src.shape)} + tgt {tuple(tgt.shape)} -> logits {tuple(logits.shape)}, "
        f"cross-entropy {loss.item():.3f} (uniform would be {math.log(config.tgt_vocab_size):.3f})",
    ]

"""A model's size and a forward pass on random ids: a quick check that a config builds and runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from detr.config import PRESETS, Config, ModelConfig, load_config, parse_overrides, section_from_dict
from detr.errors import ConfigError
from detr.model import Seq2Seq
from detr.pretrained import check_width, load_pretrained_encoder, resolve_pretrained
from detr.tasks import make_task
from detr.tasks.labelled import LabelTask
from detr.tokenizer import BOS


def config_of(config_or_preset: str, overrides: list[str]) -> Config:
    """The Config of a YAML file, or a translate Config around a preset's ModelConfig, with dotted overrides."""
    if config_or_preset in PRESETS and not Path(config_or_preset).exists():
        raw = {}
        for key, value in parse_overrides(overrides).items():
            section, _, name = key.partition(".")
            if section != "model":
                raise ConfigError(f"override '{key}': only model.* keys apply to a preset")
            raw[name] = value
        return Config(model=section_from_dict(ModelConfig, raw, "model", f"preset {config_or_preset}",
                                              ModelConfig.preset(config_or_preset)))
    return load_config(config_or_preset, overrides)


def label_count(task: LabelTask) -> tuple[int, str]:
    """How many labels a classify/tag config's head has: read from data.train when it is there."""
    train = task.config.data.train
    if train is None or not Path(train).is_file():
        task.labels = ["0", "1"]
        return 2, f"labels: 2 assumed for this check (data.train {train} not found)"
    labels = task.labels = task.read_labels()
    shown = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
    return len(labels), f"labels: {len(labels)} from {train} ({shown})"


def describe_model(config_or_preset: str, overrides: list[str] | None = None, seed: int = 0) -> list[str]:
    """Build the model, count its parameters, run one forward pass on random ids.

    A translate config gets its Seq2Seq and a teacher-forced pass; a classify or tag config gets
    its encoder with the task's head (labels counted from the training data when it is there).

    Returns:
        Lines of text for the user: sizes, parameter count, and the logits' shape and loss.
    """
    full = config_of(config_or_preset, overrides or [])
    task = make_task(full)
    config = full.model
    if config.src_vocab_size is None or config.tgt_vocab_size is None:  # set by the tokenizer when training
        config = config.with_vocab(config.src_vocab_size or full.data.vocab_size,
                                   config.tgt_vocab_size or full.data.vocab_size)
    torch.manual_seed(seed)
    encoder = None
    labelled = isinstance(task, LabelTask)
    described = f"layers={config.n_layers}" + (" (encoder)" if labelled else f"+{config.decoder_layers}")
    if config.pretrained is not None:  # the architecture only: no weights are read
        folder = resolve_pretrained(config.pretrained)
        encoder = load_pretrained_encoder(folder, weights=False)
        hf = encoder.hf.config
        config = dataclasses.replace(config, src_vocab_size=hf.vocab_size)
        described = f"encoder {config.pretrained} ({hf.num_hidden_layers} layers, width {hf.hidden_size})"
        if not labelled:
            check_width(folder, config)
            described += f" + {config.decoder_layers} layers"
        if config.pretrained_decoder is not None:  # one WordPiece vocabulary on both sides
            config = dataclasses.replace(config, tgt_vocab_size=hf.vocab_size)
            described += " warm-started from it" + (" (shared)" if config.share_pretrained else "")
    B, S, T = 2, 7, 5
    src = torch.randint(4, config.src_vocab_size, (B, S))
    if labelled:
        classes, labels = label_count(task)
    model = task.build_model(config, encoder).eval()
    if isinstance(model, Seq2Seq):
        tgt = torch.randint(4, config.tgt_vocab_size, (B, T))
        tgt[:, 0] = BOS
        with torch.no_grad():
            logits = model(src, tgt)
        shape = tuple(logits.shape)
        gold, logits, classes = tgt[:, 1:], logits[:, :-1], config.tgt_vocab_size
        tying = "shared (src = tgt = output)" if config.share_embeddings else (
            "tied (tgt = output)" if config.tie_output else "untied")
        head = f"vocabulary: src={config.src_vocab_size} tgt={config.tgt_vocab_size}, embeddings {tying}"
        shapes = f"src {tuple(src.shape)} + tgt {tuple(tgt.shape)}"
    else:
        with torch.no_grad():
            logits = model(src)
        shape = tuple(logits.shape)
        gold = torch.randint(0, classes, logits.shape[:-1])
        pooling = f", pooling {config.pooling}" if logits.dim() == 2 else ""
        head = f"head: {full.task}{pooling}; vocabulary: src={config.src_vocab_size}; {labels}"
        shapes = f"ids {tuple(src.shape)}"
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), gold.flatten())
    if config.pretrained is not None and labelled:
        sizes = f"model: {described}"  # the encoder's own architecture; no model.* size key applies
    else:
        sizes = (f"model: d_model={config.d_model} n_heads={config.n_heads} d_ff={config.d_ff} "
                 f"{described} norm={config.norm} activation={config.activation}")
    return [
        sizes,
        head,
        f"parameters: {sum(p.numel() for p in model.parameters()):,}",
        f"forward pass: {shapes} -> logits {shape}, "
        f"cross-entropy {loss.item():.3f} (uniform would be {math.log(classes):.3f})",
    ]

"""Freezing the bottom of an encoder while fine-tuning (`train.freeze_encoder_layers`).

A pretrained encoder's lower layers hold general features; a short fine-tuning budget is better
spent on the layers above them. Freezing the embedding and the first n layers saves more than their
parameter updates: no gradient flows below layer n, so their backward pass is never run. With 4 of
MiniLM's 6 layers frozen a DialogSum BERT2BERT step takes 2.83 s instead of 3.72 on 2 CPU threads,
and 30 minutes of training gain 2.7 test ROUGE-1 (benchmarks/RESULTS.md).

    ids ─ embedding ─ detach ─ layer 1 … layer n ─┬─ layer n+1 … ─▶ memory
          └──────── no gradient, no update ───────┘  trained as before

A parameter the frozen part shares with the rest of the model keeps learning from the rest: the
word matrix that a warm-started run ties to the decoder's input and output learns from the decoder
side only. Layers the decoder shares (`model.share_pretrained`) cannot be frozen on one side alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from detr.errors import ConfigError


def _detach_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output.detach()


def freeze_encoder(model: nn.Module, n: int) -> None:
    """Stop the embedding and the first `n` layers of `model.encoder` from learning, in place.

    Their parameters no longer require gradients (but for those also used outside the encoder) and
    the embedding's output is detached, so the backward pass stops at layer n + 1. Call it before
    the optimizer is built, in every process and on every resume (a hook is not saved with weights).

    Raises:
        ConfigError: `n` is larger than the encoder's depth, the encoder has no layer stack, or a
            frozen layer is shared with the decoder.
    """
    if n == 0:
        return
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "embedding_and_layers"):
        raise ConfigError(f"train.freeze_encoder_layers: {type(encoder).__name__} has no layer stack to freeze")
    embedding, layers = encoder.embedding_and_layers()
    if n > len(layers):
        raise ConfigError(f"train.freeze_encoder_layers: {n}, but the encoder has {len(layers)} layers")
    outside = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith("encoder.")}
    frozen_layers = [p for layer in layers[:n] for p in layer.parameters()]
    if any(id(p) in outside for p in frozen_layers):
        raise ConfigError("train.freeze_encoder_layers: the encoder's layers are shared with the decoder "
                          "(model.share_pretrained); freezing them would freeze the decoder's too")
    for p in [*frozen_layers, *embedding.parameters()]:
        if id(p) not in outside:
            p.requires_grad_(False)
    embedding.register_forward_hook(_detach_output)

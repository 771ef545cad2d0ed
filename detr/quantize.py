"""int8 inference in detr's own engine: every Linear layer's weights stored as int8.

    detr translate RUN --quantize int8
    detr.load("runs/tiny").quantize("int8").translate(["a dog runs."])

PyTorch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`, the library the pinned
torch 2.13 ships for it; its successor `torchao` targets GPUs) replaces each `nn.Linear` with one
that keeps int8 weights, one scale per output row, and quantizes its input per batch on the fly
(fbgemm/x86 kernels). Embeddings, LayerNorms and attention's softmax stay float32; the output
projection, though it shares the embedding's weights in training, gets its own int8 copy. It runs
on the CPU only. PyTorch marks this API deprecated in 2.13; its warnings are silenced here, once,
because nothing a user can do about them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from detr.errors import ConfigError

PRECISIONS = ("float32", "int8")


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """`model` (in eval mode) with its Linear layers in `precision`, changed in place.

    Raises:
        ConfigError: an unknown precision, or int8 asked for a model not on the CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--quantize {precision}: detr's own engine offers {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(f"--quantize int8: dynamic int8 runs on the CPU; this model is on {device}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantize_per_).*")
        return quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=True)


def is_quantized(model: nn.Module) -> bool:
    """Whether any of `model`'s layers holds int8 weights."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())

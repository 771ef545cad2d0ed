"""int8 inference in detr's own engine: every Linear layer's weights stored as int8.

    detr translate RUN --quantize int8
    detr.load("runs/tiny").quantize("int8").translate(["a dog runs."])

`Int8Linear` keeps a Linear layer's weights as int8 with one scale per output row and quantizes
its input on the fly with one scale per *row* (per token), then multiplies in int8 with exact
int32 sums (`torch._int_mm`, the kernel torchao builds on) and scales back. A row's result thus
depends on that row alone, so detr's batch invariance holds in int8 too: a sentence decodes the
same alone or batched with others. PyTorch's own dynamic int8 Linear
(`torch.ao.quantization.quantize_dynamic`, deprecated in 2.13) scales a whole batch at once,
which makes outputs depend on their batch-mates; it was measured and set aside for that reason.

Embeddings, LayerNorms and attention's softmax stay float32; the output projection, though it
shares the embedding's weights in training, gets its own int8 copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr.errors import ConfigError

PRECISIONS = ("float32", "int8")


def _int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x` (N, K) as int8 with one scale per row: x ≈ q · scale, q in [-127, 127], scale (N, 1)
    (a row's largest |x| maps to 127; rounding cannot go past it)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W in int8 (a scale per output row) and x quantized per row as it comes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = _int8_rows(linear.weight.detach().float())  # (N, K), (N, 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", weight.t().contiguous())  # (K, N): the layout the kernel reads
        self.register_buffer("weight_scale", scale.squeeze(1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        q, scale = _int8_rows(x.reshape(-1, self.in_features))
        y = torch._int_mm(q, self.weight_t).float().mul_(scale)  # exact int32 sums, then each row's scale
        y = y.mul_(self.weight_scale) if self.bias is None else torch.addcmul(self.bias, y, self.weight_scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """`model` with its Linear layers in `precision`, changed in place (put in eval mode).

    Raises:
        ConfigError: an unknown precision, or int8 asked for a model not on the CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--quantize {precision}: detr's own engine offers {', '.join(PRECISIONS)}")
    if precision == "float32":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(f"--quantize int8: detr's int8 layers run on the CPU; this model is on {device}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    """Whether any of `model`'s layers holds int8 weights."""
    return any(isinstance(m, Int8Linear) for m in model.modules())

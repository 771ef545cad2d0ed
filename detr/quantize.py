"""The precision and layout of detr's own engine at inference: float32 packed for the CPU's GEMM,
or int8.

    detr translate RUN --quantize int8
    detr.load("runs/tiny").quantize("int8").translate(["a dog runs."])

float32 on the CPU (`PackedLinear`): each Linear layer keeps its weights and also a copy packed
once for the CPU's matrix multiply, so no call re-packs them: the two kernels Inductor's weight
prepacking uses, reached through `torch.ops`. On Intel's CPUs that is MKL's (`cblas_sgemm_pack`;
at the paper-base shape a layer takes about half the time at 32 rows, greedy decoding at batch 32
1.24x); on others oneDNN's, since MKL takes a slow path there (CTranslate2 picks its GEMM by the
same rule): on an AMD EPYC (Zen 4) one decoding step's Linear layers at the paper-base shape took
1.4x (1 row), 2.3x (4), 1.9x (32) and 1.5x (128) less time with oneDNN's packing than with MKL's
(benchmarks/RESULTS.md). Small layers (under 2^16 weights) keep MKL's everywhere: there a call's
fixed cost decides, and oneDNN's is higher. oneDNN keeps a kernel per row count, so past 64 rows
its calls are padded to a few counts (`padded_rows`): a server's memory stays flat. Results equal
`F.linear`'s to float rounding. Used where no gradient is wanted (with gradients on, as for
saliency, a plain Linear); a PyTorch without either kernel keeps plain Linear layers.

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

import contextlib
import copy
import platform

import torch
from torch import Tensor, nn

from detr.errors import ConfigError

PRECISIONS = ("float32", "int8")
PACK_ROWS = 128  # the row count the packing is sized for (measured best of 32 and 128); any count may use it


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:  # not Linux
        return platform.machine().lower() in ("x86_64", "amd64") and "intel" in platform.processor().lower()


def _gemm_libraries() -> tuple[str, ...]:
    """The libraries this PyTorch build can pack float32 Linear weights with."""
    available = []
    with contextlib.suppress(AttributeError, RuntimeError):  # a build without the op
        if torch.backends.mkl.is_available() and torch.ops.mkl._mkl_linear is not None:
            available.append("mkl")
    with contextlib.suppress(AttributeError, RuntimeError):
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise is not None:
            available.append("onednn")
    return tuple(available)


GEMM_LIBRARIES = _gemm_libraries()
# The one packing uses for large layers: MKL on Intel's CPUs, oneDNN on others (either, where the
# build has only one). Small layers take MKL's wherever it exists: a oneDNN call costs some 15 µs more.
GEMM = next((lib for lib in ("mkl" if _intel_cpu() else "onednn", *GEMM_LIBRARIES) if lib in GEMM_LIBRARIES), None)
# From this many weights on, a layer is large. Weights streamed from memory, 1 to 64 rows, AMD EPYC
# (benchmarks/RESULTS.md): MKL's kernel wins at 128 × 128; at 256 × 256 MKL's by 10 % at one row and
# oneDNN's by 1.6x at 8 rows; oneDNN's from 384 × 384 on.
LARGE = 1 << 16
# oneDNN generates and keeps a kernel for every row count it multiplies (about 1.7 MB for three
# layers of 256-1024 features; no cache setting bounds it): a server, whose batches have every row
# count, grew without end (benchmarks/RESULTS.md). Up to EXACT_ROWS rows (decoding steps) a call keeps
# its count; past that it is padded to one of 8 counts per doubling (at most 1/8 more rows, measured
# free), so a model keeps some hundred kernels however its batches come.
EXACT_ROWS = 64


def padded_rows(rows: int) -> int:
    """The row count oneDNN's product is called with for `rows` rows."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)  # 8 steps from one power of two to the next
    return -(-rows // step) * step


def _library_for(linear: nn.Linear) -> str | None:
    small = linear.weight.numel() < LARGE and "mkl" in GEMM_LIBRARIES
    return "mkl" if small else GEMM


def _can_pack(linear: nn.Linear) -> bool:
    weight = linear.weight
    return GEMM is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


class PackedLinear(nn.Linear):
    """An `nn.Linear` (the same weight and bias tensors, so ties and state-dict names stay) that
    multiplies with a copy of its weight packed once for MKL's GEMM when no gradient is wanted (the
    packed op has none; with gradients on, or traced by an exporter, it is a plain Linear). The copy
    is not updated: for inference only."""

    def __init__(self, linear: nn.Linear, library: str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.library = library or _library_for(linear)
        weight = linear.weight.detach()
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS) if self.library == "mkl" \
            else torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # the op has no gradient, no export
            return super().forward(x)
        if self.library == "onednn":
            return self._onednn(x)
        rows = x.numel() // self.in_features
        # Given the actual row count as the packing's, the op always takes the packed kernel
        # (for any other count it falls back to F.linear).
        return torch.ops.mkl._mkl_linear(x.contiguous(), self.packed, self.weight, self.bias, rows)

    def _onednn(self, x: Tensor) -> Tensor:
        """oneDNN's product, with the rows padded up to `padded_rows` (zeros; their outputs dropped):
        a row's result does not depend on how many rows are multiplied with it."""
        rows = x.numel() // self.in_features
        padded = padded_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        flat = nn.functional.pad(x.reshape(rows, self.in_features), (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")[:rows]
        return out.view(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        """A copy packed anew (oneDNN's packed weights are opaque: they cannot be copied)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = copy.deepcopy(self.weight, memo)
        plain.bias = copy.deepcopy(self.bias, memo)
        return PackedLinear(plain, self.library)


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
    """`model` with its Linear layers in `precision`, changed in place and put in eval mode, for
    inference: "float32" packs them for the CPU's GEMM where it can (`PackedLinear`), "int8" makes
    them `Int8Linear`.

    Raises:
        ConfigError: an unknown precision, or int8 asked for a model not on the CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--quantize {precision}: detr's own engine offers {', '.join(PRECISIONS)}")
    device = next(model.parameters()).device
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"--quantize int8: detr's int8 layers run on the CPU; this model is on {device}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if precision == "int8" and isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
            elif type(child) is nn.Linear and _can_pack(child):
                setattr(parent, name, PackedLinear(child))
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    """Whether any of `model`'s layers holds int8 weights."""
    return any(isinstance(m, Int8Linear) for m in model.modules())

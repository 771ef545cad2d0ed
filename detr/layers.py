"""The Transformer's parts: attention, feed-forward, positions, encoder and decoder layers.

Shapes: B batch, S source length, T target length, D d_model, H heads, Dh = D / H.
Masks are boolean and `True` means *attend*; they broadcast to (B, H, T, S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionRecord:
    """Attention weights handed back to a caller who asked for them.

    Each list has one (B, H, T_query, T_key) tensor per layer, in layer order. Passing a
    record into `encode`/`decode` switches the attention to the explicit path (which
    computes the weights); nothing is ever stored on a module.
    """

    encoder: list[Tensor] = field(default_factory=list)
    decoder_self: list[Tensor] = field(default_factory=list)
    cross: list[Tensor] = field(default_factory=list)


class MultiHeadAttention(nn.Module):
    """softmax(Q Kᵀ / √d_k) V over `n_heads` heads, concatenated and projected.

    Two paths that agree to float rounding: `F.scaled_dot_product_attention` (fused, fast)
    and the explicit formula, taken when the caller wants the weights.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # The key bias adds q·b to every score of a query, which softmax ignores: its exact gradient
        # is 0, and what backpropagation computes is rounding noise that Adam would scale up to
        # learning-rate-sized steps (and that differs with the summation order, say across ranks).
        # It stays as initialised or loaded: kept for the checkpoint layout and the exporters.
        self.k_proj.bias.requires_grad_(False)

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of `x` (B, S, D), each (B, H, S, Dh); what a cache stores."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(
        self, query: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from `query` (B, T, D) over projected keys/values (B, H, S, Dh).

        Returns:
            The output (B, T, D) and, if `need_weights`, the weights (B, H, T, S).
        """
        B, T, _ = query.shape
        q = self.split_heads(self.q_proj(query))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p, self.training) @ v  # (B, H, T, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, D)
        return self.out_proj(out), weights

    def forward(
        self, query: Tensor, key_value: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        k, v = self.project_kv(key_value)
        return self.attend(query, k, v, mask, need_weights)


class Dropout(nn.Module):
    """Inverted dropout, as `nn.Dropout`, with a cheaper random mask on the CPU.

    PyTorch's CPU dropout draws one Bernoulli sample per element, a tenth of a training step
    here. This draws 64 random bits per 4 elements and keeps an element when its 16 bits are
    at least p·2¹⁶ (so p is rounded to a multiple of 2⁻¹⁶), then multiplies by the mask scaled
    by 1/(1 - p); the backward pass multiplies by the same mask. Forward and backward together
    take about 2.5× less time. Other devices use `F.dropout`. The bits come from torch's
    generator, so seeding and saved RNG states reproduce it exactly.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.numel() % 4:
            return F.dropout(x, self.p, True)
        bits = torch.empty(x.numel() // 4, dtype=torch.int64).random_(-(2**63), None)
        keep = bits.view(torch.int16).view(x.shape) >= round(self.p * 2**16) - 2**15
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}  # silu: Marian's "swish" (OPUS-MT models)


class FeedForward(nn.Module):
    """Position-wise Linear → activation → (dropout) → Linear.

    The paper drops out only sublayer outputs and embeddings; dropout on the hidden activation
    (`model.activation_dropout`, fairseq's name) is off by default, and on a CPU its random
    mask over the d_ff-wide hidden layer costs more than a tenth of a training step.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


class PositionalEncoding(nn.Module):
    """Adds position information: the paper's sinusoids, or a learned table."""

    def __init__(self, d_model: int, max_positions: int, learned: bool = False) -> None:
        super().__init__()
        self.max_positions = max_positions
        if learned:
            self.table = nn.Parameter(torch.randn(max_positions, d_model) * d_model**-0.5)
        else:
            position = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)  # (P, 1)
            freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
            table = torch.zeros(max_positions, d_model)
            table[:, 0::2] = torch.sin(position * freq)
            table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
            self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x: (B, T, D) embeddings of positions offset .. offset+T-1 (see `position_rows`)."""
        return x + position_rows(self.table, offset, x.size(1)).to(x.dtype)


def position_rows(table: Tensor, offset: int | Tensor, T: int) -> Tensor:
    """Rows offset .. offset+T-1 of a position table (P, D): (T, D) for one int `offset`; (B, T, D)
    for one offset per row (B,): rows that joined a running batch later are at earlier positions;
    or for one offset per token (B, T): sentences packed into one row restart at position 0.

    Raises:
        ValueError: a position beyond the table.
    """
    if isinstance(offset, int):
        positions = None
        last = offset + T
    else:
        positions = (offset if offset.dim() == 2 else offset.unsqueeze(1)) + torch.arange(T, device=table.device)
        last = int(positions.max()) + 1
    if last > table.size(0):
        raise ValueError(f"sequence of {last} positions exceeds max_positions={table.size(0)}")
    return table[offset : offset + T] if positions is None else table[positions]


class Sublayer(nn.Module):
    """Residual connection around `fn` with LayerNorm before (pre-norm) or after (post-norm)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def inputs(self, x: Tensor) -> Tensor:
        """What the wrapped function sees."""
        return self.norm(x) if self.pre_norm else x

    def merge(self, x: Tensor, y: Tensor) -> Tensor:
        """Add the function's output `y` back onto the residual stream `x`."""
        out = x + self.dropout(y)
        return out if self.pre_norm else self.norm(out)


@dataclass
class LayerCache:
    """One decoder layer's keys and values, each (B, H, length, Dh)."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None


class EncoderLayer(nn.Module):
    """Self-attention → add & norm → feed-forward → add & norm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, pre_norm: bool, eps: float, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation)
        self.attn_block = Sublayer(d_model, dropout, pre_norm, eps)
        self.ff_block = Sublayer(d_model, dropout, pre_norm, eps)

    def forward(self, x: Tensor, mask: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, S, D); mask: (B, 1, 1, S) source padding."""
        h = self.attn_block.inputs(x)
        y, weights = self.self_attn(h, h, mask, need_weights)
        x = self.attn_block.merge(x, y)
        x = self.ff_block.merge(x, self.ff(self.ff_block.inputs(x)))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked self-attention → cross-attention over memory → feed-forward, each with add & norm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str, pre_norm: bool, eps: float, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff, activation_dropout, activation)
        self.self_block = Sublayer(d_model, dropout, pre_norm, eps)
        self.cross_block = Sublayer(d_model, dropout, pre_norm, eps)
        self.ff_block = Sublayer(d_model, dropout, pre_norm, eps)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        self_mask: Tensor,
        cross_mask: Tensor,
        cache: LayerCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: (B, T, D) new target positions; memory: (B, S, D), or None once `cache` holds its keys/values.

        self_mask: (B|1, 1, T, T_past + T) causal and padding; cross_mask: (B, 1, 1, S).
        With a cache, keys/values of earlier positions come from it and the new ones are
        appended; cross-attention keys/values are projected from memory only once.

        Returns:
            The output (B, T, D), self-attention and cross-attention weights (or None).
        """
        h = self.self_block.inputs(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            if cache.self_k is not None:
                k = torch.cat([cache.self_k, k], dim=2)  # (B, H, T_past + T, Dh)
                v = torch.cat([cache.self_v, v], dim=2)
            cache.self_k, cache.self_v = k, v
        y, self_weights = self.self_attn.attend(h, k, v, self_mask, need_weights)
        x = self.self_block.merge(x, y)

        h = self.cross_block.inputs(x)
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            k, v = self.cross_attn.project_kv(memory)
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        y, cross_weights = self.cross_attn.attend(h, k, v, cross_mask, need_weights)
        x = self.cross_block.merge(x, y)

        x = self.ff_block.merge(x, self.ff(self.ff_block.inputs(x)))
        return x, self_weights, cross_weights

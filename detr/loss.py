"""Cross-entropy losses of a batch, shared by training, validation and the predictors' perplexity.

Each returns the loss *summed* over the positions that count, so that a step over several
batches divides once by their total count (exact gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from detr.batching import Batch, BatchStream, Encoded
from detr.readers import Example
from detr.tokenizer import PAD, Tokenizer

IGNORE = -100  # target of positions the loss skips (later subwords of a word, specials, padding)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """`F.cross_entropy(logits, target, ignore_index, label_smoothing, reduction="sum")` with one
    (N, V) buffer instead of four.

    The log-probabilities are computed once and kept; the backward pass turns them in place into
    the gradient softmax − ((1 − ε)·one-hot + ε/V), zeroed on ignored rows. PyTorch's own backward
    materialises a zero-filled one-hot gradient, the smoothing term's gradient, their sum and
    log-softmax's gradient, each (N, V): with an 8k vocabulary that made the loss a fifth of a
    CPU training step. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float, ignore_index: int) -> Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        keep = target != ignore_index
        index = target.masked_fill(~keep, 0).unsqueeze(1)  # (N, 1)
        per_row = logp.gather(1, index).squeeze(1).mul_(1.0 - smoothing)
        if smoothing:
            per_row.add_(logp.sum(dim=1), alpha=smoothing / logp.size(1))
        ctx.save_for_backward(logp, index, keep)
        ctx.smoothing = smoothing
        return -(per_row * keep).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        logp, index, keep = ctx.saved_tensors
        smoothing = ctx.smoothing
        weight = (keep * grad).to(logp.dtype).unsqueeze(1)  # (N, 1): the loss's gradient, 0 on ignored rows
        out = logp.exp_()  # softmax, in place
        out.scatter_add_(1, index, torch.full(index.shape, smoothing - 1.0, dtype=out.dtype))
        return out.sub_(smoothing / out.size(1)).mul_(weight), None, None, None


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float = 0.0) -> Tensor:
    """Summed label-smoothed cross-entropy of scores (..., V) against ids (...), `ignore_index` skipped;
    equal to `F.cross_entropy(..., reduction="sum")` to float rounding, in float32."""
    return _SmoothedCrossEntropy.apply(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                       label_smoothing, ignore_index)


def seq2seq_loss(model: nn.Module, batch: Batch, label_smoothing: float) -> Tensor:
    """Summed cross-entropy over the batch's target tokens under teacher forcing (padding ignored)."""
    return cross_entropy(model(batch.src, batch.tgt_in), batch.tgt_out, PAD, label_smoothing)  # logits (B, T, V)


def label_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Summed cross-entropy of label scores (B, C) or (B, S, C) against label ids, `IGNORE` skipped."""
    return cross_entropy(logits, labels, IGNORE, label_smoothing)


def mean_token_loss(examples: list[Example], tokenizer: Tokenizer, max_len: int, max_tokens: int,
                    loss_of: Callable[[Batch], Tensor], name: str = "") -> float:
    """Mean cross-entropy per target token (</s> included) of `examples` under teacher forcing;
    over-long examples are truncated to `max_len`. `loss_of` sums a batch's loss."""
    stream = BatchStream(lambda: examples, Encoded(tokenizer, max_len, "truncate"), max_tokens,
                         max(len(examples), 1), 0, shuffle=False, name=name)
    nll = tokens = 0.0
    with torch.no_grad():
        for batch in stream:
            nll += float(loss_of(batch))
            tokens += batch.num_tgt_tokens
    return nll / max(tokens, 1)

"""Cross-entropy losses of a batch, shared by training, validation and the predictors' perplexity.

Each returns the loss *summed* over the positions that count, so that a step over several
batches divides once by their total count (exact gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr.batching import Batch, BatchStream, Encoded
from detr.readers import Example
from detr.tokenizer import PAD, Tokenizer

IGNORE = -100  # target of positions the loss skips (later subwords of a word, specials, padding)


def seq2seq_loss(model: nn.Module, batch: Batch, label_smoothing: float) -> Tensor:
    """Summed cross-entropy over the batch's target tokens under teacher forcing (padding ignored)."""
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD,
                           label_smoothing=label_smoothing, reduction="sum")


def label_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Summed cross-entropy of label scores (B, C) or (B, S, C) against label ids, `IGNORE` skipped."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")


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

"""Looking inside a trained model: attention of every layer and head, saliency, alignments.

    maps = attention_maps(translator, "we have two red dogs.")    # one per n-best output
    maps[0].cross.shape                                           # (layers, heads, T, S)
    saliency(translator.model, src, tgt_in, position=3)          # (S,) importance of each source token
    word_alignment(maps[0])                                       # "0-0 1-1 2-2 ..."
    gradient_norms(model)                                         # per-block gradient L2 norm (training)

Attention is read by teacher-forcing the output (the decoder is causal, so each row is
exactly what the decoder saw when it produced that token). Saliency is gradient ×
input: the gradient of the chosen output token's log-probability with respect to each
source token's embedding, multiplied by that embedding, L2 norm over the embedding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr.config import DecodeConfig
from detr.labeller import Classifier, Tagger
from detr.layers import AttentionRecord
from detr.model import Seq2Seq, padding_mask
from detr.tokenizer import BOS, EOS
from detr.translator import Translator


@dataclass
class AttentionMaps:
    """Attention of one (source, output) pair; token lists label the axes (</s> included)."""

    src_tokens: list[str]
    tgt_tokens: list[str]  # the output tokens, then </s>; decoder inputs are <s> + all but the last
    output: str
    score: float | None
    encoder: Tensor  # (L_enc, H, S, S)
    decoder_self: Tensor | None  # (L_dec, H, T, T); None for classify/tag runs
    cross: Tensor | None  # (L_dec, H, T, S); None for classify/tag runs
    saliency: Tensor  # (T, S): importance of each source token for each output token (or predicted label)

    def to_dict(self) -> dict:
        def rounded(t: Tensor, digits: int = 4) -> list:
            return torch.round(t * 10**digits).div(10**digits).tolist()

        return {"src_tokens": self.src_tokens, "tgt_tokens": self.tgt_tokens, "output": self.output,
                "score": self.score, "encoder": rounded(self.encoder),
                "decoder_self": None if self.decoder_self is None else rounded(self.decoder_self),
                "cross": None if self.cross is None else rounded(self.cross), "saliency": rounded(self.saliency, 7)}


@torch.no_grad()
def record_attention(model: Seq2Seq, src: Tensor, tgt_out: Tensor) -> AttentionRecord:
    """All attention weights for source ids `src` (1, S) and output ids `tgt_out` (1, T) ending in </s>."""
    tgt_in = torch.cat([torch.full_like(tgt_out[:, :1], BOS), tgt_out[:, :-1]], dim=1)  # (1, T)
    record = AttentionRecord()
    src_mask = padding_mask(src)
    memory = model.encode(src, src_mask, attention=record)
    model.decode(tgt_in, memory, src_mask, attention=record)
    return record


def gradient_x_input(model: nn.Module, embedding: nn.Module, log_probs: Callable[[], Tensor],
                     picks: list[tuple[int, ...]]) -> Tensor:
    """For each index `pick` into `log_probs()`, the L2 norm over the embedding dimension of
    gradient × embedding output, per input token of the (first) batch row: (len(picks), S).

    `embedding` is the module whose output is the input embedding; the encoder calls it first
    (a table shared with the decoder is called again later: that call is not the input).
    """
    was_training = model.training
    model.eval()
    captured: list[Tensor] = []
    caller = threading.get_ident()  # a server's other workers may run the same model meanwhile

    def keep_first(module, inputs, output):
        if not captured and threading.get_ident() == caller:
            output.retain_grad()
            captured.append(output)

    handle = embedding.register_forward_hook(keep_first)
    try:
        with torch.enable_grad():
            lp = log_probs()
            rows = []
            for k, pick in enumerate(picks):
                captured[0].grad = None
                lp[pick].backward(retain_graph=k + 1 < len(picks))
                rows.append((captured[0].grad[0] * captured[0][0]).norm(dim=-1).detach())  # (S,)
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return torch.stack(rows)


def saliency(model: Seq2Seq, src: Tensor, tgt_out: Tensor) -> Tensor:
    """Gradient × input for every output position: (T, S) importance of source token s for
    the log-probability of output token t. Padding and masked positions get exactly 0.

    Args:
        src: (1, S) source ids; tgt_out: (1, T) output ids ending in </s>.
    """
    tgt_in = torch.cat([torch.full_like(tgt_out[:, :1], BOS), tgt_out[:, :-1]], dim=1)
    picks = [(t, int(tgt_out[0, t])) for t in range(tgt_out.size(1))]
    return gradient_x_input(model, model.encoder.embeddings,
                            lambda: torch.log_softmax(model(src, tgt_in).float(), dim=-1)[0], picks)


def attention_maps(translator: Translator, src_text: str, ref_text: str | None = None, with_saliency: bool = True,
                   options: DecodeConfig | None = None) -> list[AttentionMaps]:
    """Attention (and saliency) for `src_text`: of the reference `ref_text` if given, else of
    each n-best output of the search `options` describe (default: the run's decode settings)."""
    src_ids = translator.encode_line(1, src_text, (options or translator.decode).tgt_lang)
    src = torch.tensor([src_ids], device=translator.device)
    if ref_text is not None:
        outputs = [(ref_text, None)]
    else:
        outputs = translator.translate_nbest([src_text], options)[0]
    maps = []
    tok = translator.tokenizer
    for text, score in outputs:
        tgt_ids = (tok.tgt.encode(text) if text.strip() else [])[: translator.model.config.max_positions - 1]
        tgt_out = torch.tensor([tgt_ids + [EOS]], device=translator.device)
        record = record_attention(translator.model, src, tgt_out)
        maps.append(AttentionMaps(
            src_tokens=tok.src.token_labels(src_ids), tgt_tokens=tok.tgt.token_labels(tgt_ids + [EOS]),
            output=text, score=score,
            encoder=torch.cat(record.encoder).cpu(),  # each (1, H, S, S) → (L, H, S, S)
            decoder_self=torch.cat(record.decoder_self).cpu(), cross=torch.cat(record.cross).cpu(),
            saliency=saliency(translator.model, src, tgt_out).cpu() if with_saliency else torch.zeros(0),
        ))
    return maps


def _words(tokens: list[str]) -> list[int]:
    """Word index of each subword label (a "▁" starts a new word; </s> belongs to none: -1)."""
    index, out = -1, []
    for t in tokens:
        if t == "</s>":
            out.append(-1)
            continue
        if t.startswith("▁") or index < 0:
            index += 1
        out.append(index)
    return out


def word_alignment(maps: AttentionMaps, layer: int = -1) -> list[tuple[int, int]]:
    """Source–target word pairs (i, j) from cross-attention: the head-averaged attention of
    `layer`, summed over a source word's subwords and averaged over a target word's, each
    target word aligned to its most-attended source word (as fairseq prints: "i-j")."""
    weights = maps.cross[layer].mean(0)  # (T, S)
    src_words, tgt_words = _words(maps.src_tokens), _words(maps.tgt_tokens)
    n_src, n_tgt = max(src_words) + 1, max(tgt_words) + 1
    if n_src <= 0 or n_tgt <= 0:
        return []
    by_word = torch.zeros(n_tgt, n_src)
    counts = torch.zeros(n_tgt, 1)
    for t, tw in enumerate(tgt_words):
        if tw < 0:
            continue
        counts[tw] += 1
        for s, sw in enumerate(src_words):
            if sw >= 0:
                by_word[tw, sw] += weights[t, s]
    by_word /= counts.clamp(min=1)
    return [(int(by_word[j].argmax()), j) for j in range(n_tgt)]


def format_alignment(pairs: list[tuple[int, int]]) -> str:
    return " ".join(f"{i}-{j}" for i, j in sorted(pairs))


def alignment_of(translator: Translator, src_text: str, output: str, options: DecodeConfig | None = None) -> str:
    """"i-j" word alignments of `output` to `src_text` from the last layer's cross-attention
    (`options.tgt_lang`: the target language of a multilingual run)."""
    if not src_text.strip() or not output.strip():
        return ""
    maps = attention_maps(translator, src_text, output, with_saliency=False, options=options)[0]
    return format_alignment(word_alignment(maps))


def label_maps(labeller: Classifier | Tagger, text: str) -> list[AttentionMaps]:
    """Encoder self-attention of every layer and head for a classify/tag run, and the saliency
    of each input token for the predicted label (classify) or each word's predicted tag (tag)."""
    model = labeller.model
    ids, picks, names, output, score = labeller.saliency_targets(text)
    src = torch.tensor([ids], device=labeller.device)
    record = AttentionRecord()
    with torch.no_grad():
        model(src, record)
    sal = gradient_x_input(model, model.encoder.embeddings,
                           lambda: torch.log_softmax(model(src).float(), dim=-1)[0], picks)
    return [AttentionMaps(src_tokens=labeller.text.tokens(ids), tgt_tokens=names, output=output, score=score,
                          encoder=torch.cat(record.encoder).cpu(), decoder_self=None, cross=None,
                          saliency=sal.cpu())]


# ----------------------------------------------------------------------------- gradients while training


def _block(name: str) -> str:
    """The block a parameter belongs to: an encoder/decoder layer, an embedding, a final norm."""
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "layers" else ".".join(parts[:2])


def gradient_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per block (see `_block`)."""
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            squares[_block(name)] = squares.get(_block(name), 0.0) + float(p.grad.float().pow(2).sum())
    return {block: math.sqrt(s) for block, s in squares.items()}


def update_ratios(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖Δw‖ / ‖w‖ per block for one optimiser step: about 1e-3 is healthy; far above, the
    learning rate is too high for that block; far below, it barely learns."""
    change: dict[str, float] = {}
    size: dict[str, float] = {}
    for name, p in model.named_parameters():
        block = _block(name)
        change[block] = change.get(block, 0.0) + float((p.detach() - before[name]).float().pow(2).sum())
        size[block] = size.get(block, 0.0) + float(before[name].float().pow(2).sum())
    return {block: math.sqrt(change[block] / size[block]) if size[block] else 0.0 for block in change}

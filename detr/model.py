"""The encoder-decoder Transformer ("Attention Is All You Need"), read top to bottom.

    src ids ─ embed·√D + positions ─ N × EncoderLayer ─ (norm) ─▶ memory
    tgt ids ─ embed·√D + positions ─ N × DecoderLayer(memory) ─ (norm) ─ output projection ─▶ logits

Training runs every target position at once under a causal mask (teacher forcing);
decoding feeds one position at a time and keeps keys/values in a `KVCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from detr.config import ModelConfig
from detr.layers import AttentionRecord, DecoderLayer, Dropout, EncoderLayer, LayerCache, PositionalEncoding
from detr.tokenizer import PAD
from detr.warmstart import warm_start_decoder

# Sentences encoded packed together hold at most this many tokens (`Seq2Seq.encode_packed`): attention
# over a pack costs its tokens squared, the products only its tokens.
PACK_TOKENS = 256


def padding_mask(ids: Tensor) -> Tensor:
    """(B, S) token ids → (B, 1, 1, S) mask, True where a key may be attended (not padding)."""
    return (ids != PAD)[:, None, None, :]


def causal_mask(T: int, offset: int, device: torch.device) -> Tensor:
    """(1, 1, T, offset + T): query at position offset+i sees keys 0 .. offset+i."""
    q = torch.arange(offset, offset + T, device=device)[:, None]
    k = torch.arange(offset + T, device=device)[None, :]
    return (k <= q)[None, None]


class Embedding(nn.Module):
    """Token embedding scaled by √d_model, plus positions, then dropout."""

    def __init__(self, tokens: nn.Embedding, config: ModelConfig) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(config.d_model)
        self.positions = PositionalEncoding(config.d_model, config.max_positions, config.positional == "learned")
        self.dropout = Dropout(config.dropout)

    def forward(self, ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        return self.dropout(self.positions(self.tokens(ids) * self.scale, offset))  # (B, T, D)


def _layer_args(config: ModelConfig) -> tuple:
    return (config.d_model, config.n_heads, config.d_ff, config.dropout, config.attention_dropout,
            config.activation, config.norm == "pre", config.layer_norm_eps, config.activation_dropout)


def _final_norm(config: ModelConfig) -> nn.Module:
    # Pre-norm leaves the residual stream un-normalised at the top of the stack; post-norm does not.
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm == "pre" else nn.Identity()


class Encoder(nn.Module):
    """Embeds source ids and runs the stack of self-attention layers."""

    def __init__(self, config: ModelConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed = Embedding(tokens, config)
        self.layers = nn.ModuleList(EncoderLayer(*_layer_args(config)) for _ in range(config.n_layers))
        self.norm = _final_norm(config)

    @property
    def embeddings(self) -> nn.Embedding:
        """The source token embedding (as `PretrainedEncoder.embeddings`)."""
        return self.embed.tokens

    def embedding_and_layers(self) -> tuple[nn.Module, nn.ModuleList]:
        """The embedding module and the layers above it, bottom first (`detr.freeze`)."""
        return self.embed, self.layers

    def forward(self, src: Tensor, src_mask: Tensor, attention: AttentionRecord | None = None) -> Tensor:
        """src: (B, S) ids; src_mask: (B, 1, 1, S). Returns memory (B, S, D)."""
        x = self.embed(src)
        for layer in self.layers:
            x, weights = layer(x, src_mask, need_weights=attention is not None)
            if attention is not None:
                attention.encoder.append(weights)
        return self.norm(x)

    def packed(self, src: Tensor) -> Tensor:
        """Memory (B, S, D) of the sentences `src` (B, S) run as one row of their tokens, without the
        padding: each token attends to its own sentence only (a block-diagonal mask) and positions
        restart at 0 with each sentence. Equal to `forward` to float rounding; zeros at the padding."""
        keep = src != PAD
        lengths = keep.sum(1)
        sentence = torch.repeat_interleave(torch.arange(src.size(0), device=src.device), lengths)  # (N,)
        starts = lengths.cumsum(0) - lengths
        x = self.embed(src[keep][None], -starts[sentence][None])  # (1, N, D)
        mask = (sentence[:, None] == sentence[None, :])[None, None]  # (1, 1, N, N)
        for layer in self.layers:
            x, _ = layer(x, mask)
        memory = x.new_zeros(*src.shape, x.size(-1))
        memory[keep] = self.norm(x)[0]
        return memory


def _packs(lengths: list[int], budget: int) -> list[slice]:
    """Runs of consecutive sentences of at most `budget` tokens together (a longer sentence alone)."""
    packs, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and tokens + n > budget:
            packs.append(slice(start, i))
            start, tokens = i, 0
        tokens += n
    return packs + [slice(start, len(lengths))] if lengths else packs


@dataclass
class KVCache:
    """Decoder state for incremental decoding: per layer keys/values, and positions done.

    Self-attention keys/values grow by one step per call; cross-attention keys/values are
    projected from the memory once. `select` reorders or shrinks the batch (beam search
    follows its best hypotheses; finished sentences leave the batch), and `Seq2Seq.extend_cache`
    adds rows to a running batch (continuous batching): such a row's outputs start at a later
    column of the self-attention keys (`start`), and the columns before it are masked.
    """

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # columns of self-attention keys/values
    start: Tensor | None = None  # (B,) each row's first column; None: every row starts at column 0

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerCache() for _ in range(n_layers)])

    def positions(self) -> int | Tensor:
        """The target position of the next column: one int for every row, or one per row (B,)."""
        return self.length if self.start is None else self.length - self.start

    def self_mask(self, T: int, device: torch.device) -> Tensor | None:
        """(B|1, 1, T, length + T) for T new positions: causal, and no row sees columns before its start."""
        if self.start is None:
            return None if T == 1 else causal_mask(T, self.length, device)  # one new position sees all
        columns = torch.arange(self.length + T, device=device)
        return causal_mask(T, self.length, device) & (columns >= self.start.unsqueeze(1))[:, None, None, :]

    def select(self, index: Tensor, cross_index: Tensor | None = None) -> None:
        """Keep batch rows `index` (B',) in that order, in place.

        `cross_index` selects the cross-attention keys/values separately: beam search reorders
        hypotheses within a sentence, which share one memory, and only drops whole sentences.
        By default they follow `index`. Only the rows whose place changes are copied, over the
        rows there (the first B' rows are kept, as views): an identity selection copies nothing,
        and a row that leaves costs one row's copy when one of the last rows takes its place.
        Columns that no kept row attends to any more (before every kept row's start) are dropped.
        """
        cross_index = index if cross_index is None else cross_index
        self_moves = _moves(index)
        cross_moves = self_moves if cross_index is index else _moves(cross_index)
        for lc in self.layers:
            if lc.self_k is not None:
                lc.self_k, lc.self_v = (_keep_rows(x, index, self_moves) for x in (lc.self_k, lc.self_v))
            if lc.cross_k is not None:
                lc.cross_k, lc.cross_v = (_keep_rows(x, cross_index, cross_moves) for x in (lc.cross_k, lc.cross_v))
        if self.start is not None:
            self.start = self.start.index_select(0, index)
            first = int(self.start.min()) if index.numel() else 0
            if first:
                for lc in self.layers:
                    lc.self_k, lc.self_v = lc.self_k[:, :, first:], lc.self_v[:, :, first:]
                self.start, self.length = self.start - first, self.length - first
            if not bool(self.start.any()):
                self.start = None

    def keep_source(self, S: int) -> None:
        """Drop source positions from S on (padding of sentences that have left the batch)."""
        for lc in self.layers:
            if lc.cross_k is not None:
                lc.cross_k, lc.cross_v = lc.cross_k[:, :, :S], lc.cross_v[:, :, :S]


def _pad_source(x: Tensor, S: int) -> Tensor:
    """Keys or values (B, H, S', Dh) padded with zeros to S source positions."""
    return x if x.size(2) == S else torch.nn.functional.pad(x, (0, 0, 0, S - x.size(2)))


def _moves(index: Tensor) -> tuple[Tensor, Tensor] | None:
    """What keeping rows `index` (n,) in that order moves: the places (m,) whose row changes and the
    rows (m,) that go there; None when nothing moves."""
    places = (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)
    return (places, index.index_select(0, places)) if places.numel() else None


def _keep_rows(x: Tensor, index: Tensor, moved: tuple[Tensor, Tensor] | None) -> Tensor:
    """Rows `index` of a cache tensor `x` (B, ...) whose `_moves` are `moved`: the rows that change place
    are copied in place and the first `len(index)` rows kept (a view), so that a row leaving a batch
    costs one row's copy when the last row fills its place (`detr.search.swap_out`), not a copy of all."""
    if index.numel() > x.size(0) or (moved is not None and 2 * moved[0].numel() > index.numel()):
        return x.index_select(0, index)  # more rows than before, or most of them move (beam search): one copy
    if moved is not None:
        x.index_copy_(0, moved[0], x.index_select(0, moved[1]))  # (every row is read before any is written)
    return x[:index.numel()]


class Decoder(nn.Module):
    """Embeds target ids and runs masked self-attention + cross-attention layers."""

    def __init__(self, config: ModelConfig, tokens: nn.Embedding | None) -> None:
        super().__init__()
        self.embed = Embedding(tokens, config) if tokens is not None else None  # None: warm-started later
        self.layers = nn.ModuleList(DecoderLayer(*_layer_args(config)) for _ in range(config.decoder_layers))
        self.norm = _final_norm(config)

    def forward(
        self,
        tgt_in: Tensor,
        memory: Tensor | None,
        src_mask: Tensor,
        cache: KVCache | None = None,
        attention: AttentionRecord | None = None,
    ) -> Tensor:
        """tgt_in: (B, T) ids (with a cache: only the new positions). Returns (B, T, D)."""
        T = tgt_in.size(1)
        if cache is None:
            offset: int | Tensor = 0
            self_mask = causal_mask(T, 0, tgt_in.device) & padding_mask(tgt_in)  # (B, 1, T, T)
        else:
            offset, self_mask = cache.positions(), cache.self_mask(T, tgt_in.device)
        x = self.embed(tgt_in, offset)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, self_w, cross_w = layer(x, memory, self_mask, src_mask, layer_cache, attention is not None)
            if attention is not None:
                attention.decoder_self.append(self_w)
                attention.cross.append(cross_w)
        if cache is not None:
            cache.length += T
        return self.norm(x)


def initialize(module: nn.Module, d_model: int) -> None:
    """Xavier-uniform matrices; embeddings N(0, 1/D) with the padding row zero.

    Embeddings are multiplied by √D, so N(0, 1/D) puts the inputs at unit scale.
    """
    for name, p in module.named_parameters():
        if p.dim() > 1 and "tokens" not in name:
            nn.init.xavier_uniform_(p)
    for emb in {id(m): m for m in module.modules() if isinstance(m, nn.Embedding)}.values():
        nn.init.normal_(emb.weight, std=d_model**-0.5)
        with torch.no_grad():
            emb.weight[PAD].zero_()


class Seq2Seq(nn.Module):
    """Encoder, decoder and output projection, with optional weight sharing.

    `encoder` replaces detr's own encoder with any module called as
    `encoder(src, src_mask, attention)` → memory (B, S, d_model), such as a pretrained
    BERT-style encoder (`detr.pretrained.PretrainedEncoder`); its weights are left as they are.
    With `config.pretrained_decoder` the decoder is warm-started from that encoder's embedding
    and layers (`detr.warmstart`).
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        own = encoder is None
        warm = config.pretrained_decoder is not None  # the decoder's embedding and layers come from `encoder`
        src_tokens = nn.Embedding(config.src_vocab_size, D, padding_idx=PAD) if own else None
        tgt_tokens = src_tokens if config.share_embeddings and own \
            else None if warm else nn.Embedding(config.tgt_vocab_size, D, padding_idx=PAD)
        self.encoder = Encoder(config, src_tokens) if own else encoder
        self.decoder = Decoder(config, tgt_tokens)
        self.output = nn.Linear(D, config.tgt_vocab_size, bias=False)
        initialize(self if own else nn.ModuleList([self.decoder, self.output]), D)  # a given encoder keeps its weights
        if warm:
            warm_start_decoder(self.decoder, encoder, config)
            tgt_tokens = self.decoder.embed.tokens
        if config.share_embeddings or config.tie_output:
            self.output.weight = tgt_tokens.weight  # the paper's shared weight matrix

    def encode(self, src: Tensor, src_mask: Tensor | None = None, attention: AttentionRecord | None = None) -> Tensor:
        """src: (B, S) ids → memory (B, S, D). Pass `attention` to receive the weights."""
        if src_mask is None:
            src_mask = padding_mask(src)
        return self.encoder(src, src_mask, attention)

    def encode_packed(self, src: Tensor) -> Tensor:
        """Memory (B, S, D) of sentences of mixed lengths (as a running batch's joiners are), encoded
        without their padding (`Encoder.packed`), in packs of at most PACK_TOKENS tokens: the layers'
        products then cost what the sentences' tokens cost, and attention within a pack stays small.
        Equal to `encode` to float rounding. A pretrained encoder encodes padded."""
        if not isinstance(self.encoder, Encoder):
            return self.encode(src)
        lengths = (src != PAD).sum(1).tolist()
        return torch.cat([self.encoder.packed(src[rows]) for rows in _packs(lengths, PACK_TOKENS)])

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor | None,
        src_mask: Tensor,
        cache: KVCache | None = None,
        attention: AttentionRecord | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for target positions `tgt_in` (B, T) given the memory.

        Without a cache all positions run in parallel under the causal mask; with one,
        `tgt_in` holds only the new positions and the cache supplies the past.
        """
        return self.output(self.decoder(tgt_in, memory, src_mask, cache, attention))

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.decoder.layers))

    def extend_cache(self, cache: KVCache, memory: Tensor) -> None:
        """Add rows for new sentences with encoder memory `memory` (n, S, D) to a running `cache`
        (continuous batching): their outputs start at the next column. `memory` and the cache's
        cross-attention keys are padded to one source length (the caller masks the padding)."""
        if cache.length == 0:  # no step taken yet: the first step projects every row's memory
            return
        n, S = memory.size(0), memory.size(1)
        rows = cache.layers[0].self_k.size(0)
        for layer, lc in zip(self.decoder.layers, cache.layers):
            k, v = layer.cross_attn.project_kv(memory)  # (n, H, S, Dh)
            width = max(S, lc.cross_k.size(2))
            lc.cross_k = torch.cat([_pad_source(lc.cross_k, width), _pad_source(k, width)])
            lc.cross_v = torch.cat([_pad_source(lc.cross_v, width), _pad_source(v, width)])
            past = lc.self_k.new_zeros(n, *lc.self_k.shape[1:])  # masked: before the new rows' start
            lc.self_k, lc.self_v = torch.cat([lc.self_k, past]), torch.cat([lc.self_v, past])
        start = cache.start if cache.start is not None else memory.new_zeros(rows, dtype=torch.long)
        cache.start = torch.cat([start, start.new_full((n,), cache.length)])

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, V) for every target position at once."""
        src_mask = padding_mask(src)
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

    def num_parameters(self) -> int:
        """Parameters (the frozen key biases included), each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, encoder: nn.Module | None = None) -> Seq2Seq:
    """Validate `config` and build a freshly initialised `Seq2Seq` (on `encoder`, if given).

    Raises:
        ConfigError: an impossible configuration; the message names the field and value.
    """
    config.validate()
    config.require_vocab()
    return Seq2Seq(config, encoder)

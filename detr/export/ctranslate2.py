"""A translation run as a CTranslate2 model, and greedy/beam search run by CTranslate2.

    detr export RUN --to ctranslate2 --out DIR [--quantize int8]
    detr translate RUN --engine ctranslate2 [--quantize int8]

The model is described with CTranslate2's own specification API (`TransformerSpec`: the same
calls its OpenNMT-py and fairseq converters make) and written by it; nothing here writes
CTranslate2's binary format. detr's parts map one to one: fused query/key/value projections,
LayerNorm before (pre-norm) or after (post-norm) each sublayer, the final pre-norm LayerNorm,
embeddings scaled by √d_model plus detr's own position table (sinusoidal or learned), the
output projection. The vocabularies are the subword strings of the run's tokenizer in id order,
so ids survive the round trip; `<s>` starts the decoder, `</s>` ends a sentence, as in detr.

A warm-started run maps too: a pretrained BERT-style encoder (and a BERT2BERT decoder) is a
post-norm Transformer whose embedding is LayerNorm(word + position + segment 0), unscaled, which
is CTranslate2's `layernorm_embedding` with segment 0's row added to every row of the position
table (detr's translation runs feed one segment).

What CTranslate2 cannot do as detr does is refused before anything is written or decoded:
multilingual tags (not yet mapped), a pretrained encoder whose LayerNorm epsilon is not the
decoder's (BERT's 1e-12 beside detr's 1e-5: CTranslate2 has one), GNMT's length penalty
(CTranslate2 divides by length^α), the repetition penalty (it applies it to logits, detr to
log-probabilities), sampling, constraints, ensembles and MBR.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import ctranslate2
import numpy as np
import torch
from ctranslate2.specs import common_spec, transformer_spec
from torch import Tensor, nn

from detr.checkpoint import load_run
from detr.config import DecodeConfig, ModelConfig
from detr.errors import CheckpointError, ConfigError
from detr.export.folder import check_destination, file_digest, is_current, probe, weights_file, write_folder
from detr.export.folder import read_marker as folder_marker
from detr.pretrained import PretrainedEncoder
from detr.rundir import RunDir
from detr.search import Hypothesis
from detr.tokenizer import EOS, PAD, SPECIALS, Tokenizer
from detr.warmstart import PretrainedEmbedding

QUANTIZATIONS = ("float32", "int8", "int8_float32")
FORMAT = "detr-ctranslate2/1"
MODEL_FILES = ("model.bin", "config.json")
BUDGET_SPREAD = 1.5  # beam search: lines whose length limits differ by at most this factor share a call
TOLERANCE = 1e-4  # largest log-probability difference between detr and the conversion, checked before it is kept


def unsupported(config: ModelConfig, tokenizer: Tokenizer) -> list[str]:
    """What in this model CTranslate2's Transformer specification cannot hold (empty: it maps)."""
    problems = []
    if tokenizer.src.languages():
        problems.append("a multilingual run's language tags")
    return problems


def _linear(spec: common_spec.LinearSpec, *layers: nn.Linear) -> None:
    """Set `spec` to `layers` fused along the output dimension (query/key/value into one)."""
    spec.weight = torch.cat([layer.weight.detach() for layer in layers]).float().numpy()
    if layers[0].bias is not None:
        spec.bias = torch.cat([layer.bias.detach() for layer in layers]).float().numpy()


def _norm(spec: common_spec.LayerNormSpec, norm: nn.LayerNorm) -> None:
    spec.gamma = norm.weight.detach().float().numpy()
    spec.beta = norm.bias.detach().float().numpy()


def _inputs(spec: object, embed: nn.Module) -> None:
    """Token embeddings (scaled by √d_model in CTranslate2 as in detr) and detr's position table."""
    _token_table(spec, embed.tokens)
    spec.scale_embeddings = True  # CTranslate2's default, said here because detr depends on it
    spec.position_encodings.encodings = embed.positions.table.detach().float().numpy()


def _token_table(spec: object, tokens: nn.Embedding) -> None:
    """The token embeddings (an encoder's spec holds a list: one table per source feature)."""
    table = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    table.weight = tokens.weight.detach().float().numpy()


def _bert_inputs(spec: object, words: nn.Embedding, positions: nn.Embedding, segments: nn.Embedding,
                 norm: nn.LayerNorm) -> None:
    """BERT's embedding: unscaled words; segment 0's row added to every position; its LayerNorm."""
    _token_table(spec, words)
    spec.scale_embeddings = False
    spec.position_encodings.encodings = (positions.weight + segments.weight[0]).detach().float().numpy()
    _norm(spec.layernorm_embedding, norm)


def _self_attention_and_ffn(spec: object, qkv: tuple[nn.Linear, ...], out: nn.Linear, attn_norm: nn.LayerNorm,
                            w1: nn.Linear, w2: nn.Linear, ff_norm: nn.LayerNorm) -> None:
    """The parts an encoder and a decoder layer share: self-attention and feed-forward, each with its norm."""
    _linear(spec.self_attention.linear[0], *qkv)
    _linear(spec.self_attention.linear[1], out)
    _norm(spec.self_attention.layer_norm, attn_norm)
    _linear(spec.ffn.linear_0, w1)
    _linear(spec.ffn.linear_1, w2)
    _norm(spec.ffn.layer_norm, ff_norm)


def model_spec(model: nn.Module, tokenizer: Tokenizer) -> transformer_spec.TransformerSpec:
    """CTranslate2's description of a detr `Seq2Seq` (weights included): detr's own encoder or a
    pretrained BERT-style one, detr's own decoder or one warm-started from BERT."""
    config: ModelConfig = model.config
    encoder, decoder = model.encoder, model.decoder
    bert = encoder.hf if isinstance(encoder, PretrainedEncoder) else None
    bert_decoder = isinstance(decoder.embed, PretrainedEmbedding)  # warm-started from BERT
    problems = unsupported(config, tokenizer)
    if bert is not None and bert.config.hidden_act != "gelu":
        problems.append(f"a pretrained encoder with hidden_act {bert.config.hidden_act!r} (only gelu)")
    if bert is not None and bert.config.layer_norm_eps != config.layer_norm_eps:
        problems.append(f"a pretrained encoder's LayerNorm epsilon {bert.config.layer_norm_eps:g} beside the "
                        f"decoder's model.layer_norm_eps {config.layer_norm_eps:g} (it has one epsilon)")
    if problems:
        raise ConfigError(f"CTranslate2 cannot hold {'; '.join(problems)}; this run cannot be exported to it")
    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
                  "silu": common_spec.Activation.SWISH}[config.activation]
    pre_norm = config.norm == "pre"
    layers = bert.encoder.layer if bert is not None else encoder.layers
    spec = transformer_spec.TransformerSpec(  # a BERT encoder: post-norm, GELU, whatever the decoder is
        transformer_spec.TransformerEncoderSpec(
            len(layers), bert.config.num_attention_heads if bert is not None else config.n_heads,
            pre_norm=pre_norm and bert is None, layernorm_embedding=bert is not None,
            activation=common_spec.Activation.GELU if bert is not None else activation),
        transformer_spec.TransformerDecoderSpec(len(decoder.layers), config.n_heads, pre_norm=pre_norm,
                                                activation=activation, layernorm_embedding=bert_decoder))
    spec.config.layer_norm_epsilon = config.layer_norm_eps
    if bert is not None:
        embed = bert.embeddings
        _bert_inputs(spec.encoder, embed.word_embeddings, embed.position_embeddings, embed.token_type_embeddings,
                     embed.LayerNorm)
        for layer_spec, layer in zip(spec.encoder.layer, layers):
            attn = layer.attention
            _self_attention_and_ffn(layer_spec, (attn.self.query, attn.self.key, attn.self.value), attn.output.dense,
                                    attn.output.LayerNorm, layer.intermediate.dense, layer.output.dense,
                                    layer.output.LayerNorm)
    else:
        _inputs(spec.encoder, encoder.embed)
        for layer_spec, layer in zip(spec.encoder.layer, layers):
            attn = layer.self_attn
            _self_attention_and_ffn(layer_spec, (attn.q_proj, attn.k_proj, attn.v_proj), attn.out_proj,
                                    layer.attn_block.norm, layer.ff.w1, layer.ff.w2, layer.ff_block.norm)
    if bert_decoder:
        embed = decoder.embed
        _bert_inputs(spec.decoder, embed.tokens, embed.positions, embed.segments, embed.norm)
    else:
        _inputs(spec.decoder, decoder.embed)
    for layer_spec, layer in zip(spec.decoder.layer, decoder.layers):
        attn, cross = layer.self_attn, layer.cross_attn
        _self_attention_and_ffn(layer_spec, (attn.q_proj, attn.k_proj, attn.v_proj), attn.out_proj,
                                layer.self_block.norm, layer.ff.w1, layer.ff.w2, layer.ff_block.norm)
        _linear(layer_spec.attention.linear[0], cross.q_proj)
        _linear(layer_spec.attention.linear[1], cross.k_proj, cross.v_proj)
        _linear(layer_spec.attention.linear[2], cross.out_proj)
        _norm(layer_spec.attention.layer_norm, layer.cross_block.norm)
    if pre_norm:
        if bert is None:
            _norm(spec.encoder.layer_norm, encoder.norm)
        _norm(spec.decoder.layer_norm, decoder.norm)
    spec.decoder.projection.weight = model.output.weight.detach().float().numpy()
    if getattr(model.output, "bias", None) is not None:
        spec.decoder.projection.bias = model.output.bias.detach().float().numpy()
    spec.register_source_vocabulary(vocabulary(tokenizer, "src"))
    spec.register_target_vocabulary(vocabulary(tokenizer, "tgt"))
    return spec


def vocabulary(tokenizer: Tokenizer, side: str) -> list[str]:
    """The subword strings of one side, in id order (specials by their names)."""
    hf = getattr(tokenizer, side).hf
    tokens = [SPECIALS[i] if i < len(SPECIALS) else hf.id_to_token(i) for i in range(hf.get_vocab_size())]
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"the {side} vocabulary has repeated token strings; CTranslate2 needs each once")
    return tokens


def export(run_dir: str | Path, out: str | Path, quantize: str = "float32", weights: str | Path | None = None) -> Path:
    """Write the run (its `model.safetensors`, or `weights`) as a CTranslate2 model directory `out`,
    with the run's tokenizer and a marker saying what it was made from. Written beside `out` and
    renamed into place: a failure leaves no half-written directory.

    Raises:
        ConfigError: an unknown quantization, a run CTranslate2 cannot hold (naming the feature), or an
            `out` that exists and is not an earlier export.
    """
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantize}: choose from {', '.join(QUANTIZATIONS)}")
    out = Path(out)
    check_destination(out)
    run = load_run(run_dir, weights=weights)
    if run.config.task != "translate":
        raise ConfigError(f"{run_dir} is a {run.config.task} run; only translation runs export to CTranslate2")
    spec = model_spec(run.model, run.task.tokenizer)  # refuses what CTranslate2 cannot hold before anything is written

    def save(spec: transformer_spec.TransformerSpec, staging: Path, quantization: str | None) -> None:
        spec.validate()
        spec.optimize(quantization=quantization)
        spec.save(str(staging))

    def fill(staging: Path) -> dict:
        save(spec, staging, None)  # float32 first: the conversion itself is checked without rounding
        difference = _difference(run.model.eval(), run.task.tokenizer, staging)
        if not difference <= TOLERANCE:
            raise ConfigError(f"the CTranslate2 conversion does not reproduce detr's log-probabilities (largest "
                              f"difference {difference:.2g} > {TOLERANCE}); nothing was written")
        if quantize != "float32":  # a spec is optimized once: int8 from a fresh one
            save(model_spec(run.model, run.task.tokenizer), staging, quantize)
        shutil.copyfile(RunDir(run_dir).tokenizer, staging / RunDir(".").tokenizer.name)
        return {"format": FORMAT, "weights_sha256": file_digest(weights_file(run_dir, weights)), "quantize": quantize,
                "max_positions": run.model.config.max_positions, "ctranslate2": ctranslate2.__version__,
                "logp_difference": difference}

    return write_folder(out, fill)


@torch.no_grad()
def _difference(model: nn.Module, tokenizer: Tokenizer, folder: Path) -> float:
    """The largest difference between detr's teacher-forced log-probabilities on `probe`'s batch and
    those CTranslate2 gives the same targets (`score_batch`) with the float32 model in `folder`."""
    src, tgt = probe(model.config)
    logp = model(src, tgt).float().log_softmax(-1)  # (3, 6, V): the tokens after tgt[:, :t+1]
    targets = torch.cat([tgt[:, 1:], torch.full((tgt.size(0), 1), EOS)], dim=1)
    ours = logp.gather(2, targets.unsqueeze(2)).squeeze(2)
    src_tokens, tgt_tokens = vocabulary(tokenizer, "src"), vocabulary(tokenizer, "tgt")
    sources = [[src_tokens[i] for i in row if i != PAD] for row in src.tolist()]
    scored = ctranslate2.Translator(str(folder), compute_type="float32", intra_threads=1).score_batch(
        sources, [[tgt_tokens[i] for i in row] for row in tgt[:, 1:].tolist()])
    theirs = torch.tensor([result.log_probs for result in scored])  # each target token, then </s>
    return float((ours - theirs).abs().max())


def read_marker(folder: Path) -> dict:
    """The export's marker, after checking its files are all there.

    Raises:
        CheckpointError: a partial or corrupt export (one line naming what is missing).
    """
    return folder_marker(folder, MODEL_FILES, "CTranslate2", FORMAT)


def cached_export(run_dir: str | Path, quantize: str, weights: str | Path | None = None) -> Path:
    """The run's CTranslate2 conversion kept in the run directory, made (again) when missing,
    partial, or made from other weights."""
    folder = RunDir(run_dir).engine_cache(f"ctranslate2-{quantize}")
    if is_current(folder, weights_file(run_dir, weights), read_marker):
        return folder
    return export(run_dir, folder, quantize, weights)


class CTranslate2Search:
    """Greedy and beam search by CTranslate2 on an exported model, for a `Translator` to call
    in place of its own (`translator.engine`): source ids in, detr `Hypothesis` lists out.

    It takes a whole chunk of inputs at once and lets CTranslate2 sort and batch them under
    `decode.max_tokens` source tokens, as a direct caller of CTranslate2 would."""

    batches_itself = True

    def __init__(self, folder: str | Path, tokenizer: Tokenizer, threads: int = 0, device: str = "cpu") -> None:
        folder = Path(folder)
        marker = read_marker(folder)
        compute = {"float32": "float32", "int8": "int8", "int8_float32": "int8_float32"}[marker["quantize"]]
        try:
            self.translator = ctranslate2.Translator(str(folder), device=device, compute_type=compute,
                                                     intra_threads=threads)
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"{folder}: CTranslate2 cannot load it ({err}); export it again") from None
        self.src_tokens = vocabulary(tokenizer, "src")
        self.tgt_ids = {token: i for i, token in enumerate(vocabulary(tokenizer, "tgt"))}
        self.max_positions = int(marker["max_positions"])

    def check(self, config: DecodeConfig) -> None:
        """Refuse the decoding options CTranslate2 would not carry out as detr does."""
        if config.beam_size > 1 and config.length_penalty != 0:
            raise ConfigError(f"decode.length_penalty={config.length_penalty}: CTranslate2 divides a beam's score by "
                              f"length^alpha, not GNMT's ((5 + length) / 6)^alpha, so its beams would rank otherwise; "
                              f"use --length-penalty 0 with --engine ctranslate2 (or the torch engine)")
        if config.repetition_penalty != 1.0:
            raise ConfigError("decode.repetition_penalty: CTranslate2 applies it to logits, detr to log-probabilities; "
                              "use the torch engine")
        for name, used in (("mbr", config.mbr), ("anti_lm", config.anti_lm), ("beam_groups", config.beam_groups > 1)):
            if used:
                raise ConfigError(f"decode.{name}: not with --engine ctranslate2; use the torch engine")

    def __call__(self, src: Tensor, config: DecodeConfig, scores: bool = True) -> list[list[Hypothesis]]:
        """Hypotheses for each row of the padded source ids `src` (B, S), best first; greedy's scores
        are NaN with `scores=False` (not asked of CTranslate2)."""
        rows = [[int(i) for i in row if i != PAD] for row in src.tolist()]
        budgets = [max(1, min(int(np.floor(config.max_len_a * (len(r) - 1) + config.max_len_b)),
                              self.max_positions - 1)) for r in rows]
        sources = [[self.src_tokens[i] for i in row] for row in rows]
        if config.beam_size == 1:
            return self._greedy(sources, budgets, config, scores)
        return self._beam(sources, budgets, config)

    def _translate(self, sources: list[list[str]], budget: int, config: DecodeConfig, scores: bool = True) -> list:
        return self.translator.translate_batch(
            sources, max_batch_size=config.max_tokens, batch_type="tokens", beam_size=config.beam_size,
            num_hypotheses=config.nbest, length_penalty=0.0, max_decoding_length=budget,
            min_decoding_length=config.min_len, no_repeat_ngram_size=config.no_repeat_ngram, max_input_length=0,
            return_scores=scores)

    def _ids(self, tokens: list[str]) -> list[int]:
        return [self.tgt_ids[t] for t in tokens if self.tgt_ids[t] != EOS]

    def _greedy(self, sources: list[list[str]], budgets: list[int], config: DecodeConfig,
                scores: bool) -> list[list[Hypothesis]]:
        """Greedy search in one call up to the largest budget: a greedy output's first n tokens do not
        depend on the limit, so a line that ran past its own budget is cut there, and its score (the
        log-probabilities of the tokens kept) is asked of CTranslate2 again when `scores`."""
        results = self._translate(sources, max(budgets), config, scores)
        cut = [[token for token in r.hypotheses[0] if token != "</s>"][:budget] for r, budget in zip(results, budgets)]
        out = [Hypothesis(self._ids(tokens), float(r.scores[0]) if scores else math.nan)
               for tokens, r in zip(cut, results)]
        # At its budget detr ends a line without </s> (and without its log-probability): rescore those.
        over = [j for j, (h, budget) in enumerate(zip(out, budgets)) if len(h.tokens) >= budget]
        if over and scores:
            scored = self.translator.score_batch([sources[j] for j in over], [cut[j] for j in over],
                                                 max_batch_size=config.max_tokens, batch_type="tokens")
            for j, score in zip(over, scored):
                out[j] = Hypothesis(out[j].tokens, float(sum(score.log_probs[:-1])))  # the last is </s>'s
        return [[h] for h in out]

    def _beam(self, sources: list[list[str]], budgets: list[int], config: DecodeConfig) -> list[list[Hypothesis]]:
        """Beam search with each line's own length limit, in a few calls instead of one per limit.

        Lines go into groups of nearby limits (the largest at most `BUDGET_SPREAD` times the
        smallest), and a group is searched at its smallest limit. A line's result there is also its
        result at its own, larger limit when every returned hypothesis ended with </s> (is shorter
        than the limit): with no length penalty a score only falls as a hypothesis grows, the
        hypotheses the shorter search cut at its limit ranked below all those returned, and so does
        everything a longer search grows from the same beams. The other lines are searched again at
        their own limits, one call per limit, so no line is searched more than twice."""
        out: list[list[Hypothesis]] = [[] for _ in sources]
        order = sorted(range(len(sources)), key=budgets.__getitem__)
        again: list[int] = []
        for spread in (BUDGET_SPREAD, 1.0):
            for group in _spread_groups(order, budgets, spread):
                limit = budgets[group[0]]
                for j, result in zip(group, self._translate([sources[j] for j in group], limit, config)):
                    if budgets[j] > limit and any(len(tokens) >= limit for tokens in result.hypotheses):
                        again.append(j)
                    else:
                        out[j] = [Hypothesis(self._ids(tokens), float(score))
                                  for tokens, score in zip(result.hypotheses, result.scores)]
            order, again = sorted(again, key=budgets.__getitem__), []
        return out


def _spread_groups(order: list[int], budgets: list[int], spread: float) -> list[list[int]]:
    """`order` (indices sorted by budget) cut into runs whose largest budget is at most `spread`
    times their smallest."""
    groups: list[list[int]] = []
    for j in order:
        if groups and budgets[j] <= spread * budgets[groups[-1][0]]:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups

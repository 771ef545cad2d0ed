"""A translation run as a Hugging Face `MarianMTModel` folder, and a Marian folder as a detr run.

    detr export RUN --to huggingface --out DIR     # transformers loads DIR with MarianMTModel
    detr import huggingface DIR --to RUN           # a local Marian (OPUS-MT style) model as a detr run

Marian is the class `transformers` ships whose layout is detr's post-norm Transformer: LayerNorm
after each sublayer, embeddings scaled by √d_model, fixed sinusoidal positions, biases on every
projection, one weight matrix shared by the embeddings and the output projection (or not).
Its sinusoids are the paper's, laid out differently: detr interleaves sine and cosine columns
(2k, 2k+1), Marian puts every sine first and every cosine after. Permuting the model dimension
of every weight that reads or writes the residual stream turns one layout into the other
exactly (LayerNorm, attention and the feed-forward layer commute with such a permutation; the
heads' own dimensions do not move), so no weight is approximated either way.

What does not map is refused, naming it: pre-norm runs (`transformers` ships no pre-norm class
with these positions: M2M100 and NLLB use fairseq's sinusoid frequencies), learned positions,
another LayerNorm epsilon, a pretrained BERT-style encoder.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, processors
from tokenizers.models import Unigram
from torch import Tensor

from detr.checkpoint import load_run, save_weights
from detr.config import Config, DataConfig, ModelConfig, TrainConfig
from detr.errors import CheckpointError, ConfigError, first_line
from detr.export.folder import MARKER, check_destination, file_digest, probe, weights_file, write_folder
from detr.export.folder import read_marker as folder_marker
from detr.model import Seq2Seq
from detr.rundir import RunDir
from detr.tokenizer import BOS, EOS, PAD, SPECIALS, Subwords, Tokenizer

FORMAT = "detr-huggingface/1"
DETR_TOKENIZER = "detr-tokenizer.json"  # the run's own tokenizer, for `detr import` to take back unchanged
TOLERANCE = 1e-4  # largest logit difference between detr and the written folder, checked before it is kept

# detr module ↔ Marian module; {i} a layer index, {p} an attention projection.
_ATTENTION = "(?P<p>[qkv]_proj|out_proj)"
_PAIRS = [
    ("encoder.embed.tokens", "model.encoder.embed_tokens"),
    ("decoder.embed.tokens", "model.decoder.embed_tokens"),
    ("output", "lm_head"),
    ("encoder.layers.{i}.self_attn.{p}", "model.encoder.layers.{i}.self_attn.{p}"),
    ("encoder.layers.{i}.attn_block.norm", "model.encoder.layers.{i}.self_attn_layer_norm"),
    ("decoder.layers.{i}.self_attn.{p}", "model.decoder.layers.{i}.self_attn.{p}"),
    ("decoder.layers.{i}.self_block.norm", "model.decoder.layers.{i}.self_attn_layer_norm"),
    ("decoder.layers.{i}.cross_attn.{p}", "model.decoder.layers.{i}.encoder_attn.{p}"),
    ("decoder.layers.{i}.cross_block.norm", "model.decoder.layers.{i}.encoder_attn_layer_norm"),
] + [pair for side in ("encoder", "decoder") for pair in (
    (f"{side}.layers.{{i}}.ff.w1", f"model.{side}.layers.{{i}}.fc1"),
    (f"{side}.layers.{{i}}.ff.w2", f"model.{side}.layers.{{i}}.fc2"),
    (f"{side}.layers.{{i}}.ff_block.norm", f"model.{side}.layers.{{i}}.final_layer_norm"),
)]


def _pattern(module: str) -> re.Pattern:
    body = re.escape(module).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", _ATTENTION)
    return re.compile(body + r"\.(?P<param>weight|bias)")


_TO_MARIAN = [(_pattern(detr), marian) for detr, marian in _PAIRS]
_TO_DETR = [(_pattern(marian), detr) for detr, marian in _PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            parts = match.groupdict()
            return template.format(i=parts.get("i"), p=parts.get("p")) + "." + parts["param"]
    return None


def marian_name(detr_name: str) -> str | None:
    """The Marian parameter that holds detr's parameter `detr_name` (None: none does)."""
    return _rename(detr_name, _TO_MARIAN)


def detr_name(marian_name: str) -> str | None:
    """The detr parameter that holds Marian's parameter `marian_name` (None: none does)."""
    if marian_name == "model.shared.weight":
        return "encoder.embed.tokens.weight"
    return _rename(marian_name, _TO_DETR)


def residual_axis(marian_name: str) -> int | None:
    """Which axis of a Marian parameter runs along the residual stream (the model dimension that the
    position layouts permute); None: no axis does (a query/key/value or first feed-forward bias)."""
    module, param = marian_name.rsplit(".", 2)[-2:]
    if module in ("embed_tokens", "shared", "lm_head", "embed_positions"):
        return 1
    if module in ("q_proj", "k_proj", "v_proj", "fc1"):
        return 1 if param == "weight" else None
    if module in ("out_proj", "fc2") or module.endswith("layer_norm"):
        return 0
    raise ValueError(f"no residual axis known for {marian_name}")


def marian_order(d_model: int) -> Tensor:
    """Marian's model dimension m holds detr's dimension `order[m]`: sines (detr's even columns) first."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def unsupported(config: ModelConfig) -> list[str]:
    """What in this model Marian's layout cannot hold (empty: it maps exactly)."""
    problems = []
    if config.pretrained is not None:
        problems.append("model.pretrained (a BERT-style encoder)")
    if config.norm != "post":
        problems.append(f"model.norm={config.norm} (Marian puts LayerNorm after each sublayer, and transformers "
                        f"ships no pre-norm class with detr's sinusoidal positions)")
    if config.positional != "sinusoidal":
        problems.append(f"model.positional={config.positional} (Marian's positions are fixed sinusoids)")
    if config.layer_norm_eps != 1e-5:
        problems.append(f"model.layer_norm_eps={config.layer_norm_eps} (Marian's LayerNorm uses 1e-5)")
    return problems


def marian_config(config: ModelConfig) -> object:
    """The `MarianConfig` of a detr model: token ids are detr's (<pad> 0, <s> 1 starts the decoder, </s> 2)."""
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=config.src_vocab_size, decoder_vocab_size=config.tgt_vocab_size, d_model=config.d_model,
        encoder_layers=config.n_layers, decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.n_heads, decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff, activation_function=config.activation,
        dropout=config.dropout, attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout, max_position_embeddings=config.max_positions,
        scale_embedding=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
        forced_eos_token_id=None, share_encoder_decoder_embeddings=config.share_embeddings,
        tie_word_embeddings=config.share_embeddings or config.tie_output)


def to_marian(model: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Marian's parameters `names` from a detr `Seq2Seq`, the residual axis permuted to Marian's layout."""
    ours = model.state_dict()
    order = marian_order(model.config.d_model)
    state = {}
    for name in names:
        if name == "final_logits_bias":  # detr's output projection has no bias
            state[name] = torch.zeros(1, model.config.tgt_vocab_size)
            continue
        if name.endswith("embed_positions.weight"):
            side = model.encoder if ".encoder." in name else model.decoder
            tensor = side.embed.positions.table
        else:
            source = detr_name(name)
            if source not in ours:
                raise ConfigError(f"the Marian parameter {name} has no counterpart in this detr model")
            tensor = ours[source]
        axis = residual_axis(name)
        state[name] = (tensor if axis is None else tensor.index_select(axis, order)).detach().float().clone()
    return state


@torch.no_grad()
def logit_difference(model: torch.nn.Module, marian: torch.nn.Module) -> float:
    """The largest difference between detr's and Marian's logits on `probe`'s batch."""
    src, tgt = probe(model.config)
    ours = model.eval()(src, tgt)
    theirs = marian.eval()(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt).logits
    return float((ours - theirs).abs().max())


def hf_tokenizer_json(tokenizer: Tokenizer, side: str) -> str:
    """One side's vocabulary as a `tokenizers` file for `PreTrainedTokenizerFast`: detr's subwords with
    the leading space detr adds (and takes off when decoding) and, on the source side, the </s> that
    ends detr's encoder input."""
    hf = HFTokenizer.from_str(getattr(tokenizer, side).hf.to_str())
    # detr puts one space before every text (even one that starts with a space); ByteLevel's own
    # add_prefix_space adds one only where none is.
    space = normalizers.Prepend(" ")
    hf.normalizer = space if hf.normalizer is None else normalizers.Sequence([hf.normalizer, space])
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    if side == "src":
        hf.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return hf.to_str()


def _write_tokenizer(tokenizer: Tokenizer, run_dir: Path, folder: Path) -> None:
    specials = {"pad_token": SPECIALS[PAD], "bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS],
                "unk_token": SPECIALS[3], "tokenizer_class": "PreTrainedTokenizerFast"}
    sides = [("src", folder)] + ([] if tokenizer.joint else [("tgt", folder / "target")])
    for side, where in sides:
        where.mkdir(exist_ok=True)
        (where / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer, side), encoding="utf-8")
        (where / "tokenizer_config.json").write_text(json.dumps(specials, indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(RunDir(run_dir).tokenizer, folder / DETR_TOKENIZER)


@dataclass
class Exported:
    folder: Path
    logit_difference: float  # detr against the folder as transformers loads it, on a probe batch


def export(run_dir: str | Path, out: str | Path, weights: str | Path | None = None) -> Exported:
    """Write the run as a folder `MarianMTModel.from_pretrained` loads (safetensors weights, config,
    generation config, tokenizer), after checking that the folder, loaded back, gives detr's logits.
    Written beside `out` and renamed into place.

    Raises:
        ConfigError: a run Marian cannot hold (naming what), or an `out` that exists and is not an
            earlier export.
    """
    import transformers
    from transformers import MarianMTModel

    transformers.logging.disable_progress_bar()  # its "Loading weights" bars would print on the caller's stderr
    out = Path(out)
    check_destination(out)
    run = load_run(run_dir, weights=weights)
    if run.config.task != "translate":
        raise ConfigError(f"{run_dir} is a {run.config.task} run; only translation runs export to Hugging Face")
    config = run.model.config
    problems = unsupported(config)
    if problems:
        raise ConfigError(f"Marian (the Hugging Face class with detr's layout) cannot hold {'; '.join(problems)}; "
                          f"this run cannot be exported to Hugging Face")
    marian = MarianMTModel(marian_config(config))
    marian.load_state_dict(to_marian(run.model, list(marian.state_dict())), strict=True)
    marian.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        num_beams=run.config.decode.beam_size, max_length=config.max_positions)
    checked: list[float] = []

    def fill(staging: Path) -> dict:
        marian.save_pretrained(staging)
        _write_tokenizer(run.task.tokenizer, Path(run_dir), staging)
        checked.append(logit_difference(run.model, MarianMTModel.from_pretrained(staging)))
        if not checked[0] <= TOLERANCE:
            raise ConfigError(f"the Hugging Face export does not reproduce detr's logits (largest difference "
                              f"{checked[0]:.2g} > {TOLERANCE}); nothing was written")
        return {"format": FORMAT, "weights_sha256": file_digest(weights_file(run_dir, weights)),
                "logit_difference": checked[0]}

    write_folder(out, fill)
    return Exported(out, checked[0])


def read_marker(folder: Path) -> dict:
    """The marker of a detr Hugging Face export, checking its files are there.

    Raises:
        CheckpointError: a partial or corrupt export (naming what is missing).
    """
    return folder_marker(folder, ("config.json", "model.safetensors", "tokenizer.json"), "Hugging Face", FORMAT)


# ---------------------------------------------------------------------------------------------- import


@dataclass
class Imported:
    run_dir: Path
    logit_difference: float  # on the probe batch, over the vocabulary entries both models have
    extra_pad: bool  # the run has one more vocabulary entry than the Marian model: detr's <pad>


def _spm_tokenizer(spm_file: Path, pieces: list[str]) -> object:
    """A `tokenizers` Unigram tokenizer with the normalisation of SentencePiece model `spm_file` (the
    conversion transformers applies to it) over `pieces` in id order; a piece the SentencePiece model
    lacks gets a score below all of its own, so it is only taken where nothing else fits."""
    from transformers.convert_slow_tokenizer import SpmConverter

    class Shim:  # what SpmConverter reads of a slow tokenizer
        vocab_file, add_prefix_space, legacy = str(spm_file), True, True

    try:
        converter = SpmConverter(Shim())
    except ImportError as err:
        raise ConfigError(f"reading {spm_file.name} needs protobuf ({err}); pip install protobuf") from None
    except Exception as err:  # a damaged file: protobuf raises its own DecodeError
        raise CheckpointError(f"{spm_file}: not a readable SentencePiece model ({err})") from None
    scores = {p.piece: p.score for p in converter.proto.pieces}
    floor = min(scores.values(), default=0.0) - 100.0
    hf = HFTokenizer(Unigram([(piece, scores.get(piece, floor)) for piece in pieces], unk_id=SPECIALS.index("<unk>")))
    hf.normalizer = converter.normalizer(converter.proto)
    hf.pre_tokenizer = converter.pre_tokenizer("▁", True)
    hf.decoder = converter.decoder("▁", True)
    return hf


def _marian_vocabulary(folder: Path, config: object) -> tuple[Tokenizer, list[int | None]]:
    """An OPUS-MT folder's tokenizer (vocab.json, source.spm, target.spm) as detr's, and for each detr id
    the Marian id it stands for (None: detr's <pad>, which Marian does not have apart from its start)."""
    vocab_file = folder / "vocab.json"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{vocab_file}: unreadable ({err})") from None
    by_id = {i: piece for piece, i in vocab.items()}
    if sorted(by_id) != list(range(len(vocab))):
        raise CheckpointError(f"{vocab_file}: ids are not 0..{len(vocab) - 1}, each once")
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{vocab_file}: {len(vocab)} entries, but config.json says "
                              f"vocab_size={config.vocab_size}")
    unk = vocab.get("<unk>")
    if unk is None:
        raise CheckpointError(f"{vocab_file}: no <unk> entry")
    start, pad, eos = config.decoder_start_token_id, config.pad_token_id, config.eos_token_id
    # detr's ids: <pad>, <s> (Marian's decoder start), </s>, <unk>, then the rest in Marian's order.
    first = [None if start == pad else pad, start, eos, unk]
    mapping = first + [i for i in range(len(vocab)) if i not in first]
    pieces = SPECIALS + [by_id[i] for i in mapping[len(SPECIALS):]]
    sides = []
    for name in ("source.spm", "target.spm"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: not found (an OPUS-MT folder has source.spm and target.spm)")
        sides.append(Subwords(_spm_tokenizer(folder / name, pieces)))
    return Tokenizer(*sides), mapping


def detr_config(config: object) -> ModelConfig:
    """The detr `ModelConfig` of a `MarianConfig` (vocabulary sizes left to the caller).

    Raises:
        ConfigError: a Marian setting detr's model has no counterpart for, naming it.
    """
    problems = []
    activation = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}.get(config.activation_function)
    if activation is None:
        problems.append(f"activation_function={config.activation_function} (detr has relu, gelu and silu/swish)")
    if not config.scale_embedding:
        problems.append("scale_embedding=false (detr scales embeddings by √d_model)")
    for detr_key, enc, dec in (("n_heads", "encoder_attention_heads", "decoder_attention_heads"),
                               ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim")):
        if getattr(config, enc) != getattr(config, dec):
            problems.append(f"{enc}={getattr(config, enc)} differs from {dec}={getattr(config, dec)} "
                            f"(detr's model.{detr_key} is one number)")
    if config.share_encoder_decoder_embeddings and not config.tie_word_embeddings:
        problems.append("shared encoder/decoder embeddings with an untied output projection")
    if problems:
        raise ConfigError(f"detr cannot hold this Marian model: {'; '.join(problems)}")
    return ModelConfig(
        d_model=config.d_model, n_heads=config.encoder_attention_heads, n_layers=config.encoder_layers,
        n_decoder_layers=config.decoder_layers, d_ff=config.encoder_ffn_dim, dropout=config.dropout,
        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
        activation=activation, norm="post", positional="sinusoidal", max_positions=config.max_position_embeddings,
        share_embeddings=config.share_encoder_decoder_embeddings, tie_output=config.tie_word_embeddings,
        layer_norm_eps=1e-5)


def from_marian(marian: torch.nn.Module, model: torch.nn.Module, mapping: list[int | None]) -> dict[str, Tensor]:
    """detr's parameters from a `MarianMTModel`: the residual axis permuted back to detr's layout and
    vocabulary rows reordered to detr's ids (`mapping`; a None row is zero)."""
    theirs = marian.state_dict()
    if bool(theirs["final_logits_bias"].any()):
        raise ConfigError("detr cannot hold this Marian model: its final_logits_bias is not zero (detr's output "
                          "projection has no bias)")
    back = torch.argsort(marian_order(model.config.d_model))
    rows = torch.tensor([0 if i is None else i for i in mapping])
    state = {}
    for name in model.state_dict():
        source = marian_name(name)
        if source is None or source not in theirs:
            raise ConfigError(f"detr's parameter {name} has no counterpart in this Marian model")
        tensor = theirs[source].detach().float()
        axis = residual_axis(source)
        if axis is not None:
            tensor = tensor.index_select(axis, back)
        if source.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = tensor.index_select(0, rows)
            tensor[[j for j, i in enumerate(mapping) if i is None]] = 0.0
        state[name] = tensor.contiguous()
    return state


def import_marian(folder: str | Path, run_dir: str | Path) -> Imported:
    """Turn a local Marian folder (`MarianMTModel` weights and config; a detr export's tokenizer, or an
    OPUS-MT tokenizer: vocab.json, source.spm, target.spm) into a detr run directory that translates
    and, with `train.init_from`, trains on. Checked against Marian's logits before it is kept.

    Raises:
        CheckpointError: missing or unreadable files; ConfigError: a model detr cannot hold (naming
            what), or a `run_dir` that already holds a run.
    """
    import transformers
    from transformers import MarianConfig, MarianMTModel

    transformers.logging.disable_progress_bar()
    folder, run_dir = Path(folder), Path(run_dir)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}/config.json: not found (is {folder} a Hugging Face model folder?)")
    if RunDir(run_dir).holds_run() or RunDir(run_dir).config.is_file():
        raise ConfigError(f"--to: {run_dir} already holds a run; choose a new directory")
    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        hf_config = MarianConfig.from_pretrained(folder)
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder}/config.json: not a readable model config ({first_line(err)})") from None
    if kind != "marian":
        raise ConfigError(f"{folder}: a {kind} model; detr imports Marian (OPUS-MT style) models")
    config = detr_config(hf_config)
    if (folder / MARKER).is_file() or (folder / DETR_TOKENIZER).is_file():
        read_marker(folder)  # a detr export: complete, or refused
        tokenizer = Tokenizer.load(folder / DETR_TOKENIZER)
        mapping: list[int | None] = list(range(tokenizer.tgt.vocab_size))
        if (hf_config.pad_token_id, hf_config.decoder_start_token_id, hf_config.eos_token_id) != (PAD, BOS, EOS):
            raise ConfigError(f"{folder}: its special token ids differ from the detr tokenizer's in it")
    else:
        tokenizer, mapping = _marian_vocabulary(folder, hf_config)
    config = config.with_vocab(tokenizer.src.vocab_size, tokenizer.tgt.vocab_size)
    try:
        marian = MarianMTModel.from_pretrained(folder).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: transformers cannot load the weights ({first_line(err)})") from None
    model = Seq2Seq(config).eval()
    model.load_state_dict(from_marian(marian, model, mapping), strict=True)
    difference = _import_difference(model, marian, mapping)
    if not difference <= TOLERANCE:
        raise ConfigError(f"the imported model does not reproduce Marian's logits (largest difference "
                          f"{difference:.2g} > {TOLERANCE}); nothing was written")
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run.tokenizer)
    tokenizer = Tokenizer.load(run.tokenizer)  # its fingerprint as loaded (a converted vocabulary may serialise anew)
    save_weights(model, run.model, tokenizer.fingerprint())
    # Set for fine-tuning on: `detr train RUN/config.yaml --run_dir NEW --data.train ...` starts from these
    # weights with this tokenizer, at a fine-tuning learning rate, for a few epochs (flags change any of it).
    train = TrainConfig(init_from=str(run.model.resolve()), max_epochs=5, lr=1e-4, warmup_steps=500)
    data = DataConfig(tokenizer=str(run.tokenizer.resolve()), max_len=min(256, config.max_positions))
    whole = Config(task="translate", run_dir=str(run_dir), model=config, data=data, train=train)
    whole.decode.beam_size = int(getattr(marian.generation_config, "num_beams", None) or 1)
    whole.save(run.config)  # last: a run directory without config.yaml is not a run
    return Imported(run_dir, difference, mapping[PAD] is None)


@torch.no_grad()
def _import_difference(model: torch.nn.Module, marian: torch.nn.Module, mapping: list[int | None]) -> float:
    """The largest logit difference on `probe`'s batch, ids translated to Marian's, over shared entries."""
    src, tgt = probe(model.config)
    to_marian_ids = torch.tensor([marian.config.pad_token_id if i is None else i for i in mapping])
    ours = model(src, tgt)
    theirs = marian(input_ids=to_marian_ids[src], attention_mask=src != PAD,
                    decoder_input_ids=to_marian_ids[tgt]).logits
    kept = [j for j, i in enumerate(mapping) if i is not None]
    return float((ours[..., kept] - theirs[..., to_marian_ids[kept]]).abs().max())

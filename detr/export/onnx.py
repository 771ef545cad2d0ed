"""A translation run as ONNX graphs, and detr's greedy and beam search computed by ONNX Runtime.

    detr export RUN --to onnx --out DIR
    detr translate RUN --engine onnxruntime

Three graphs, exported from detr's own modules by PyTorch's exporter (`torch.onnx.export` with
`dynamo=True`; batch, source length and decoded length are dynamic):

    encoder.onnx   src (B, S) ids                               → memory (B, S, D)
    cross.onnx     memory (B, S, D)                             → cross_k, cross_v (B, L, H, S, Dh)
    step.onnx      tokens (B, 1), src_mask (B, S), past_k, past_v (B, L, H, T, Dh), cross_k, cross_v
                                                                → logits (B, V), next_k, next_v (B, L, H, T+1, Dh)

Keys and values of every layer travel stacked, batch first, so that the search's cache holds them
as one tensor each that it reorders (beam search) with one index_select, with no copying per step.

The runner is detr's own search (`detr.search.greedy`, `beam_search`) over an `OnnxModel` that
stands in for the PyTorch model: the same code chooses tokens, keeps and reorders the key/value
cache, applies the length penalty and the other decoding options; only the arithmetic runs in ONNX
Runtime. Sampling, constraints, ensembles, MBR and `--alignment` stay with the torch engine.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn
from torch.export import Dim

from detr.checkpoint import load_run
from detr.config import DecodeConfig, ModelConfig
from detr.errors import CheckpointError, ConfigError
from detr.export.folder import check_destination, file_digest, is_current, probe, weights_file, write_folder
from detr.export.folder import read_marker as folder_marker
from detr.layers import LayerCache
from detr.model import KVCache, Seq2Seq, padding_mask
from detr.rundir import RunDir
from detr.search import Hypothesis, beam_search, greedy
from detr.tokenizer import BOS, EOS, PAD

FORMAT = "detr-onnx/1"
GRAPHS = ("encoder.onnx", "cross.onnx", "step.onnx")
TOLERANCE = 1e-4  # largest log-probability difference between detr and the graphs, checked before they are kept


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> Tensor:
        return self.model.encode(src)


class CrossGraph(nn.Module):
    """Every decoder layer's cross-attention keys and values of the memory, stacked (B, L, H, S, Dh)."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        kv = [layer.cross_attn.project_kv(memory) for layer in self.model.decoder.layers]
        return torch.stack([k for k, _ in kv], dim=1), torch.stack([v for _, v in kv], dim=1)


class StepGraph(nn.Module):
    """One decoder step through detr's `Decoder` with a `KVCache` made of the stacked inputs."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, src_mask: Tensor, past_k: Tensor, past_v: Tensor, cross_k: Tensor,
                cross_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        layers = range(past_k.size(1))
        cache = KVCache([LayerCache(past_k[:, i], past_v[:, i], cross_k[:, i], cross_v[:, i]) for i in layers],
                        length=past_k.size(3))
        logits = self.model.decode(tokens, None, src_mask[:, None, None, :], cache)[:, -1]
        return (logits, torch.stack([lc.self_k for lc in cache.layers], dim=1),
                torch.stack([lc.self_v for lc in cache.layers], dim=1))


def _example(model: Seq2Seq) -> tuple[Tensor, ...]:
    """Inputs to trace the graphs with (two sentences, one padded; two past positions)."""
    config: ModelConfig = model.config
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]]) % config.src_vocab_size
    layer = model.decoder.layers[0].self_attn
    past = torch.zeros(2, len(model.decoder.layers), layer.n_heads, 2, layer.d_head)
    return src, past


def _export_graphs(model: Seq2Seq, folder: Path) -> None:
    src, past = _example(model)
    limit = model.config.max_positions
    batch, src_len, done = Dim("batch", min=1), Dim("src_len", min=1, max=limit), Dim("past", min=0, max=limit - 1)
    memory = model.encode(src)
    cross_k, cross_v = CrossGraph(model)(memory)
    tokens, mask = torch.full((2, 1), BOS), src != PAD
    graphs = [
        (EncoderGraph(model), (src,), {"src": {0: batch, 1: src_len}}, ["src"], ["memory"]),
        (CrossGraph(model), (memory,), {"memory": {0: batch, 1: src_len}}, ["memory"], ["cross_k", "cross_v"]),
        # Two tensors for the two pasts: one passed twice would become one graph input.
        (StepGraph(model), (tokens, mask, past, past.clone(), cross_k, cross_v),
         {"tokens": {0: batch}, "src_mask": {0: batch, 1: src_len}, "past_k": {0: batch, 3: done},
          "past_v": {0: batch, 3: done}, "cross_k": {0: batch, 3: src_len}, "cross_v": {0: batch, 3: src_len}},
         ["tokens", "src_mask", "past_k", "past_v", "cross_k", "cross_v"], ["logits", "next_k", "next_v"]),
    ]
    with _quiet():
        for (module, inputs, shapes, names, outputs), name in zip(graphs, GRAPHS):
            torch.onnx.export(module.eval(), inputs, str(folder / name), dynamo=True, dynamic_shapes=shapes,
                              input_names=names, output_names=outputs, verbose=False, external_data=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's chatter kept off the caller's terminal: its progress lines (stdout), its
    optimizer's INFO logs, a warning per torchvision operator it lacks, deprecation warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export(run_dir: str | Path, out: str | Path, weights: str | Path | None = None) -> Path:
    """Write the run as ONNX graphs in `out` (with its tokenizer and a marker), after checking that
    ONNX Runtime, greedy-decoding a probe batch through them, gives detr's log-probabilities.

    Raises:
        ConfigError: a run that is not a translation run (warm-started ones export: the graphs trace
            their pretrained embeddings), the graphs disagreeing with detr, or an `out` that exists
            and is not an earlier export.
    """
    out = Path(out)
    check_destination(out)
    run = load_run(run_dir, weights=weights)
    if run.config.task != "translate":
        raise ConfigError(f"{run_dir}: only translation runs export to ONNX")
    model = run.model.eval()

    def fill(staging: Path) -> dict:
        with torch.no_grad():
            _export_graphs(model, staging)
        shutil.copyfile(RunDir(run_dir).tokenizer, staging / RunDir(".").tokenizer.name)
        marker = {"format": FORMAT, "weights_sha256": file_digest(weights_file(run_dir, weights)),
                  "max_positions": model.config.max_positions, "tgt_vocab_size": model.config.tgt_vocab_size}
        difference = _difference(model, OnnxModel(staging, marker))
        if not difference <= TOLERANCE:
            raise ConfigError(f"the ONNX graphs do not reproduce detr's log-probabilities (largest difference "
                              f"{difference:.2g} > {TOLERANCE}); nothing was written")
        return {**marker, "logp_difference": difference}

    return write_folder(out, fill)


@torch.no_grad()
def _difference(model: Seq2Seq, graphs: OnnxModel) -> float:
    """The largest log-probability difference over four greedy steps on a probe batch."""
    src, _ = probe(model.config)
    mask = padding_mask(src)
    caches, memories = [model.new_cache(), graphs.new_cache()], [model.encode(src, mask), graphs.encode(src, mask)]
    last, worst = torch.full((3, 1), BOS), 0.0
    for _ in range(4):
        ours, theirs = (m.decode(last, memory, mask, cache)[:, -1].log_softmax(-1)
                        for m, memory, cache in zip((model, graphs), memories, caches))
        worst = max(worst, float((ours - theirs).abs().max()))
        last = ours.argmax(-1, keepdim=True)
    return worst


def read_marker(folder: Path) -> dict:
    """The export's marker, after checking its graphs are all there.

    Raises:
        CheckpointError: a partial or corrupt export (one line naming what is missing).
    """
    return folder_marker(folder, GRAPHS, "ONNX", FORMAT)


def cached_export(run_dir: str | Path, weights: str | Path | None = None) -> Path:
    """The run's ONNX graphs kept in the run directory, made (again) when missing, partial, or made
    from other weights."""
    folder = RunDir(run_dir).engine_cache("onnx")
    if is_current(folder, weights_file(run_dir, weights), read_marker):
        return folder
    return export(run_dir, folder, weights)


class _Config:
    def __init__(self, max_positions: int) -> None:
        self.max_positions = max_positions


class OnnxModel:
    """The part of `Seq2Seq` detr's search calls (`encode`, `new_cache`, `decode`, `config.max_positions`),
    computed by ONNX Runtime sessions on the exported graphs."""

    def __init__(self, folder: str | Path, marker: dict | None = None, threads: int = 0) -> None:
        folder = Path(folder)
        marker = marker or read_marker(folder)
        self.config = _Config(int(marker["max_positions"]))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.encoder, self.cross, self.step = (
                onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
                for name in GRAPHS)
        except Exception as err:  # onnxruntime raises its own exception types for a damaged graph
            raise CheckpointError(f"{folder}: ONNX Runtime cannot load the graphs ({err}); export it again") from None

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return torch.from_numpy(self.encoder.run(None, {"src": src.numpy()})[0])

    def new_cache(self) -> KVCache:
        return KVCache()

    def decode(self, tokens: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, 1, V) of the next token after `tokens` (B, 1); `cache` grows by one position.
        The cache holds one `LayerCache` with every layer's keys/values stacked (B, L, H, ·, Dh)."""
        if not cache.layers:  # the first step: the memory's cross-attention keys/values, once
            cross_k, cross_v = (torch.from_numpy(a) for a in self.cross.run(None, {"memory": _array(memory)}))
            cache.layers = [LayerCache(None, None, cross_k, cross_v)]
        stacked = cache.layers[0]
        if stacked.self_k is None:
            B, L, H, _, Dh = stacked.cross_k.shape
            past_k = past_v = np.zeros((B, L, H, 0, Dh), dtype=np.float32)
        else:
            past_k, past_v = _array(stacked.self_k), _array(stacked.self_v)
        logits, next_k, next_v = self.step.run(None, {
            "tokens": _array(tokens), "src_mask": _array(src_mask.reshape(tokens.size(0), -1)),
            "past_k": past_k, "past_v": past_v, "cross_k": _array(stacked.cross_k),
            "cross_v": _array(stacked.cross_v)})
        stacked.self_k, stacked.self_v = torch.from_numpy(next_k), torch.from_numpy(next_v)
        cache.length += tokens.size(1)
        return torch.from_numpy(logits)[:, None, :]


def _array(tensor: Tensor) -> np.ndarray:
    """A tensor as the contiguous array ONNX Runtime reads (no copy when it already is one)."""
    return np.ascontiguousarray(tensor.numpy())


class OnnxSearch:
    """detr's greedy and beam search over the ONNX graphs, for a `Translator` to call in place of its
    own (`translator.engine`): source ids in, `Hypothesis` lists out."""

    batches_itself = False  # detr's own search: detr's batches

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        self.model = OnnxModel(folder, threads=threads)

    def check(self, config: DecodeConfig) -> None:
        if config.mbr:
            raise ConfigError("decode.mbr: not with --engine onnxruntime; use the torch engine")

    def __call__(self, src: Tensor, config: DecodeConfig, scores: bool = True) -> list[list[Hypothesis]]:
        if config.beam_size == 1:
            return [[h] for h in greedy([self.model], src, config)]
        return beam_search([self.model], src, config)

"""Decoding speed: detr (float32, int8, its search on ONNX Runtime), detr's CTranslate2 conversion
(float32, int8), Hugging Face `generate` (MarianMT) and CTranslate2 on that Marian model; same
shape, same run.

The paper-base shape (d_model 512, 8 heads, 6+6 layers, d_ff 2048, 32k shared vocabulary),
random weights, 30 source tokens per sentence and exactly 30 output tokens (minimum =
maximum length), greedy and beam 4, batch 1 and 32. Reports generated tokens per second
(sentences × 30 ÷ seconds, the median over `--repeat` rounds; in each round every engine runs in a
process of its own, one timed run per point after a warm-up, so engines never share a process and
drift of the machine's speed hits them alike), the sizes on disk, and each engine's peak memory.

    pip install "torch==2.13.0" -e ".[bench,export]"   # CTranslate2; transformers is a dependency of detr
    python benchmarks/decode_speed.py [--threads 2] [--repeat 3] [--device cpu] [--skip "hf,ct2"]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ctranslate2  # before torch, so that it keeps its own OpenMP runtime (detr/openmp.py)
import torch

from detr import ModelConfig, Seq2Seq, build_model
from detr.config import DecodeConfig
from detr.quantize import quantize
from detr.search import beam_search, greedy

VOCAB, SRC_LEN, OUT_LEN = 32000, 30, 30


def random_model(device: str) -> Seq2Seq:
    torch.manual_seed(0)
    config = ModelConfig.preset("base", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, share_embeddings=True,
                                max_positions=512)
    return build_model(config).to(device).eval()


def detr_model(device: str, precision: str = "float32") -> Seq2Seq:
    """The random model as detr's engine runs it: float32 packed for the CPU's GEMM, or int8."""
    return quantize(random_model(device), precision)


def onnx_model(workdir: Path, threads: int):
    """detr's random model as ONNX graphs, run by ONNX Runtime (exported once per benchmark run)."""
    from detr.export import onnx

    folder = workdir / "onnx"
    if not folder.exists():
        folder.mkdir()
        with torch.no_grad():
            onnx._export_graphs(random_model("cpu"), folder)
    return onnx.OnnxModel(folder, {"max_positions": 512}, threads=threads)


def detr_runner(model, src: torch.Tensor, beam: int, device: str):
    decode = DecodeConfig(beam_size=beam, max_len_a=0.0, max_len_b=OUT_LEN, min_len=OUT_LEN)
    src = src.to(device)
    models = [model]

    def run():
        with torch.inference_mode():
            if beam == 1:
                out = [h.tokens for h in greedy(models, src, decode)]
            else:
                out = [n[0].tokens for n in beam_search(models, src, decode)]
        assert all(len(o) == OUT_LEN for o in out), [len(o) for o in out]

    return run


def marian(device: str):
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="relu",
        max_position_embeddings=512, pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1,
        forced_eos_token_id=None, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(config).to(device).eval()


def hf_runner(model, src: torch.Tensor, beam: int, device: str):
    src = src.to(device)
    mask = torch.ones_like(src)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=src, attention_mask=mask, num_beams=beam, do_sample=False,
                                 max_new_tokens=OUT_LEN, min_new_tokens=OUT_LEN, early_stopping=True)
        assert out.shape[1] == OUT_LEN + 1, out.shape  # + the decoder start token

    return run


class _FakeTokenizer:
    """What CTranslate2's Marian converter reads from a tokenizer: the vocabulary and specials."""

    eos_token, unk_token = "</s>", "<unk>"

    def get_vocab(self) -> dict[str, int]:
        vocab = {f"t{i}": i for i in range(VOCAB)}
        vocab.update({"</s>": 0, "<unk>": 1, "<pad>": VOCAB - 1})
        return {token: i for token, i in vocab.items() if token not in ("t0", "t1", f"t{VOCAB - 1}")}


def ct2_runner(model: Callable, src: torch.Tensor, beam: int, threads: int, device: str, workdir: Path):
    from ctranslate2.converters import TransformersConverter

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2"
    if not ct2_dir.exists():
        model().save_pretrained(hf_dir)

        class Converter(TransformersConverter):
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                return _FakeTokenizer()

        Converter(str(hf_dir)).convert(str(ct2_dir))
    translator = ctranslate2.Translator(str(ct2_dir), device=device, intra_threads=threads)
    vocab = {i: t for t, i in _FakeTokenizer().get_vocab().items()}
    # Marian's sources end in </s>; ours are random ids without specials plus </s> at the end.
    batch = [[vocab[int(i)] for i in row[:-1]] + ["</s>"] for row in src]

    def run():
        out = translator.translate_batch(batch, beam_size=beam, max_decoding_length=OUT_LEN,
                                         min_decoding_length=OUT_LEN, return_scores=False)
        assert all(len(r.hypotheses[0]) == OUT_LEN for r in out), [len(r.hypotheses[0]) for r in out]

    return run


class _Side:
    """What detr's CTranslate2 converter reads of one side of a tokenizer: subword strings by id."""

    class hf:  # noqa: N801 (stands in for a `tokenizers.Tokenizer`)
        @staticmethod
        def get_vocab_size() -> int:
            return VOCAB

        @staticmethod
        def id_to_token(i: int) -> str:
            return f"t{i}"

    @staticmethod
    def languages() -> list[str]:
        return []


class _FakeDetrTokenizer:
    src = tgt = _Side()


def detr_ct2_runner(src: torch.Tensor, beam: int, threads: int, device: str, workdir: Path, quantization: str):
    """detr's random model through detr's own CTranslate2 converter (`detr export --to ctranslate2`'s
    spec), decoded by CTranslate2 the way `--engine ctranslate2` calls it."""
    from detr.export.ctranslate2 import model_spec, vocabulary

    folder = workdir / f"detr-ct2-{quantization}"
    if not folder.exists():
        spec = model_spec(random_model("cpu"), _FakeDetrTokenizer())
        spec.validate()
        spec.optimize(quantization=None if quantization == "float32" else quantization)
        folder.mkdir()
        spec.save(str(folder))
    translator = ctranslate2.Translator(str(folder), device=device, intra_threads=threads)
    tokens = vocabulary(_FakeDetrTokenizer(), "src")
    batch = [[tokens[int(i)] for i in row] for row in src]  # ends in detr's </s>, as the engine sends it

    def run():
        out = translator.translate_batch(batch, beam_size=beam, max_decoding_length=OUT_LEN,
                                         min_decoding_length=OUT_LEN, length_penalty=0.0, return_scores=False)
        assert all(len(r.hypotheses[0]) == OUT_LEN for r in out), [len(r.hypotheses[0]) for r in out]

    return run


def engines(args, workdir: Path, wanted: set[str]) -> dict:
    """name → runner factory (src, beam) for every engine in `wanted`; models are built once here."""
    made: dict = {}
    hf_model = functools.cache(lambda: marian(args.device))  # built when first needed
    for name, precision in (("detr", "float32"), ("detr int8", "int8")):
        if name in wanted:
            model = detr_model(args.device, precision)
            made[name] = lambda src, beam, model=model: detr_runner(model, src, beam, args.device)
    if "detr on ONNX Runtime" in wanted:
        model = onnx_model(workdir, args.threads)
        made["detr on ONNX Runtime"] = lambda src, beam: detr_runner(model, src, beam, args.device)
    for name, quantization in (("detr→CT2", "float32"), ("detr→CT2 int8", "int8")):
        if name in wanted:
            made[name] = lambda src, beam, q=quantization: detr_ct2_runner(src, beam, args.threads, args.device,
                                                                           workdir, q)
    if "hf" in wanted:
        def hf(src, beam):
            hf_src = src.clone()
            hf_src[:, -1] = 0  # Marian's </s>
            return hf_runner(hf_model(), hf_src, beam, args.device)
        made["hf"] = hf
    if "ct2" in wanted:
        made["ct2"] = lambda src, beam: ct2_runner(hf_model, src, beam, args.threads, args.device, workdir)
    return made


ALL = ("detr", "detr int8", "detr on ONNX Runtime", "detr→CT2", "detr→CT2 int8", "hf", "ct2")


def source(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    src = torch.randint(4, VOCAB - 1, (batch, SRC_LEN), generator=g)
    src[:, -1] = 2  # detr's </s>; the random ids never contain it elsewhere
    return src


def measure_in_child(name: str, args, workdir: Path) -> dict:
    """Seconds per run of engine `name` at every point, and its peak memory, measured in a fresh
    process that holds that engine alone (conversions are kept in `workdir` across processes)."""
    command = [sys.executable, __file__, "--only-engine", name, "--threads", str(args.threads), "--device", args.device,
               "--workdir", str(workdir), "--batches", args.batches, "--beams", args.beams]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def only_engine(args) -> None:
    """The child: one timed run per point after a warm-up, then VmHWM (not getrusage's ru_maxrss,
    which keeps the parent's peak across fork and exec)."""
    make = engines(args, Path(args.workdir), {args.only_engine})[args.only_engine]
    seconds = {}
    for batch, beam in points(args):
        run = make(source(batch), beam)
        run()  # warm-up
        start = time.perf_counter()
        run()
        seconds[f"{batch},{beam}"] = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()
    rss = int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) / 1024  # kB → MB
    print(json.dumps({"seconds": seconds, "rss": rss}))


def points(args) -> list[tuple[int, int]]:
    return [(batch, beam) for batch in map(int, args.batches.split(",")) for beam in map(int, args.beams.split(","))]


def sizes(workdir: Path) -> dict[str, float]:
    """Model sizes on disk (MB): detr's weights file, its CTranslate2 conversions (made by the run)."""
    from detr.checkpoint import save_weights

    save_weights(random_model("cpu"), workdir / "model.safetensors")
    found = {"detr model.safetensors (float32)": workdir / "model.safetensors",
             "detr→CT2 model.bin (float32)": workdir / "detr-ct2-float32" / "model.bin",
             "detr→CT2 model.bin (int8)": workdir / "detr-ct2-int8" / "model.bin"}
    return {name: path.stat().st_size / 2**20 for name, path in found.items() if path.exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--skip", default="", help=f"comma-separated engines to leave out, of: {', '.join(ALL)}")
    parser.add_argument("--only-engine", help=argparse.SUPPRESS)  # a child: one engine, every point
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_engine:
        return only_engine(args)
    wanted = [name for name in ALL if name not in set(args.skip.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        # Round r measures every engine once, each in a process of its own: engines never share a
        # process (their thread pools and allocators would meet), and drift hits them alike. The
        # first round makes the conversions (kept in tmp) and is not counted.
        rounds = [{name: measure_in_child(name, args, Path(tmp)) for name in wanted}
                  for _ in range(args.repeat + 1)][1:]
        on_disk = sizes(Path(tmp))
    rows = []
    for batch, beam in points(args):
        key = f"{batch},{beam}"
        rows.append((batch, beam, {name: batch * OUT_LEN / statistics.median(r[name]["seconds"][key] for r in rounds)
                                   for name in wanted}))
    memory = {name: max(r[name]["rss"] for r in rounds) for name in wanted}
    print()
    print("| batch | search | " + " | ".join(wanted) + " | detr ÷ HF | detr ÷ CT2 |")
    print("|---:|---|" + "---:|" * (len(wanted) + 2))
    for batch, beam, s in rows:
        mine, hf, ct2 = s.get("detr"), s.get("hf"), s.get("ct2")
        cells = [f"{s[n]:,.0f}" for n in wanted]
        cells += [f"{mine / hf:.2f}" if mine and hf else "—", f"{mine / ct2:.2f}" if mine and ct2 else "—"]
        print(f"| {batch} | {'greedy' if beam == 1 else f'beam {beam}'} | " + " | ".join(cells) + " |")
    print()
    for name, mb in on_disk.items():
        print(f"size on disk: {name}: {mb:,.0f} MB")
    for name, mb in memory.items():
        print(f"peak RSS of a process holding {name} alone and decoding every point: {mb:,.0f} MB")


if __name__ == "__main__":
    main()

"""Decoding speed: detr (float32, int8, its search on ONNX Runtime) vs Hugging Face `generate`
(MarianMT) vs CTranslate2, same shape, same run.

The paper-base shape (d_model 512, 8 heads, 6+6 layers, d_ff 2048, 32k shared vocabulary),
random weights, 30 source tokens per sentence and exactly 30 output tokens (minimum =
maximum length), greedy and beam 4, batch 1 and 32. Reports generated tokens per second
(sentences × 30 ÷ seconds, median of `--repeat` timed runs after one warm-up; the engines take turns
within each round, so drift of the machine's speed hits them alike).

    pip install "torch==2.13.0" -e ".[bench,export]"   # CTranslate2; transformers is a dependency of detr
    python benchmarks/decode_speed.py [--threads 2] [--repeat 3] [--device cpu]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detr import ModelConfig, Seq2Seq, build_model
from detr.config import DecodeConfig
from detr.quantize import quantize
from detr.search import beam_search, greedy

VOCAB, SRC_LEN, OUT_LEN = 32000, 30, 30


def timed(runners: dict, repeat: int) -> dict[str, float]:
    """Median seconds per run of each runner, after one warm-up each. The runners take turns
    (round r times every runner once), so drift of the machine's speed hits them alike. Each timed
    run starts after a second's pause: the engines keep their own OpenMP thread pools, whose
    threads spin for a while after a call and would slow whichever engine runs next."""
    for fn in runners.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, fn in runners.items():
            time.sleep(1.0)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def detr_model(device: str, precision: str = "float32") -> Seq2Seq:
    torch.manual_seed(0)
    config = ModelConfig.preset("base", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, share_embeddings=True,
                                max_positions=512)
    return quantize(build_model(config).to(device).eval(), precision)


def onnx_model(workdir: Path, threads: int):
    """detr's random model as ONNX graphs, run by ONNX Runtime (exported once per benchmark run)."""
    from detr.export import onnx

    folder = workdir / "onnx"
    if not folder.exists():
        folder.mkdir()
        with torch.no_grad():
            onnx._export_graphs(detr_model("cpu"), folder)
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


def ct2_runner(model, src: torch.Tensor, beam: int, threads: int, device: str, workdir: Path):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2"
    if not ct2_dir.exists():
        model.save_pretrained(hf_dir)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--skip", default="", help="comma-separated: int8, onnx, hf, ct2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    hf_model = marian(args.device) if {"hf", "ct2"} - skip else None
    ours = {"detr": detr_model(args.device)}
    if "int8" not in skip:
        ours["detr int8"] = detr_model(args.device, "int8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "onnx" not in skip:
            ours["detr on ONNX Runtime"] = onnx_model(Path(tmp), args.threads)
        for batch in map(int, args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            src = torch.randint(4, VOCAB - 1, (batch, SRC_LEN), generator=g)
            src[:, -1] = 2  # detr's </s>; the random ids never contain it elsewhere
            for beam in map(int, args.beams.split(",")):
                tokens = batch * OUT_LEN
                runners = {name: detr_runner(model, src, beam, args.device) for name, model in ours.items()}
                if "hf" not in skip:
                    hf_src = src.clone()
                    hf_src[:, -1] = 0  # Marian's </s>
                    runners["hf"] = hf_runner(hf_model, hf_src, beam, args.device)
                if "ct2" not in skip:
                    runners["ct2"] = ct2_runner(hf_model, src, beam, args.threads, args.device, Path(tmp))
                speeds = {name: tokens / seconds for name, seconds in timed(runners, args.repeat).items()}
                rows.append((batch, beam, speeds))
                print(f"batch {batch:>3} beam {beam}: " + "  ".join(f"{k} {v:,.0f} tok/s" for k, v in speeds.items()),
                      flush=True)
    print()
    names = list(rows[0][2])
    print("| batch | search | " + " | ".join(f"{n} tok/s" for n in names) + " | detr ÷ HF | detr ÷ CT2 |")
    print("|---:|---|" + "---:|" * (len(names) + 2))
    for batch, beam, s in rows:
        mine, hf, ct2 = s["detr"], s.get("hf"), s.get("ct2")
        cells = [f"{s[n]:,.0f}" for n in names]
        cells += [f"{mine / hf:.2f}" if hf else "—", f"{mine / ct2:.2f}" if ct2 else "—"]
        print(f"| {batch} | {'greedy' if beam == 1 else f'beam {beam}'} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()

"""The CUDA paths, on a machine with a GPU: bf16 and fp16 training, decoding on the GPU, and the
same under torchrun (DDP over NCCL, and FSDP) with every GPU of the machine.

For each precision (fp32, bf16, fp16) trains the toy translator for `--steps` steps on CUDA and
reports the first and last logged training loss, throughput and valid BLEU; then checks that
greedy decoding of the fp32 run on CUDA gives the same outputs as on the CPU (fp32 both; a
differing output is counted, not hidden). Writes a JSON report to `--out`.

    python benchmarks/cuda_check.py --out report.json [--steps 300] [--ddp]

`--ddp` also trains under `torchrun --nproc-per-node <GPUs>` (NCCL, chosen by `train.backend:
auto`) in fp32, bf16 and fp16, and bf16 with FSDP, and reports each run's exit status, last
training loss, last validation and whether `detr.load` decodes with its weights.

Not part of the test run (the suite runs on CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from detr.toy import make_toy_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true", help="also train under torchrun on every GPU")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "runs": {}}
    work = Path(tempfile.mkdtemp())
    make_toy_corpus(work / "data", train=5000, valid=100, test=200, seed=1)
    sources = (work / "data" / "test.en").read_text().splitlines()
    for precision in ("fp32", "bf16", "fp16"):
        config = detr.load_config(ROOT / "configs" / "tiny.yaml", {
            "run_dir": str(work / precision), "data.train": str(work / "data" / "train"),
            "data.valid": str(work / "data" / "valid"), "data.test": None, "train.device": "cuda",
            "train.precision": precision, "train.max_steps": args.steps, "train.eval_every": args.steps,
            "train.save_every": args.steps, "train.log_every": 25})
        start = time.perf_counter()
        result = detr.train(config)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in (work / precision / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if r["split"] == "train"]
        report["runs"][precision] = {
            "steps": result.steps, "seconds": round(seconds, 1), "first_loss": train_rows[0]["loss"],
            "last_loss": train_rows[-1]["loss"], "valid": [r for r in rows if r["split"] == "valid"][-1],
            "tokens_per_s_last": train_rows[-1]["tokens_per_s"], "nonfinite_skipped": result.nonfinite_skipped}
        print(precision, json.dumps(report["runs"][precision]), flush=True)
    gpu, cpu = detr.load(work / "fp32", device="cuda"), detr.load(work / "fp32", device="cpu")
    greedy = gpu.options(beam_size=1)
    on_gpu, on_cpu = gpu.translate(sources, greedy), cpu.translate(sources, greedy)
    beam_gpu = gpu.translate(sources, gpu.options(beam_size=4))
    beam_cpu = cpu.translate(sources, cpu.options(beam_size=4))
    report["decode_cuda_vs_cpu"] = {"sentences": len(sources),
                                    "greedy_differ": sum(a != b for a, b in zip(on_gpu, on_cpu)),
                                    "beam4_differ": sum(a != b for a, b in zip(beam_gpu, beam_cpu))}
    bf16 = detr.load(work / "bf16", device="cuda")
    report["bf16_run_decodes"] = bf16.translate(sources[:3], bf16.options(beam_size=4))
    print(json.dumps(report["decode_cuda_vs_cpu"]), flush=True)
    if args.ddp:
        report["torchrun"] = torchrun_runs(work, args.steps, sources[:3])
    Path(args.out).write_text(json.dumps(report, indent=1))


def torchrun_runs(work: Path, steps: int, sources: list[str]) -> dict:
    """Train the toy translator under torchrun on every GPU in each precision (and bf16 with FSDP)."""
    gpus = torch.cuda.device_count()
    out: dict = {"processes": gpus}
    for precision, fsdp in (("fp32", False), ("bf16", False), ("fp16", False), ("bf16", True)):
        name = f"{precision}{'-fsdp' if fsdp else ''}"
        run = work / f"torchrun-{name}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                   "-m", "detr", "train", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run),
                   "--data.train", str(work / "data" / "train"), "--data.valid", str(work / "data" / "valid"),
                   "--train.device", "cuda", "--train.precision", precision, "--train.fsdp", str(fsdp).lower(),
                   "--train.max_steps", str(steps), "--train.eval_every", str(steps),
                   "--train.save_every", str(steps), "--train.log_every", "25", "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        row: dict = {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode == 0:
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            row["last_loss"] = [r for r in rows if r["split"] == "train"][-1]["loss"]
            row["valid"] = [r for r in rows if r["split"] == "valid"][-1]
            row["decodes"] = detr.load(run, device="cuda").translate(sources)
        else:
            row["stderr"] = done.stderr[-2000:]
        out[name] = row
        print("torchrun", name, json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
    return out


if __name__ == "__main__":
    main()

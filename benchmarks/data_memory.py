"""Peak memory of streaming a large parallel corpus through BatchStream.

Writes a synthetic parallel corpus of about --gb gigabytes (both sides together) by
recombining Multi30k sentences (or random words when ../shared/data is absent), trains a
tokenizer on its first lines, then streams one full epoch of batches and reports peak RSS
next to the corpus size. Not a test: run by hand, numbers go to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/data_memory.py --gb 1 --dir /tmp/detr-1gb
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import time
from pathlib import Path

from detr.batching import BatchStream, Encoded
from detr.config import DataConfig
from detr.readers import read_examples
from detr.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared/data/translation/multi30k"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(prefix: Path, gigabytes: float) -> int:
    if SHARED.exists():
        en = (SHARED / "train.en").read_text(encoding="utf-8").splitlines()
        de = (SHARED / "train.de").read_text(encoding="utf-8").splitlines()
    else:
        words = [f"w{i}" for i in range(5000)]
        rng0 = random.Random(0)
        en = [" ".join(rng0.choices(words, k=12)) for _ in range(20000)]
        de = [" ".join(reversed(s.split())) for s in en]
    rng = random.Random(0)
    budget, written, lines = int(gigabytes * 2**30), 0, 0
    with open(f"{prefix}.en", "w", encoding="utf-8") as fe, open(f"{prefix}.de", "w", encoding="utf-8") as fd:
        while written < budget:
            i, j = rng.randrange(len(en)), rng.randrange(len(en))
            a, b = f"{en[i]} {en[j]}\n", f"{de[i]} {de[j]}\n"
            fe.write(a)
            fd.write(b)
            written += len(a.encode()) + len(b.encode())
            lines += 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/detr-data-memory")
    parser.add_argument("--pool-size", type=int, default=100_000)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "train"
    t0 = time.time()
    lines = write_corpus(prefix, args.gb)
    size = sum(Path(f"{prefix}.{lang}").stat().st_size for lang in ("en", "de")) / 2**20
    print(f"corpus: {lines:,} pairs, {size:,.0f} MiB on disk, written in {time.time() - t0:.0f} s")
    config = DataConfig(train=str(prefix), src_lang="en", tgt_lang="de", pool_size=args.pool_size)
    sample = itertools.islice(read_examples(config, "train"), 50_000)
    pairs = list(sample)
    tokenizer = train_tokenizer((e.src for e in pairs), (e.tgt for e in pairs), vocab_size=8000)
    del pairs
    print(f"after tokenizer training: peak RSS {peak_rss_mb():,.0f} MiB")
    stream = BatchStream(lambda: read_examples(config, "train"), Encoded(tokenizer, 256, "filter"),
                         args.max_tokens, args.pool_size, seed=1)
    t0 = time.time()
    batches = tokens = 0
    for batch in stream:
        batches += 1
        tokens += batch.num_tgt_tokens
    elapsed = time.time() - t0
    print(f"one epoch: {batches:,} batches, {tokens:,} target tokens in {elapsed:.0f} s "
          f"({tokens / elapsed:,.0f} tokens/s); pool_size={args.pool_size:,}")
    print(f"peak RSS over the whole run: {peak_rss_mb():,.0f} MiB for a {size:,.0f} MiB corpus")


if __name__ == "__main__":
    main()

"""Hostile input through every line-oriented command: lines in × N = lines out, no traceback.

Trains three tiny runs (translate on the toy corpus, classify, tag) for a few steps, writes
`--lines` hostile input lines (blank lines, spaces only, special-token names, every Unicode
line break, tabs, control characters, right-to-left and astral characters, 4,000-character
lines, random bytes decoded as Latin-1), and runs each command over them. A second pass puts
one invalid-UTF-8 line at line k and checks that exactly the k-1 results before it were
written and the exit code is 2 with one error line. Prints a table; exits 1 if any check fails.

    python benchmarks/hostile_input.py [--lines 1000] [--seed 0] [--work /tmp/detr-hostile]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from detr.toy import make_toy_corpus  # noqa: E402
from tests.test_tasks import ner_conll, sentiment_tsv  # noqa: E402

PIECES = ["<pad>", "</s>", "<s>", "<unk>", "[SEP]", "[CLS]", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85",
          "\u2028", "\u2029", "\t", "\x00", "\x1b[31m", "\u202e", "שלום", "𝔘𝔫𝔦", "😀", "e\u0301", "&lt;", "<script>",
          "</script>", "<!--", '"', "'", "\\", "%s", "{0}", "we have two red dogs.", "Anna visited Paris ."]


def hostile_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append(" " * rng.randint(1, 5))
        elif kind == 2:
            lines.append("long " * 800)
        elif kind == 3:
            lines.append(bytes(rng.randrange(256) for _ in range(40)).decode("latin-1").replace("\n", " "))
        else:
            lines.append(" ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))).replace("\n", " "))
    return lines


def train_runs(work: Path) -> dict[str, Path]:
    make_toy_corpus(work / "toy", train=2000, valid=20, test=0, seed=1)
    base = {"model_preset": "tiny", "train.max_steps": 60, "train.save_every": 60, "train.eval_every": 60,
            "train.threads": 1, "train.max_tokens": 1024}
    runs = {"translate": work / "translate", "classify": work / "classify", "tag": work / "tag"}
    detr.train(detr.load_config(ROOT / "configs" / "tiny.yaml", {
        **base, "run_dir": str(runs["translate"]), "data.train": str(work / "toy" / "train"),
        "data.valid": str(work / "toy" / "valid"), "data.test": None}))
    detr.train(detr.load_config(None, {
        **base, "task": "classify", "run_dir": str(runs["classify"]), "data.vocab_size": 300,
        "data.train": str(sentiment_tsv(work / "train.tsv", 300, 1)), "data.src_field": "sentence"}))
    detr.train(detr.load_config(None, {
        **base, "task": "tag", "run_dir": str(runs["tag"]), "data.vocab_size": 300, "data.format": "conll",
        "data.train": str(ner_conll(work / "train.txt", 200, 1))}))
    return runs


def count_outputs(command: list[str], text: str) -> int:
    """Output records: lines, or for `tag` without --json blocks ended by a blank line."""
    if command[0] == "tag" and "--json" not in command:  # words come from str.split: never empty
        return text.split("\n")[:-1].count("")
    return text.count("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/detr-hostile")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = train_runs(work)
    lines = hostile_lines(args.lines, args.seed)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    k = len(lines) // 2
    broken = ("\n".join(lines[: k - 1]) + "\n").encode("utf-8") + b"bad \xff\xfe line\n" + \
        ("\n".join(lines[k:]) + "\n").encode("utf-8")
    commands = [
        (["translate", "{translate}"], 1), (["translate", "{translate}", "--beam-size", "3", "--nbest", "3"], 3),
        (["translate", "{translate}", "--beam-size", "1", "--alignment"], 1),
        (["generate", "{translate}", "--num-samples", "3", "--temperature", "20"], 3),
        (["classify", "{classify}"], 1), (["classify", "{classify}", "--probs"], 1),
        (["tag", "{tag}"], 1), (["tag", "{tag}", "--json"], 1),
    ]
    rows, failed = [], False
    for command, per_line in commands:
        argv = [c.format(**{name: str(path) for name, path in runs.items()}) for c in command]
        for label, payload, want_rc, want_records in (("hostile", data, 0, len(lines) * per_line),
                                                      (f"invalid UTF-8 at line {k}", broken, 2, (k - 1) * per_line)):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "detr", *argv, "--max-len-b", "20"]
                                 if argv[0] in ("translate", "generate") else [sys.executable, "-m", "detr", *argv],
                                 input=payload, capture_output=True, cwd=ROOT)
            seconds = time.perf_counter() - start
            got = count_outputs(argv, out.stdout.decode("utf-8"))
            stderr_lines = [s for s in out.stderr.decode("utf-8", "replace").splitlines()
                            if not s.startswith(("WARNING", "INFO"))]
            ok = out.returncode == want_rc and got == want_records and b"Traceback" not in out.stderr and \
                (want_rc == 0 or len(stderr_lines) == 1)
            failed |= not ok
            shown = " ".join("RUN" if c.startswith("{") else c for c in command)
            rows.append((f"`{shown}`", label, len(lines), want_records, got,
                         out.returncode, "yes" if ok else "NO", f"{seconds:.1f}"))
    print("| command | input | lines in | records expected | records out | exit | ok | seconds |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(json.dumps({"lines": len(lines), "checks": len(rows), "failed": sum(r[6] == "NO" for r in rows)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

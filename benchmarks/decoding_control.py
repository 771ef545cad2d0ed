"""Decoding control on Multi30k test2016: constraints, ensembles, MBR, multilingual runs.

    python benchmarks/decoding_control.py constraints RUN
    python benchmarks/decoding_control.py ensemble RUN_A RUN_B
    python benchmarks/decoding_control.py mbr RUN --n 16,32
    python benchmarks/decoding_control.py multilingual MULTI_RUN de=DE_RUN fr=FR_RUN [cs=CS_RUN]

- constraints: oracle terminology as in the constrained-decoding literature: for each sentence,
  1-2 words of its reference (seeded choice) that the unconstrained beam output lacks; BLEU and
  chrF with and without them, the share of sentences whose output holds every phrase, and the
  decoding time of both (beam 5).
- ensemble: each run alone and the two together (beam 5), BLEU and chrF.
- mbr: beam 5 against MBR with chrF utility over N samples (and over the beam's N-best), BLEU,
  chrF and seconds per sentence.
- multilingual: test2016 BLEU per language of the multilingual run and of each bilingual run.

Prints a Markdown table (and `--json` writes the numbers). Not part of the test run. Time
columns are only meaningful when nothing else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from detr.constraints import Constraints  # noqa: E402
from detr.metrics import bleu, chrf  # noqa: E402
from detr.rundir import RunDir  # noqa: E402
from detr.translator import Translator  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "translation" / "multi30k"


def test_set(lang: str, limit: int) -> tuple[list[str], list[str]]:
    src = (DATA / "test2016.en").read_text(encoding="utf-8").splitlines()
    ref = (DATA / f"test2016.{lang}").read_text(encoding="utf-8").splitlines()
    return src[:limit or None], ref[:limit or None]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def row(name: str, hyps: list[str], refs: list[str], seconds: float | None = None, **extra) -> dict:
    out = {"system": name, "bleu": round(bleu(hyps, [refs]).score, 2), "chrf": round(chrf(hyps, [refs]).score, 2)}
    if seconds is not None:
        out["ms_per_sentence"] = round(1000 * seconds / len(hyps), 1)
    return out | extra


def oracle_terms(outputs: list[str], references: list[str], seed: int) -> list[Constraints]:
    """1-2 reference words (letters only, 3+ characters) missing from each unconstrained output."""
    rng = random.Random(seed)
    terms = []
    for out, ref in zip(outputs, references):
        have = set(re.findall(r"\w+", out.lower()))
        missing = list(dict.fromkeys(w for w in re.findall(r"[^\W\d_]{3,}", ref) if w.lower() not in have))
        terms.append(Constraints(tuple(rng.sample(missing, min(len(missing), rng.choice([1, 2]))))))
    return terms


def constraints(args: argparse.Namespace) -> list[dict]:
    translator = detr.load(args.runs[0])
    src, ref = test_set("de", args.limit)
    options = translator.options(beam_size=5)
    plain, t_plain = timed(lambda: translator.translate(src, options))
    terms = oracle_terms(plain, ref, args.seed)
    constrained, t_con = timed(lambda: translator.translate(src, options, terms))
    with_terms = [i for i, t in enumerate(terms) if t.include]
    met = sum(not terms[i].unmet(constrained[i]) for i in with_terms)
    phrases = sum(len(terms[i].include) for i in with_terms)
    return [row("beam 5", plain, ref, t_plain),
            row("beam 5 + oracle terms", constrained, ref, t_con,
                sentences_with_terms=len(with_terms), terms=phrases, share_met=round(met / max(1, len(with_terms)), 4))]


def ensemble(args: argparse.Namespace) -> list[dict]:
    members = [detr.load(run) for run in args.runs]
    src, ref = test_set("de", args.limit)
    rows = []
    for run, member in zip(args.runs, members):
        out, sec = timed(lambda member=member: member.translate(src, member.options(beam_size=5)))
        rows.append(row(Path(run).name, out, ref, sec))
    pair = Translator.ensemble(members, args.runs)
    out, sec = timed(lambda: pair.translate(src, pair.options(beam_size=5)))
    return rows + [row("ensemble of " + " + ".join(Path(r).name for r in args.runs), out, ref, sec)]


def mbr(args: argparse.Namespace) -> list[dict]:
    translator = detr.load(args.runs[0])
    src, ref = test_set("de", args.limit)
    out, sec = timed(lambda: translator.translate(src, translator.options(beam_size=5)))
    rows = [row("beam 5", out, ref, sec)]
    for n in (int(x) for x in args.n.split(",")):
        options = translator.options(mbr=n, mbr_metric="chrf", top_p=args.top_p, seed=args.seed)
        out, sec = timed(lambda options=options: translator.translate(src, options))
        rows.append(row(f"MBR chrF, {n} samples (top-p {args.top_p})", out, ref, sec))
        options = translator.options(mbr=n, mbr_metric="chrf", mbr_candidates="beam", beam_size=n)
        out, sec = timed(lambda options=options: translator.translate(src, options))
        rows.append(row(f"MBR chrF, beam {n} n-best", out, ref, sec))
    return rows


def load_at(run: str, step: int) -> Translator:
    """A run's translator, with the weights of its checkpoint at `step` (0: the run's model)."""
    return detr.load(run, weights=RunDir(run).checkpoint(step) if step else None)


def multilingual(args: argparse.Namespace) -> list[dict]:
    multi = load_at(args.runs[0], args.multi_step if args.multi_step is not None else args.step)
    rows = []
    for spec in args.runs[1:]:
        lang, run = spec.split("=", 1)
        src, ref = test_set(lang, args.limit)
        bilingual = load_at(run, args.step)
        out = bilingual.translate(src, bilingual.options(beam_size=5))
        rows.append(row(f"{lang}: bilingual {Path(run).name}", out, ref))
        out = multi.translate(src, multi.options(beam_size=5, tgt_lang=lang))
        rows.append(row(f"{lang}: multilingual {Path(args.runs[0]).name}", out, ref))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["constraints", "ensemble", "mbr", "multilingual"])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--limit", type=int, default=0, help="first N test sentences (0: all 1,000)")
    parser.add_argument("--n", default="16,32", help="mbr: candidate counts")
    parser.add_argument("--top-p", type=float, default=0.9, help="mbr: nucleus sampling of the candidates")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step", type=int, default=0, help="multilingual: compare every run's checkpoint at "
                                                             "this step (0: each run's model)")
    parser.add_argument("--multi-step", type=int, help="multilingual: the multilingual run's step (default --step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"constraints": constraints, "ensemble": ensemble, "mbr": mbr, "multilingual": multilingual}[args.what](args)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Quality on real data: train (or continue) a recipe, decode its test set, score it, write the table.

    python benchmarks/quality.py RECIPE [--threads 2] [--average 5] [--lp 0.6,1.0] [--set key=value ...]

RECIPE is a file in configs/ (without .yaml); what is measured depends on its kind:

    translation     multi30k_en_de      BLEU, chrF (sacrebleu) on test2016; beam search; length penalty
                                        chosen on valid among --lp; optional checkpoint averaging
    summarization   dialogsum, dialogsum_minilm, dialogsum_b2b, bbc_headline, bbc_headline_minilm,
                    bbc_headline_b2b    ROUGE-1/2/L (best of the references per example) beside LEAD-k
    dialogue        dialogue_turns, dialogue_minilm, dialogue_b2b, chatterbot
                                        perplexity (per subword and per word), BLEU, Distinct-1/2 of
                                        beam and sampled responses, five example exchanges

en→fr is the en→de recipe with `--set data.tgt_lang=fr --name multi30k_en_fr`. The run goes
to runs/quality/NAME (an existing run there is continued, or only scored if it is finished);
the table and the details land in runs/quality/NAME/results.{md,json}. `--lines N` (first N
examples of every split) and `--set train.max_steps=N` make the quick version the tests run.
Run it from the repository root (the recipes' data paths are relative to it). Not part of the
test run: a full recipe takes up to an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import logging
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import detr
from detr.checkpoint import average_checkpoints, list_checkpoints
from detr.config import Config, load_config
from detr.evaluate import read_test_data, score_texts
from detr.metrics import Score, bleu, distinct, rouge, score
from detr.readers import read_examples, split_files
from detr.rerank import anti_lm_term, backward_term, rerank

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("quality")


@dataclass
class Spec:
    """How a recipe is judged."""

    kind: str  # "translation", "summarization" or "dialogue"
    refs: list[str] = field(default_factory=list)  # reference fields of the test file (summarization/dialogue)
    lead: int = 0  # summarization: sentences in the LEAD baseline
    split: str = ""  # the recipe's data/ files are made from ../shared/data by this function of the module
    # dialogue: the recipe of a backward run (source and target swapped) for MMI-bidi reranking, trained
    # beside this one, and the ../shared/data file (the recipe's fields) its weight is chosen on
    backward: str = ""
    backward_valid: str = ""


CHATTERBOT_PAIRS = "dialogue/chatterbot_corpus_en/pairs.tsv"
DIALOGUE_TURNS = "dialogue/dialogsum_turn_pairs/{}.tsv"  # turn pairs of DialogSum's valid and test dialogues
DIALOGSUM_TRAIN = "summarization/dialogsum/train.jsonl"  # its train dialogues, from which more pairs are made

SPECS = {
    "multi30k_en_de": Spec("translation"),
    "dialogsum": Spec("summarization", ["summary1", "summary2", "summary3"], lead=3),
    "dialogsum_minilm": Spec("summarization", ["summary1", "summary2", "summary3"], lead=3),
    "dialogsum_b2b": Spec("summarization", ["summary1", "summary2", "summary3"], lead=3),
    "bbc_headline": Spec("summarization", ["title"], lead=1),
    "bbc_headline_minilm": Spec("summarization", ["title"], lead=1),
    "bbc_headline_b2b": Spec("summarization", ["title"], lead=1),
    "dialogue_turns": Spec("dialogue", ["response"]),
    "dialogue_b2b": Spec("dialogue", ["response"], split="make_dialogsum_turns"),
    "dialogue_minilm": Spec("dialogue", ["response"], split="make_dialogsum_turns", backward="dialogue_minilm_backward",
                            backward_valid=DIALOGUE_TURNS.format("valid")),
    "chatterbot": Spec("dialogue", ["response"], split="make_chatterbot_split"),
}

SPEAKER = re.compile(r"^#Person\d+#:\s*")
# Decoding chosen on valid: beam search with repetition controls (all tasks but translation), and sampling (dialogue).
# no_repeat_ngram 1 (no subword twice) is for headlines and short replies, which rarely repeat one.
BEAM_GRID = [{"repetition_penalty": r, "no_repeat_ngram": n} for r in (1.0, 1.3) for n in (0, 1, 2, 3)]
# Then MMI-antiLM (`decode.anti_lm`) with the chosen repetition setting: its weight, over the first 5 tokens or all.
ANTI_LM_GRID = [{"anti_lm": 0.0}] + [{"anti_lm": w, "anti_lm_steps": n} for n in (5, 40) for w in (0.3, 0.5, 0.7)]
NO_ANTI_LM = {"anti_lm": 0.0}
# Summaries and headlines, last: the GNMT length penalty with the choices above (ROUGE is an F-score,
# so the summary's length counts).
LENGTH_GRID = [{"length_penalty": a} for a in (0.6, 1.0, 1.5, 2.0)]
# What the beam stages start from, whatever the recipe file's decode section says (it holds the last choice).
BEAM_START = {**NO_ANTI_LM, "length_penalty": 1.0}
# MMI reranking (`detr.rerank`): the outputs of each of these beams reranked with every pair of weights of the
# backward run (MMI-bidi, `decode.backward_weight`) and of the model as a language model over the whole reply
# (MMI-antiLM, `decode.rerank_anti_lm`). Diverse beam search (`decode.beam_groups`) gives the reranker candidates
# that differ (a plain beam's 8 are variations of one reply); 1.0 is the penalty Vijayakumar et al. and Hugging
# Face's examples start from. Only 16 groups of one: it beat a plain beam of 8 and 8 groups at every backward
# weight on all 4,190 valid pairs (benchmarks/RESULTS.md, "a diverse beam for the MMI-bidi reranker").
# With bigram blocking too: the anti-LM term favours replies that repeat themselves (a repeat is improbable
# under the language model), and the repetition stage above, on the plain beam, leaves blocking off.
RERANK_BEAMS = [{"beam_size": 16, "beam_groups": 16, "diversity_penalty": 1.0},
                {"beam_size": 16, "beam_groups": 16, "diversity_penalty": 1.0, "no_repeat_ngram": 2}]
BACKWARD_GRID = [0.0, 8.0, 16.0, 32.0, 64.0]  # valid's Distinct-2 peaked at 32-64 without the anti-LM
RERANK_ANTI_LM_GRID = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
SAMPLING_GRID = [{"top_p": p, "temperature": t} for p in (0.8, 0.9, 1.0) for t in (0.7, 1.0)]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


# ----------------------------------------------------------------------------- data


def lead(text: str, k: int) -> str:
    """The first `k` sentences (or dialogue turns: a line break also ends one) of `text`."""
    sentences = [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
    return " ".join(sentences[:k])


def split_by_group(rows: list[dict], key: str, shares: tuple[int, int]) -> dict[str, list[dict]]:
    """Deterministic train/valid/test split that keeps every row of one `key` value in one split:
    a group goes to valid when its hash mod 100 < shares[0], to test when < shares[0] + shares[1]."""
    out: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for row in rows:
        bucket = int(hashlib.sha1(row[key].encode()).hexdigest(), 16) % 100
        split = "valid" if bucket < shares[0] else "test" if bucket < sum(shares) else "train"
        out[split].append(row)
    return out


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(columns) + "\n")
        for row in rows:
            f.write("\t".join(row[c] for c in columns) + "\n")


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def make_chatterbot_split(shared: Path, out: Path) -> None:
    """data/chatterbot/{train,valid,test}.tsv from the corpus' pairs, split by question (80/10/10)."""
    for split, part in split_by_group(read_tsv(shared / CHATTERBOT_PAIRS), "context", (10, 10)).items():
        write_tsv(out / f"{split}.tsv", part, ["context", "response"])


def turn_pairs(dialogue: str, turns: int = 2) -> list[dict]:
    """The (context, response) pairs of one DialogSum dialogue as ../shared/data's turn pairs are made:
    each turn after the first answers the `turns` before it, joined by " [SEP] ", speakers dropped."""
    lines = [SPEAKER.sub("", t).strip() for t in dialogue.split("\n") if t.strip()]
    return [{"context": " [SEP] ".join(lines[max(0, i - turns):i]), "response": lines[i]} for i in range(1, len(lines))]


def make_dialogsum_turns(shared: Path, out: Path) -> None:
    """data/dialogsum_turns/{train,valid}.tsv. train: the turn pairs of DialogSum's 12,460 train
    dialogues (made as the shared valid/test pairs are, from DialogSum's own train split; the few
    pairs equal to a test pair, generic exchanges such as "Thank you." -> "You're welcome.", are left
    out). valid: a tenth of the shared valid pairs, cut by dialogue (a dialogue starts at a context of
    one turn), the same tenth the recipe validated on when it trained on the other nine."""
    test = {(r["context"], r["response"]) for r in read_tsv(shared / DIALOGUE_TURNS.format("test"))}
    with open(shared / DIALOGSUM_TRAIN, encoding="utf-8") as f:
        train = [p for line in f if line.strip() for p in turn_pairs(json.loads(line)["dialogue"])]
    train = [p for p in train if (p["context"], p["response"]) not in test]
    write_tsv(out / "train.tsv", train, ["context", "response"])
    rows, dialogue = read_tsv(shared / DIALOGUE_TURNS.format("valid")), 0
    for row in rows:
        dialogue += "[SEP]" not in row["context"]
        row["dialogue"] = f"dialogue {dialogue}"
    write_tsv(out / "valid.tsv", split_by_group(rows, "dialogue", (10, 0))["valid"], ["context", "response"])


def subset(config: Config, lines: int, folder: Path) -> list[str]:
    """Overrides pointing every split at a copy of its first `lines` examples (TSV: plus the header)."""
    overrides = []
    for split in ("train", "valid", "test"):
        path = getattr(config.data, split)
        if path is None:
            continue
        files = split_files(config.data, split)
        for f in files:
            keep = lines + (f.suffix == ".tsv")
            target = folder / split / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(f, encoding="utf-8") as src:
                target.write_text("".join(itertools.islice(src, keep)), encoding="utf-8")
        new = folder / split / Path(path).name
        overrides.append(f"data.{split}={new}")
    return overrides


# ----------------------------------------------------------------------------- decoding and scores


def test_set(config: Config, spec: Spec) -> tuple[list[str], list[list[str]]]:
    """Sources and reference sets of the recipe's test split."""
    if spec.kind == "translation":
        examples = list(read_examples(config.data, "test"))
        return [e.src for e in examples], [[e.tgt for e in examples]]
    return read_test_data(config.data.test, config.data.src_field, spec.refs)


def pick_length_penalty(translator, config: Config, penalties: list[float], beam: int) -> tuple[float, dict]:
    """The length penalty with the best valid BLEU (never the test set)."""
    valid = list(read_examples(config.data, "valid"))
    sources, refs = [e.src for e in valid], [[e.tgt for e in valid]]
    scores = {lp: bleu(translator.translate(sources, translator.options(beam_size=beam, length_penalty=lp)), refs).score
              for lp in penalties}
    best = max(scores, key=scores.get)
    return best, scores


def score_row(name: str, scores: list[Score]) -> dict:
    return {"system": name, **{s.name: round(s.score, 2) for s in scores}}


def word_perplexity(translator, sources: list[str], targets: list[str]) -> Score:
    """Perplexity per target word (whitespace-separated, plus one for the end): the same unit for
    runs with different vocabularies, unlike the per-subword "PPL"."""
    scored = translator.score(sources, targets)
    words = sum(len(t.split()) + 1 for t in targets)
    return Score("PPL/word", math.exp(min(-sum(s.total for s in scored) / words, 100.0)),
                 "teacher forcing, per whitespace word + 1 for the end, first reference")


def choose_decoding(translator, config: Config, kind: str, beam: int, examples: int) -> dict:
    """Beam repetition controls (`BEAM_GRID`), then the anti-LM with them (`ANTI_LM_GRID`), then for
    summaries the length penalty with both (`LENGTH_GRID`) and for dialogue sampling settings
    (`SAMPLING_GRID`) with the repetition controls, chosen on the first
    `examples` valid examples. Each stage sets what it builds on, so the recipe file's decode
    section (where the choices go) does not change the next choice. Sampling runs without the anti-LM: over the tail
    that sampling draws from, p(y | x) / p(y)^W favours tokens the "language model" finds rare, and
    the replies become random words (RESULTS, "Dialogue turns again").
    Summaries: the best ROUGE-1.
    Dialogue: the best BLEU among the settings whose Distinct-2 is at least half the references'
    (all settings when none is), so replies neither collapse to one safe answer nor wander off."""
    valid = list(itertools.islice(read_examples(config.data, "valid"), examples))
    sources, refs = [e.src for e in valid], [[e.tgt for e in valid]]
    metrics, key = (["bleu", "distinct"], "BLEU") if kind == "dialogue" else (["rouge"], "ROUGE-1")
    floor = distinct(refs[0], 2).score / 2 if kind == "dialogue" else 0.0
    chosen, tried = {}, {}
    last = {"sampling": SAMPLING_GRID} if kind == "dialogue" else {"length": LENGTH_GRID}
    grids = {"beam": BEAM_GRID, "anti_lm": ANTI_LM_GRID, **last}
    for name, grid in grids.items():
        results = []
        for setting in grid:
            if name == "sampling":  # with the repetition controls chosen above, without the anti-LM
                options = translator.options(seed=1, **chosen["beam"], **NO_ANTI_LM, **setting)
                outputs = [s[0][0] for s in translator.generate(sources, options)]
            else:  # from BEAM_START with the earlier stages' choices
                earlier = {**BEAM_START, **{k: v for stage in chosen.values() for k, v in stage.items()}}
                outputs = translator.translate(sources, translator.options(beam_size=beam, **{**earlier, **setting}))
            results.append((setting, {s.name: s.score for s in score(metrics, outputs, refs)}))
        varied = [r for r in results if r[1].get("Distinct-2", 0.0) >= floor] or results
        chosen[name] = max(varied, key=lambda r: r[1][key])[0]
        tried[name] = [{**setting, **{k: round(v, 2) for k, v in scores.items()}} for setting, scores in results]
    return {**chosen, "by": key, "tried": tried, "examples": len(sources),
            **({"references_distinct2": round(2 * floor, 2)} if kind == "dialogue" else {})}


class Remembered:
    """A scorer's scores kept per (source, output) pair: each weight of the grid reranks the same outputs, so
    each pair is scored once."""

    def __init__(self, scorer) -> None:
        self.scorer, self.seen = scorer, {}

    def score(self, sources: list[str], targets: list[str]) -> list:
        pairs = list(zip(sources, targets))
        new = [p for p in dict.fromkeys(pairs) if p not in self.seen]
        if new:
            self.seen.update(zip(new, self.scorer.score([s for s, _ in new], [t for _, t in new])))
        return [self.seen[p] for p in pairs]


def choose_reranking(translator, sources: list[str], refs: list[list[str]], decode: dict) -> dict:
    """MMI reranking's beam (`RERANK_BEAMS`) and weights (`BACKWARD_GRID` x `RERANK_ANTI_LM_GRID`) under
    `decode` (the choices made before it): the best BLEU among the settings whose Distinct-2 is at least half
    the references', and when none is, the one closest to it (the highest Distinct-2: the rule
    `choose_decoding` uses for dialogue falls back on BLEU, which on one-reference dialogue turns is under 1
    and rewards generic replies). Each beam's outputs are decoded once and reranked per pair of weights."""
    floor = distinct(refs[0], 2).score / 2
    backward, language_model, results = Remembered(translator.backward), Remembered(translator), []
    for beam in RERANK_BEAMS:
        options = translator.options(**{**decode, **beam, "nbest": beam["beam_size"]})
        nbest = translator.translate_nbest(sources, options)
        for weight in BACKWARD_GRID:
            for anti_lm in RERANK_ANTI_LM_GRID:
                terms = [backward_term(backward.score, weight), anti_lm_term(language_model.score, anti_lm)]
                outputs = [found[0][0] for found in rerank(sources, nbest, terms)]
                results.append(({**beam, "backward_weight": weight, "rerank_anti_lm": anti_lm},
                                {s.name: s.score for s in score(["bleu", "distinct"], outputs, refs)}))
    varied = [r for r in results if r[1]["Distinct-2"] >= floor]
    best = max(varied, key=lambda r: r[1]["BLEU"]) if varied else max(results, key=lambda r: r[1]["Distinct-2"])
    return {**best[0], "examples": len(sources), "references_distinct2": round(2 * floor, 2),
            "tried": [{**setting, **{k: round(v, 2) for k, v in r.items()}} for setting, r in results]}


def evaluate_recipe(translator, config: Config, spec: Spec, args: argparse.Namespace, out: Path) -> dict:
    sources, references = test_set(config, spec)
    rows, details = [], {}
    decode = {"beam_size": args.beam or config.decode.beam_size}
    if spec.kind == "translation" and len(args.lp) > 1 and config.data.valid:
        decode["length_penalty"], details["valid_bleu_by_length_penalty"] = pick_length_penalty(
            translator, config, args.lp, decode["beam_size"])
    elif args.lp:
        decode["length_penalty"] = args.lp[0]
    if spec.kind != "translation" and config.data.valid:
        details["chosen_on_valid"] = choose_decoding(translator, config, spec.kind, decode["beam_size"],
                                                     args.choose_examples)
        decode.update(**details["chosen_on_valid"]["beam"], **details["chosen_on_valid"]["anti_lm"],
                      **details["chosen_on_valid"].get("length", {}))
    start = time.perf_counter()
    if spec.kind == "translation":
        report = score_texts(translator, sources, references, ["bleu", "chrf"], out / "test.hyp",
                             translator.options(**decode))
        rows.append(score_row(f"detr, beam {decode['beam_size']}", report.scores))
        details["bleu_signature"] = report.scores[0].signature
    elif spec.kind == "summarization":
        report = score_texts(translator, sources, references, ["rouge"], out / "test.hyp", translator.options(**decode))
        rows.append(score_row(f"detr, beam {decode['beam_size']}", report.scores))
        rows.append(score_row(f"LEAD-{spec.lead}", rouge([lead(s, spec.lead) for s in sources], references)))
        details["examples"] = [{"source": s[:400], "reference": r, "output": h}
                               for s, r, h in zip(sources[:3], references[0][:3], report.hypotheses[:3])]
    else:
        report = score_texts(translator, sources, references, ["ppl", "bleu", "distinct"], out / "test.hyp",
                             translator.options(**decode))
        rows.append(score_row(f"detr, beam {decode['beam_size']}", report.scores + [word_perplexity(
            translator, sources, references[0])]))
        mmi_outputs = []
        if translator.backward is not None:
            valid = read_test_data(Path(args.shared) / spec.backward_valid, config.data.src_field, spec.refs)
            lines = args.lines or None
            details["backward_on_valid"] = chosen = choose_reranking(
                translator, valid[0][:lines], [r[:lines] for r in valid[1]], decode)
            setting = {k: v for k, v in chosen.items() if k not in ("examples", "references_distinct2", "tried")}
            reranked = score_texts(translator, sources, references, ["bleu", "distinct"], out / "test_mmi.hyp",
                                   translator.options(**{**decode, **setting}))
            rows.append(score_row(f"detr, beam {setting.pop('beam_size')} reranked (MMI), "
                                  + ", ".join(f"{k}={v}" for k, v in setting.items()), reranked.scores))
            mmi_outputs = reranked.hypotheses
        sampling = {"top_p": config.decode.top_p, "seed": 1}
        if "chosen_on_valid" in details:
            sampling.update(details["chosen_on_valid"]["sampling"])
        controls = {**details.get("chosen_on_valid", {}).get("beam", {}), **NO_ANTI_LM}  # as chosen
        sampled = [s[0][0] for s in translator.generate(sources, translator.options(**controls, **sampling))]
        shown = ", ".join(f"{k}={v}" for k, v in {**controls, **sampling}.items() if k != "seed")
        rows.append(score_row("detr, nucleus sampling " + shown,
                              score(["bleu", "distinct"], sampled, references)))
        rows.append(score_row("the references themselves", score(["distinct"], references[0], references)))
        details["examples"] = [{"context": s, "reference": r, "beam": h, "sampled": x}
                               for s, r, h, x in list(zip(sources, references[0], report.hypotheses, sampled))[:5]]
        for example, output in zip(details["examples"], mmi_outputs):
            example["beam reranked"] = output
    details["test_decode_seconds"] = round(time.perf_counter() - start, 1)
    details["decode"] = decode
    details["test_examples"] = len(sources)
    return {"rows": rows, **details}


def markdown(name: str, result: dict) -> str:
    columns = list(dict.fromkeys(k for row in result["rows"] for k in row))
    lines = [f"### {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    t = result["training"]
    lines += ["", f"Training: {t['steps']} steps ({t['stopped']}) in {t['seconds'] / 60:.1f} min; "
                  f"best valid {t['best']}. Test: {result['test_examples']} examples, decoded in "
                  f"{result['test_decode_seconds']:.0f} s with {result['decode']} on {t['machine']}."]
    if "backward" in t:
        b, chosen = t["backward"], result["backward_on_valid"]
        lines.append(f"Backward run ({b['recipe']}): {b['steps']} steps ({b['stopped']}) in {b['seconds'] / 60:.1f} "
                     f"min; best valid {b['best']}. Its weight chosen on {chosen['examples']} valid pairs "
                     f"(references' Distinct-2 {chosen['references_distinct2']}): {chosen['tried']}.")
    if "valid_bleu_by_length_penalty" in result:
        lines.append(f"Length penalty chosen on valid (BLEU by penalty): {result['valid_bleu_by_length_penalty']}.")
    for ex in result.get("examples", []):
        lines.append("")
        lines += [f"- **{k}**: {' '.join(str(v).split())}" for k, v in ex.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    recipe = args.recipe
    if recipe not in SPECS:
        raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(SPECS)}")
    spec, name = SPECS[recipe], args.name or recipe
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    overrides = [f"run_dir={out / 'run'}", f"train.threads={args.threads}", *args.set]
    config = load_config(ROOT / "configs" / f"{recipe}.yaml", overrides)
    if spec.split and not Path(config.data.train).is_file():
        globals()[spec.split](Path(args.shared), Path(config.data.train).parent)
    if args.lines:
        config = load_config(ROOT / "configs" / f"{recipe}.yaml", overrides + subset(config, args.lines, out / "data"))
    result = detr.train(config, resume=True)
    weights = averaged = None
    if args.average and len(list_checkpoints(result.run_dir)) >= args.average:
        weights, averaged = average_checkpoints(result.run_dir, args.average)
    translator = detr.load(result.run_dir, weights=weights)  # loaded once: the averaged weights or the best
    backward = None
    if spec.backward:  # on the same data files, which exist now
        back_out = Path(args.out) / spec.backward
        back_overrides = [f"run_dir={back_out / 'run'}", f"train.threads={args.threads}", *args.set]
        back_config = load_config(ROOT / "configs" / f"{spec.backward}.yaml", back_overrides)
        if args.lines:
            back_config = load_config(ROOT / "configs" / f"{spec.backward}.yaml",
                                      back_overrides + subset(back_config, args.lines, back_out / "data"))
        backward = detr.train(back_config, resume=True)
        translator.backward = detr.load(backward.run_dir)
    report = evaluate_recipe(translator, config, spec, args, out)
    report["training"] = {
        "steps": result.steps, "stopped": result.stopped, "seconds": round(result.seconds, 1),
        "best": result.best, "averaged_steps": averaged, "threads": args.threads,
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}"}
    if backward is not None:
        report["training"]["backward"] = {"recipe": spec.backward, "steps": backward.steps,
                                          "stopped": backward.stopped, "seconds": round(backward.seconds, 1),
                                          "best": backward.best}
    report["command"] = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    (out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "results.md").write_text(markdown(name, report), encoding="utf-8")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help=f"one of {', '.join(SPECS)}")
    parser.add_argument("--name", help="results name (default: the recipe's)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--average", type=int, default=0, help="average the last K checkpoints (0: no)")
    parser.add_argument("--beam", type=int, default=0, help="beam size (default: the recipe's)")
    parser.add_argument("--lp", type=lambda s: [float(x) for x in s.split(",")], default=[],
                        help="length penalties: one to use, or several to choose from on valid (translation)")
    parser.add_argument("--lines", type=int, default=0, help="use only the first N examples of every split")
    parser.add_argument("--choose-examples", type=int, default=200,
                        help="summaries and dialogue: valid examples the decoding is chosen on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    arguments = parse_args()
    print(markdown(arguments.name or arguments.recipe, run(arguments)))

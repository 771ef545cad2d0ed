"""Decode a test set with a trained model and score it against one or more references.

The test set is a source file with one reference file per reference set (`score_files`),
one TSV/JSONL file with a source field and one or more reference fields (`score_table`,
e.g. DialogSum's `dialogue` with `summary1..3`), or lists of texts (`score_texts`). Each
decodes the sources and returns an `EvalReport`. (Classify/tag runs are scored by their
predictors: `Classifier.score_file`, `Tagger.score_file`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from detr.config import DecodeConfig
from detr.errors import DataError
from detr.metrics import METRICS, Score, score
from detr.readers import count_lines, one_line, read_jsonl, read_lines, read_tsv
from detr.translator import Translator

EVAL_METRICS = (*METRICS, "ppl")


@dataclass
class EvalReport:
    """Scores of one decoded test set, with the decoding settings used and the outputs."""

    sentences: int
    scores: list[Score] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the decoding settings used
    hypotheses: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"sentences": self.sentences, "decode": self.options,
                "scores": [{"name": s.name, "score": round(s.score, 4), "signature": s.signature} for s in self.scores]}

    def lines(self) -> list[str]:
        return [f"{s.name} = {s.score:.2f}  ({s.signature})" for s in self.scores]


def score_texts(translator: Translator, sources: list[str], references: list[list[str]], metrics: list[str],
                hypotheses_out: str | Path | None = None, options: DecodeConfig | None = None) -> EvalReport:
    """Decode `sources` and score the outputs against the reference sets (each one text per source).

    Args:
        metrics: any of "bleu", "chrf" (sacrebleu), "rouge" (ROUGE-1/2/L, best reference per
            sentence), "distinct" (Distinct-1/2 of the outputs) and "ppl" (perplexity of the
            first reference set under teacher forcing).
        hypotheses_out: also write the outputs there, flushed line by line (line breaks inside an
            output are written as spaces, so line i belongs to source i).
        options: decoding settings (default: the run's).

    Raises:
        DataError: an unknown metric, no sources, or a reference set whose length differs from the sources.
    """
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise DataError(f"unknown metric {unknown[0]!r}; choose from {', '.join(EVAL_METRICS)}")
    if not sources:
        raise DataError("the test set is empty: nothing to score")
    for i, refs in enumerate(references):
        if len(refs) != len(sources):
            raise DataError(f"reference set {i + 1} has {len(refs)} texts but there are {len(sources)} sources")
    config = translator.checked(dataclasses.replace(options or translator.decode, nbest=1))
    hypotheses: list[str] = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_open_output(hypotheses_out)) if hypotheses_out else None
        for nbest in translator.iter_nbest(sources, config, scores=False):
            hypotheses.append(nbest[0][0])
            if out is not None:
                _write(out, one_line(hypotheses[-1]) + "\n", hypotheses_out)
    scores = score([m for m in metrics if m != "ppl"], hypotheses, references)
    if "ppl" in metrics:
        ppl = translator.perplexity(sources, references[0])
        scores.append(Score("PPL", ppl, "teacher forcing, per target subword, first reference"))
    return EvalReport(len(sources), scores, {"beam_size": config.beam_size,
                                             "length_penalty": config.length_penalty}, hypotheses)


def _open_output(path: str | Path):
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot write the outputs: {err.strerror or err}") from None


def _write(out, text: str, path: str | Path) -> None:
    try:
        out.write(text)
        out.flush()
    except OSError as err:
        raise DataError(f"{path}: cannot write the outputs: {err.strerror or err}") from None


def score_files(translator: Translator, src: str | Path, refs: list[str | Path], metrics: list[str],
                hypotheses_out: str | Path | None = None, options: DecodeConfig | None = None) -> EvalReport:
    """Translate `src` line by line and score the output against each file in `refs` (see `score_texts`).

    Raises:
        DataError: unreadable files, or a reference whose line count differs from the source.
    """
    n = count_lines(src)
    references = []
    for ref in refs:
        if count_lines(ref) != n:
            raise DataError(f"{ref} has {count_lines(ref)} lines but {src} has {n}")
        references.append([text for _, text in read_lines(ref)])
    sources = [text for _, text in read_lines(src)]
    if not sources:
        raise DataError(f"{src}: empty file: nothing to score")
    return score_texts(translator, sources, references, metrics, hypotheses_out, options)


def read_test_data(path: str | Path, src_field: str, ref_fields: list[str]) -> tuple[list[str], list[list[str]]]:
    """Sources and reference sets from a TSV (with a header) or JSONL file.

    Raises:
        DataError: a missing file or field (file and line named), or an unknown file type.
    """
    name = str(path)
    if name.endswith(".tsv"):
        reader = read_tsv
    elif name.endswith((".jsonl", ".json")):
        reader = read_jsonl
    else:
        raise DataError(f"{path}: --data needs a .tsv or .jsonl file (plain text: --src and --ref)")
    sources: list[str] = []
    references: list[list[str]] = [[] for _ in ref_fields]
    for _, (src, *refs) in reader(path, [src_field, *ref_fields]):
        sources.append(src)
        for column, text in zip(references, refs):
            column.append(text)
    return sources, references


def score_table(translator: Translator, path: str | Path, src_field: str, ref_fields: list[str],
                metrics: list[str], hypotheses_out: str | Path | None = None,
                options: DecodeConfig | None = None) -> EvalReport:
    """`score_texts` on a TSV/JSONL test file: `src_field` is decoded, each of `ref_fields` is a reference set."""
    sources, references = read_test_data(path, src_field, ref_fields)
    if not sources:
        raise DataError(f"{path}: no examples: nothing to score")
    return score_texts(translator, sources, references, metrics, hypotheses_out, options)

"""Decode a test set with a trained model and score it against one or more references.

The test set is a source file with one reference file per reference set (`evaluate`), or
one TSV/JSONL file with a source field and one or more reference fields
(`evaluate_data`, e.g. DialogSum's `dialogue` with `summary1..3`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from detr.data import count_lines, read_jsonl, read_lines, read_tsv
from detr.errors import DataError
from detr.metrics import METRICS, Score, score
from detr.translator import Translator

EVAL_METRICS = (*METRICS, "ppl")


@dataclass
class EvalReport:
    sentences: int
    scores: list[Score] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the decoding settings used
    hypotheses: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"sentences": self.sentences, "decode": self.options,
                "scores": [{"name": s.name, "score": round(s.score, 4), "signature": s.signature} for s in self.scores]}

    def lines(self) -> list[str]:
        return [f"{s.name} = {s.score:.2f}  ({s.signature})" for s in self.scores]


def evaluate_texts(translator: Translator, sources: list[str], references: list[list[str]], metrics: list[str],
                   hypotheses_out: str | Path | None = None, **options: object) -> EvalReport:
    """Decode `sources` and score the outputs against the reference sets (each one text per source).

    Args:
        metrics: any of "bleu", "chrf" (sacrebleu), "rouge" (ROUGE-1/2/L, best reference per
            sentence), "distinct" (Distinct-1/2 of the outputs) and "ppl" (perplexity of the
            first reference set under teacher forcing).
        hypotheses_out: also write the outputs there, flushed line by line (newlines inside an
            output are written as spaces, so line i belongs to source i).
        **options: decoding settings (`beam_size`, `length_penalty`, ...), as in `DecodeConfig`.

    Raises:
        DataError: an unknown metric, or a reference set whose length differs from the sources.
    """
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise DataError(f"unknown metric {unknown[0]!r}; choose from {', '.join(EVAL_METRICS)}")
    for i, refs in enumerate(references):
        if len(refs) != len(sources):
            raise DataError(f"reference set {i + 1} has {len(refs)} texts but there are {len(sources)} sources")
    config = translator.options(**{**options, "nbest": 1})
    hypotheses: list[str] = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(hypotheses_out, "w", encoding="utf-8")) if hypotheses_out else None
        for nbest in translator.iter_nbest(sources, config):
            hypotheses.append(nbest[0][0])
            if out is not None:
                out.write(" ".join(hypotheses[-1].splitlines()) + "\n")
                out.flush()
    scores = score([m for m in metrics if m != "ppl"], hypotheses, references)
    if "ppl" in metrics:
        ppl = translator.perplexity(sources, references[0], config.max_tokens)
        scores.append(Score("PPL", ppl, "teacher forcing, per target subword, first reference"))
    return EvalReport(len(sources), scores, {"beam_size": config.beam_size,
                                             "length_penalty": config.length_penalty}, hypotheses)


def evaluate(translator: Translator, src: str | Path, refs: list[str | Path], metrics: list[str],
             hypotheses_out: str | Path | None = None, **options: object) -> EvalReport:
    """Translate `src` line by line and score the output against each file in `refs` (see `evaluate_texts`).

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
    return evaluate_texts(translator, sources, references, metrics, hypotheses_out, **options)


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


def evaluate_data(translator: Translator, path: str | Path, src_field: str, ref_fields: list[str],
                  metrics: list[str], hypotheses_out: str | Path | None = None, **options: object) -> EvalReport:
    """`evaluate_texts` on a TSV/JSONL test file: `src_field` is decoded, each of `ref_fields` is a reference set."""
    sources, references = read_test_data(path, src_field, ref_fields)
    return evaluate_texts(translator, sources, references, metrics, hypotheses_out, **options)

"""Decode a test set with a trained model and score it against one or more references."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from detr.data import count_lines, read_lines
from detr.errors import DataError
from detr.metrics import METRICS, Score, score
from detr.translator import Translator


@dataclass
class EvalReport:
    sentences: int
    scores: list[Score] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the decoding settings used

    def to_dict(self) -> dict:
        return {"sentences": self.sentences, "decode": self.options,
                "scores": [{"name": s.name, "score": round(s.score, 4), "signature": s.signature} for s in self.scores]}

    def lines(self) -> list[str]:
        return [f"{s.name} = {s.score:.2f}  ({s.signature})" for s in self.scores]


def evaluate(translator: Translator, src: str | Path, refs: list[str | Path], metrics: list[str],
             hypotheses_out: str | Path | None = None, **options: object) -> EvalReport:
    """Translate `src` line by line and score the output against each file in `refs`.

    Args:
        metrics: any of "bleu", "chrf" (sacrebleu) and "rouge" (ROUGE-1/2/L).
        hypotheses_out: also write the outputs there, flushed line by line.
        **options: decoding settings (`beam_size`, `length_penalty`, ...), as in `DecodeConfig`.

    Raises:
        DataError: unreadable files, or a reference whose line count differs from the source.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise DataError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    config = translator.options(**{**options, "nbest": 1})
    n = count_lines(src)
    references = []
    for ref in refs:
        if count_lines(ref) != n:
            raise DataError(f"{ref} has {count_lines(ref)} lines but {src} has {n}")
        references.append([text for _, text in read_lines(ref)])
    hypotheses = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(hypotheses_out, "w", encoding="utf-8")) if hypotheses_out else None
        for nbest in translator.iter_nbest((text for _, text in read_lines(src)), config):
            hypotheses.append(nbest[0][0])
            if out is not None:
                out.write(hypotheses[-1] + "\n")
                out.flush()
    return EvalReport(n, score(metrics, hypotheses, references), {"beam_size": config.beam_size,
                                                                  "length_penalty": config.length_penalty})

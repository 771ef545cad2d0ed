"""How far MMI-bidi reranking (`decode.backward_weight`) of the beam's n-best goes on dialogue valid pairs:
decode the n-best once, rerank it with weights up to 10^4 (the backward run alone deciding), print
the decode's seconds, then BLEU, Distinct-1/2 and the number of different replies per weight.

    python benchmarks/mmi_ceiling.py BEAM

Needs runs/quality/dialogue_minilm{,_backward}/run (benchmarks/quality.py dialogue_minilm) and
../shared/data. The decoding is the one valid chose for the forward run (anti-LM 0.5 over 5 tokens).
"""
import sys
import time
from pathlib import Path

import torch

import detr
from detr.evaluate import read_test_data
from detr.metrics import score
from detr.rerank import backward_term, rerank

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

WEIGHTS = [0.0, 8.0, 16.0, 32.0, 64.0, 1e4]

if __name__ == "__main__":
    beam = int(sys.argv[1])
    torch.set_num_threads(2)
    translator = detr.load("runs/quality/dialogue_minilm/run")
    translator.backward = detr.load("runs/quality/dialogue_minilm_backward/run")
    sources, refs = read_test_data(Path("../shared/data/dialogue/dialogsum_turn_pairs/valid.tsv"), "context",
                                   ["response"])
    start = time.perf_counter()
    nbest = translator.translate_nbest(sources, translator.options(
        beam_size=beam, nbest=beam, repetition_penalty=1.0, no_repeat_ngram=0, anti_lm=0.5, anti_lm_steps=5))
    print("decoded", round(time.perf_counter() - start, 1), flush=True)
    scorer = quality.Remembered(translator.backward)
    for weight in WEIGHTS:
        outputs = [found[0][0] for found in rerank(sources, nbest, [backward_term(scorer.score, weight)])]
        scores = {s.name: round(s.score, 2) for s in score(["bleu", "distinct"], outputs, refs)}
        print(beam, weight, scores, len(set(outputs)), flush=True)

"""MMI reranking: the beam's outputs re-scored by a backward run (decode.backward_weight) and by the
model as a language model (decode.rerank_anti_lm)."""

import dataclasses
import math
from dataclasses import dataclass

import pytest

import detr
from detr.errors import ConfigError, DataError
from detr.rerank import anti_lm_term, backward_term, rerank
from tests.conftest import detr_cli, train_toy

WEIGHT = 0.7


@dataclass
class FakeScore:
    per_token: float


class TableScorer:
    """A model that gives each (source, target) pair a listed per-token log-probability."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table, self.calls = table, []

    def score(self, sources, targets):
        pairs = list(zip(sources, targets))
        self.calls.append(pairs)
        return [FakeScore(self.table[pair]) for pair in pairs]


def test_rerank_adds_the_weighted_backward_score_and_leaves_padding_and_blank_sources():
    scorer = TableScorer({("thanks", "x"): -3.0, ("i see the cat", "x"): -1.0, ("yes", "y"): -2.0})
    candidates = [[("thanks", -1.0), ("i see the cat", -1.5), ("", 0.0)], [("yes", -0.5)], [("", 0.0), ("", 0.0)]]
    out = rerank(["x", "y", "  "], candidates, [backward_term(scorer.score, 0.5)])
    assert out[0] == [("i see the cat", -1.5 - 0.5), ("thanks", -1.0 - 1.5), ("", 0.0)]  # padding last, unscored
    assert out[1] == [("yes", -0.5 - 1.0)]
    assert out[2] == candidates[2]  # a blank source: nothing to score
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 3  # one batched call, no padding, no blank source
    assert rerank(["x"], candidates[:1], [backward_term(scorer.score, 0.0)])[0] == candidates[0]  # the beam's order
    assert len(scorer.calls) == 1  # a weight of 0 scores nothing


def test_the_anti_lm_term_subtracts_the_blank_source_score_and_terms_add_up():
    backward = TableScorer({("thanks", "x"): -3.0, ("i see the cat", "x"): -1.0})
    language_model = TableScorer({("", "thanks"): -0.5, ("", "i see the cat"): -4.0})
    candidates = [[("thanks", -1.0), ("i see the cat", -1.5)]]
    out = rerank(["x"], candidates, [anti_lm_term(language_model.score, 1.0)])
    assert out[0] == [("i see the cat", -1.5 + 4.0), ("thanks", -1.0 + 0.5)]  # the generic reply loses
    both = rerank(["x"], candidates, [backward_term(backward.score, 0.5), anti_lm_term(language_model.score, 0.25)])
    assert both[0] == [("i see the cat", -1.5 - 0.5 + 1.0), ("thanks", -1.0 - 1.5 + 0.125)]


@pytest.fixture(scope="module")
def toy(toy_run, tmp_path_factory):
    """The toy en→de run, and a de→en run trained on the same corpus as its backward model."""
    backward_root = train_toy(tmp_path_factory.mktemp("backward"), steps=150,
                              **{"data.src_lang": "de", "data.tgt_lang": "en"})
    translator = detr.load(toy_run / "run")
    translator.backward = detr.load(backward_root / "run")
    sources = (toy_run / "data" / "test.en").read_text().splitlines()[:16]
    return translator, sources, toy_run, backward_root


def test_the_output_is_the_beam_output_with_the_best_combined_score(toy):
    translator, sources, _, _ = toy
    beam = translator.translate_nbest(sources, translator.options(beam_size=4, nbest=4))
    expected = []
    for source, found in zip(sources, beam):
        back = translator.backward.score([text for text, _ in found], [source] * len(found))
        combined = [(text, score + WEIGHT * b.per_token) for (text, score), b in zip(found, back)]
        expected.append(sorted(combined, key=lambda c: -c[1]))
    reranked = translator.translate_nbest(sources, translator.options(beam_size=4, nbest=4, backward_weight=WEIGHT))
    for got, want in zip(reranked, expected):
        assert [text for text, _ in got] == [text for text, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=1e-5)
    best = translator.translate(sources, translator.options(beam_size=4, backward_weight=WEIGHT))
    assert best == [found[0][0] for found in reranked]
    assert any(b != r[0][0] for b, r in zip(translator.translate(sources), reranked)), "the weight changed nothing"


@pytest.mark.parametrize("backward_weight", [0.0, WEIGHT])
def test_anti_lm_reranking_is_the_beam_minus_the_blank_source_score(toy, backward_weight):
    """Without a backward run (or with one), each output's score less W times its per-token
    log-probability given a blank source, plus the backward term."""
    translator, sources, toy_root, _ = toy
    if not backward_weight:
        translator = detr.load(toy_root / "run")  # no backward run loaded: the anti-LM alone
    beam = translator.translate_nbest(sources, translator.options(beam_size=4, nbest=4))
    expected = []
    for source, found in zip(sources, beam):
        texts = [text for text, _ in found]
        lm = translator.score([""] * len(found), texts)
        back = translator.backward.score(texts, [source] * len(found)) if backward_weight else lm
        combined = [(text, score + backward_weight * b.per_token - WEIGHT * m.per_token)
                    for (text, score), b, m in zip(found, back, lm)]
        expected.append(sorted(combined, key=lambda c: -c[1]))
    options = translator.options(beam_size=4, nbest=4, rerank_anti_lm=WEIGHT, backward_weight=backward_weight)
    reranked = translator.translate_nbest(sources, options)
    for got, want in zip(reranked, expected):
        assert [text for text, _ in got] == [text for text, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=1e-5)


def test_lines_before_a_bad_line_are_answered(toy):
    translator, sources, _, _ = toy
    lines = sources[:3] + ["word " * 500] + sources[3:5]
    translator.on_overlong = "error"
    answered = []
    try:
        with pytest.raises(DataError, match="line 4"):
            for found in translator.iter_nbest(lines, translator.options(beam_size=4, backward_weight=WEIGHT)):
                answered.append(found)
    finally:
        translator.on_overlong = "truncate"
    assert len(answered) == 3


def test_backward_reranking_is_refused_where_it_cannot_apply(toy):
    translator, sources, _, _ = toy
    plain = detr.load(toy[2] / "run")
    with pytest.raises(ConfigError, match="needs a backward run"):
        plain.translate(sources[:1], plain.options(backward_weight=1.0))
    with pytest.raises(ConfigError, match="needs decode.beam_size > 1"):
        translator.options(beam_size=1, backward_weight=1.0)
    with pytest.raises(ConfigError, match="use one"):
        translator.options(beam_size=4, mbr=4, backward_weight=1.0)
    with pytest.raises(ConfigError, match="must not be negative"):
        translator.options(backward_weight=-1.0)
    with pytest.raises(ConfigError, match="sampling does not use them"):
        translator.generate(sources[:1], translator.options(backward_weight=1.0))
    with pytest.raises(ConfigError, match="no reranking"):
        translator.stream(translator.options(backward_weight=1.0))
    with pytest.raises(ConfigError, match="decode.rerank_anti_lm reranks the beam's outputs"):
        translator.options(beam_size=1, rerank_anti_lm=1.0)
    with pytest.raises(ConfigError, match="decode.rerank_anti_lm and decode.mbr"):
        translator.options(beam_size=4, mbr=4, rerank_anti_lm=1.0)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="rerank_anti_lm"):
            translator.options(rerank_anti_lm=bad)
    with pytest.raises(ConfigError, match="sampling does not use them"):
        translator.generate(sources[:1], translator.options(rerank_anti_lm=1.0))
    with pytest.raises(ConfigError, match="no reranking"):
        translator.stream(translator.options(rerank_anti_lm=1.0))


def test_cli_translate_and_evaluate_rerank_with_backward(toy, tmp_path):
    translator, sources, forward_root, backward_root = toy
    (tmp_path / "in.en").write_text("\n".join(sources) + "\n")
    flags = ["--backward", str(backward_root / "run"), "--backward-weight", str(WEIGHT), "--beam-size", "4"]
    done = detr_cli("translate", str(forward_root / "run"), "-i", str(tmp_path / "in.en"), *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == translator.translate(sources, translator.options(beam_size=4,
                                                                                         backward_weight=WEIGHT))
    references = (forward_root / "data" / "test.de").read_text().splitlines()[:16]
    (tmp_path / "ref.de").write_text("\n".join(references) + "\n")
    scored = detr_cli("evaluate", str(forward_root / "run"), "--src", str(tmp_path / "in.en"),
                      "--ref", str(tmp_path / "ref.de"), "--json", *flags)
    assert scored.returncode == 0, scored.stderr
    missing = detr_cli("translate", str(forward_root / "run"), "--backward", str(tmp_path / "nothing"),
                       "--backward-weight", "1", stdin="a dog\n")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "nothing" in missing.stderr
    unloaded = detr_cli("translate", str(forward_root / "run"), "--backward-weight", "1", stdin="a dog\n")
    assert unloaded.returncode != 0 and "--backward RUN" in unloaded.stderr
    anti_lm = detr_cli("translate", str(forward_root / "run"), "-i", str(tmp_path / "in.en"), "--beam-size", "4",
                       "--rerank-anti-lm", str(WEIGHT))  # needs no backward run
    assert anti_lm.returncode == 0, anti_lm.stderr
    plain = detr.load(forward_root / "run")
    assert anti_lm.stdout.splitlines() == plain.translate(sources, plain.options(beam_size=4, rerank_anti_lm=WEIGHT))


def test_scoring_a_run_that_decodes_with_a_backward_run_needs_none(toy, tmp_path):
    """A run whose decode section sets backward_weight still scores pairs (forced decoding uses no
    backward run): the same scores as with the weight off; its searches still ask for the run."""
    _, sources, forward_root, _ = toy
    references = (forward_root / "data" / "test.de").read_text().splitlines()[:16]
    plain = detr.load(forward_root / "run")
    expected = plain.score(sources, references)
    plain.decode = dataclasses.replace(plain.decode, beam_size=4, backward_weight=WEIGHT)  # as a run's config.yaml
    assert [s.total for s in plain.score(sources, references)] == [s.total for s in expected]
    with pytest.raises(ConfigError, match="needs a backward run"):
        plain.translate(sources[:1])
    (tmp_path / "src").write_text("\n".join(sources) + "\n")
    (tmp_path / "tgt").write_text("\n".join(references) + "\n")
    scored = detr_cli("score", str(forward_root / "run"), "--src", str(tmp_path / "src"),
                      "--tgt", str(tmp_path / "tgt"), "--beam-size", "4", "--backward-weight", str(WEIGHT))
    assert scored.returncode == 0, scored.stderr
    assert [float(x) for x in scored.stdout.split()] == pytest.approx([s.total for s in expected], abs=1e-5)

"""Decoding control on a trained tiny model: lexical constraints, prefixes, ensembles, MBR, scoring."""

import itertools
import logging
import random

import pytest
import torch
from sacrebleu import sentence_bleu, sentence_chrf

import detr
from detr.batching import pad
from detr.config import DecodeConfig
from detr.constraints import Candidate, Constraints, Progress, allocate, constrained_beam_search
from detr.errors import ConfigError, DataError
from detr.mbr import mbr_rank
from detr.search import Decoding, beam_search
from detr.tokenizer import BOS, train_tokenizer
from detr.translator import Translator
from tests.conftest import detr_cli


@pytest.fixture(scope="module")
def toy(toy_run):
    translator = detr.load(toy_run / "run")
    sources = (toy_run / "data" / "test.en").read_text().splitlines()
    references = (toy_run / "data" / "test.de").read_text().splitlines()
    return translator, sources, references


def random_constraints(references, seed=1):
    """Per line: one or two phrases of its reference (a word or two adjacent words) to include,
    and a word of another reference, sharing no word with them, to exclude."""
    rng = random.Random(seed)
    out = []
    for ref in references:
        words = ref.split()
        start = rng.randrange(len(words))
        include = [" ".join(words[start:start + rng.choice([1, 2])])]
        if len(words) > 3 and rng.random() < 0.5:
            include.append(rng.choice([w for w in words if w not in include[0]] or words))
        other = references[rng.randrange(len(references))].split()
        exclude = [w for w in other if not any(w in p or p in w for p in include)][:1]
        out.append(Constraints(tuple(include), tuple(exclude)))
    return out


def test_every_output_holds_every_included_phrase_and_no_excluded_one(toy):
    translator, sources, references = toy
    wishes = random_constraints(references)
    outputs = translator.translate(sources, translator.options(beam_size=4), wishes)
    assert len(outputs) == len(sources) == 200
    assert [o for o, w in zip(outputs, wishes) if w.unmet(o)] == []
    assert [o for o, w in zip(outputs, wishes) if w.violated(o)] == []
    plain = translator.translate(sources, translator.options(beam_size=4))
    assert sum(bool(w.unmet(p)) for p, w in zip(plain, wishes)) > 50  # the constraints did change outputs


def test_with_no_phrases_constrained_search_makes_exactly_beam_searchs_choices(toy):
    translator, sources, _ = toy
    src = pad([translator.encode_line(i, s) for i, s in enumerate(sources[:40], 1)])
    for config in (DecodeConfig(beam_size=4, nbest=3), DecodeConfig(beam_size=2, length_penalty=0.6),
                   DecodeConfig(beam_size=3, anti_lm=0.5, anti_lm_steps=2)):
        plain = beam_search(translator.model, src, config)
        constrained = constrained_beam_search(translator.model, src, config, None)
        assert [[(h.tokens, h.score) for h in nbest] for nbest in plain] == \
               [[(h.tokens, h.score) for h in nbest] for nbest in constrained]


def test_phrases_to_include_are_refused_with_beam_groups(toy):
    translator, sources, references = toy
    with pytest.raises(ConfigError, match="phrases to include need one beam"):
        translator.translate(sources[:3], translator.options(beam_size=4, beam_groups=2),
                             random_constraints(references[:3]))


def test_constrained_outputs_do_not_depend_on_the_batch(toy):
    translator, sources, references = toy
    wishes = random_constraints(references[:24], seed=2)
    together = translator.translate_nbest(sources[:24], translator.options(beam_size=3, nbest=2), wishes)
    alone = [translator.translate_nbest([s], translator.options(beam_size=3, nbest=2), [w])[0]
             for s, w in zip(sources[:24], wishes)]
    assert [[t for t, _ in n] for n in together] == [[t for t, _ in n] for n in alone]
    assert all(s1 == pytest.approx(s2, abs=1e-4) for a, b in zip(together, alone) for (_, s1), (_, s2) in zip(a, b))


def test_a_phrase_that_cannot_fit_still_gives_an_output_and_a_warning(toy, caplog):
    translator, sources, _ = toy
    wish = Constraints(include=("einhundertdreiundzwanzig rote Hunde und zweihundert blaue Bücher",))
    tight = translator.options(beam_size=3, max_len_a=0.0, max_len_b=3)
    translator.model.config.max_positions, saved = 8, translator.model.config.max_positions  # a hard length cap
    try:
        with caplog.at_level(logging.WARNING):
            (out,) = translator.translate([sources[0]], tight, [wish])
    finally:
        translator.model.config.max_positions = saved
    assert out and "line 1: the output lacks the phrase 'einhundertdreiundzwanzig rote Hunde" in caplog.text


def test_dynamic_beam_allocation_shares_the_beam_over_the_banks():
    progress = Progress((False,))
    cands = [Candidate(-float(i), i, i, progress, bank) for i, bank in enumerate([0, 0, 0, 1, 2, 2])]
    assert [c.bank for c in allocate(cands, banks=3, k=3)] == [0, 1, 2]  # one slot each, best first
    assert [c.beam for c in allocate(cands, banks=3, k=4)] == [0, 3, 4, 5]  # the spare slot to the top bank
    assert [c.bank for c in allocate(cands[:3], banks=3, k=2)] == [0, 0]  # empty banks give their slots away
    phrases = ((5, 6), (7,))
    p = Progress((False, False)).advance(5, phrases)
    assert (p.phrase, p.done, p.count(phrases), p.wanted(phrases)) == (0, 1, 1, {6})
    assert p.advance(9, phrases) == Progress((False, False))  # a different token: the phrase starts again
    done = p.advance(6, phrases).advance(7, phrases)
    assert done.complete() and done.count(phrases) == 3


@pytest.mark.parametrize("text,message", [
    ('{"include": "Hund"}', "include must be a list of non-empty strings"),
    ('{"include": [""]}', "include must be a list of non-empty strings"),
    ('{"colour": []}', "unknown field(s) colour"),
    ('["Hund"]', "expected a JSON object"),
    ('{"include": ["roter Hund"], "exclude": ["Hund"]}', "contains the excluded phrase 'Hund'"),
    ('{"prefix": "ein Hund", "exclude": ["Hund"]}', "the prefix contains the excluded phrase"),
    ("{nope", "invalid JSON"),
])
def test_bad_constraint_lines_name_the_line_and_field(text, message):
    with pytest.raises(DataError, match="c.jsonl:3: ") as err:
        Constraints.parse(text, "c.jsonl:3")
    assert message in str(err.value)
    assert not Constraints.parse("", "x") and Constraints.parse('{"exclude": ["Hund"]}', "x").exclude == ("Hund",)
    assert Constraints.parse('{"exclude": ["ein"]}', "x").violated("einhundert Hunde") == []  # whole words only


# ------------------------------------------------------------------ prefixes


def test_outputs_start_with_the_prefix_and_an_empty_prefix_changes_nothing(toy):
    translator, sources, references = toy
    prefixes = [" ".join(r.split()[:2]) for r in references[:30]]
    wishes = [Constraints(prefix=p) for p in prefixes]
    for options in (translator.options(beam_size=1), translator.options(beam_size=4)):
        outputs = translator.translate(sources[:30], options, wishes)
        assert all(o.startswith(p) for o, p in zip(outputs, prefixes))
        empty = translator.translate(sources[:30], options, [Constraints(prefix="")] * 30)
        assert empty == translator.translate(sources[:30], options)
    samples = translator.generate(sources[:10], translator.options(num_samples=3, seed=4), wishes[:10])
    assert all(text.startswith(p) for one, p in zip(samples, prefixes) for text, _ in one)
    with pytest.raises(ConfigError, match="line 1: phrases to include need beam search"):
        translator.generate(sources[:1], None, [Constraints(include=("Hund",))])


# ------------------------------------------------------------------ ensembles


def test_an_ensemble_of_a_run_with_itself_equals_the_run(toy, toy_run):
    translator, sources, references = toy
    pair = detr.load_ensemble([toy_run / "run", toy_run / "run"])
    for options in (translator.options(beam_size=1), translator.options(beam_size=4, nbest=2)):
        alone, both = translator.translate_nbest(sources[:40], options), pair.translate_nbest(sources[:40], options)
        assert [[t for t, _ in n] for n in alone] == [[t for t, _ in n] for n in both]
        assert all(a == pytest.approx(b, abs=1e-4) for x, y in zip(alone, both) for (_, a), (_, b) in zip(x, y))
    wishes = random_constraints(references[:20], seed=3)
    options = translator.options(beam_size=3)
    assert pair.translate(sources[:20], options, wishes) == translator.translate(sources[:20], options, wishes)
    sampled = translator.options(num_samples=2, seed=9)
    assert [[t for t, _ in s] for s in pair.generate(sources[:10], sampled)] == \
           [[t for t, _ in s] for s in translator.generate(sources[:10], sampled)]
    assert [s.total for s in pair.score(sources[:20], references[:20])] == \
           pytest.approx([s.total for s in translator.score(sources[:20], references[:20])], abs=1e-4)


def test_runs_with_other_vocabularies_cannot_form_an_ensemble(toy):
    translator, _, _ = toy
    other_tokenizer = train_tokenizer(["ein Hund", "zwei Katzen"] * 50, None, 300)
    other = Translator(translator.model, other_tokenizer, translator.decode)
    with pytest.raises(ConfigError, match="runs/b: its target vocabulary differs from runs/a's"):
        Translator.ensemble([translator, other], ["runs/a", "runs/b"])


def test_an_ensemble_averages_the_members_log_probabilities(toy, toy_run):
    translator, sources, _ = toy
    other = detr.load(toy_run / "run")
    torch.manual_seed(0)
    with torch.no_grad():  # a second model: the same architecture, its weights perturbed
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = pad([translator.encode_line(1, sources[0])])
    last = torch.tensor([[BOS]])
    with torch.no_grad():
        got = Decoding([translator.model, other.model], src).next_logp(last)
        each = [torch.log_softmax(m(src, last)[:, -1].float(), -1) for m in (translator.model, other.model)]
    assert torch.allclose(got, torch.log_softmax((each[0] + each[1]) / 2, -1), atol=1e-5)
    assert not torch.allclose(each[0], each[1], atol=1e-3)


# ------------------------------------------------------------------ MBR


def test_mbr_picks_the_candidate_with_the_highest_expected_utility(toy):
    translator, sources, _ = toy
    n = 8
    options = translator.options(num_samples=n, seed=3, temperature=0.7)
    candidates = translator.generate(sources[:6], options)
    chosen = translator.translate_nbest(sources[:6], translator.options(mbr=n, seed=3, temperature=0.7))
    for metric, score in (("chrf", sentence_chrf), ("bleu", sentence_bleu)):
        for one in candidates:
            texts = [t for t, _ in one]
            brute = {h: sum(score(h, [r]).score for r in texts) / n for h in texts}
            ranked = mbr_rank(texts, metric)
            assert ranked[0][1] == pytest.approx(max(brute.values()), abs=1e-9)
            assert brute[ranked[0][0]] == pytest.approx(max(brute.values()), abs=1e-9)
    assert [c[0][0] for c in chosen] == [mbr_rank([t for t, _ in one])[0][0] for one in candidates]


def test_mbr_of_one_sample_is_that_sample_and_beam_candidates_work(toy):
    translator, sources, _ = toy
    one = translator.translate(sources[:10], translator.options(mbr=1, seed=5))
    assert one == [s[0][0] for s in translator.generate(sources[:10], translator.options(num_samples=1, seed=5))]
    nbest = translator.translate_nbest(sources[:5], translator.options(beam_size=4, mbr=4, mbr_candidates="beam",
                                                                      nbest=2))
    assert all(len(n) == 2 and n[0][1] >= n[1][1] for n in nbest)
    with pytest.raises(ConfigError, match="decode.mbr=8 beam candidates need decode.beam_size >= 8"):
        translator.options(beam_size=4, mbr=8, mbr_candidates="beam")


# ------------------------------------------------------------------ scoring


def test_score_is_the_sum_of_forced_decoding_steps_and_does_not_depend_on_the_batch(toy):
    translator, sources, references = toy
    scores = translator.score(sources[:30], references[:30])
    small = translator.score(sources[:30], references[:30], translator.options(max_tokens=40))
    assert [s.total for s in small] == pytest.approx([s.total for s in scores], abs=1e-5)
    for src_text, ref, got in itertools.islice(zip(sources, references, scores), 8):
        src = pad([translator.encode_line(1, src_text)])
        target = translator.encode_target(1, ref)  # ids + </s>
        state, last, total = Decoding(translator.model, src), BOS, 0.0
        with torch.no_grad():
            for token in target:  # one cached step at a time, as a search would
                total += float(state.next_logp(torch.tensor([[last]]))[0, token])
                last = token
        assert got.total == pytest.approx(total, abs=1e-5) and got.tokens == len(target)
    assert scores[0].per_token == pytest.approx(scores[0].total / scores[0].tokens)
    with pytest.raises(DataError, match="pair 2: there are more sources than targets"):
        translator.score(sources[:2], references[:1])


# ------------------------------------------------------------------ the command line


def test_translate_with_constraints_a_prefix_file_and_an_ensemble_on_the_command_line(toy, toy_run, tmp_path):
    translator, sources, references = toy
    run_dir = str(toy_run / "run")
    (tmp_path / "src").write_text("\n".join(sources[:4]) + "\n")
    (tmp_path / "c.jsonl").write_text('{"include": ["Hunde"]}\n\n{"exclude": ["sie"]}\n{"include": ["rote"]}\n')
    (tmp_path / "p.txt").write_text("\nwir haben\n\n\n")
    out = detr_cli("translate", run_dir, run_dir, "-i", str(tmp_path / "src"),
                   "--constraints", str(tmp_path / "c.jsonl"), "--prefix", str(tmp_path / "p.txt"), "--beam-size", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    wishes = [Constraints(("Hunde",)), Constraints(prefix="wir haben"), Constraints(exclude=("sie",)),
              Constraints(("rote",))]
    assert lines == translator.translate(sources[:4], translator.options(beam_size=3), wishes)
    assert "Hunde" in lines[0] and lines[1].startswith("wir haben") and "rote" in lines[3]
    (tmp_path / "bad.jsonl").write_text('{"include": ["Hunde"]}\n{"include": "x"}\n')
    bad = detr_cli("translate", run_dir, "-i", str(tmp_path / "src"), "--constraints", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 2 and "bad.jsonl:2: include must be a list" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stdout.splitlines()) == 1  # line 1 was translated and kept
    (tmp_path / "short.jsonl").write_text("\n")
    short = detr_cli("translate", run_dir, "-i", str(tmp_path / "src"), "--constraints", str(tmp_path / "short.jsonl"))
    assert short.returncode == 2 and "line 2: there are fewer constraint lines than input lines" in short.stderr


def test_score_on_the_command_line(toy, toy_run, tmp_path):
    translator, sources, references = toy
    (tmp_path / "src").write_text("\n".join(sources[:5]) + "\n")
    (tmp_path / "tgt").write_text("\n".join(references[:5]) + "\n")
    run_dir = str(toy_run / "run")
    out = detr_cli("score", run_dir, "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"))
    normalized = detr_cli("score", run_dir, run_dir, "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"),
                          "--normalize")
    assert out.returncode == 0 and normalized.returncode == 0, out.stderr + normalized.stderr
    expected = translator.score(sources[:5], references[:5])
    assert [float(x) for x in out.stdout.split()] == pytest.approx([s.total for s in expected], abs=1e-5)
    assert [float(x) for x in normalized.stdout.split()] == pytest.approx([s.per_token for s in expected], abs=1e-5)
    (tmp_path / "tgt").write_text(references[0] + "\n")
    bad = detr_cli("score", run_dir, "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"))
    assert bad.returncode == 2 and "tgt: ends at line 1, before the other file" in bad.stderr

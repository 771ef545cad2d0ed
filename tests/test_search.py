"""Search equivalences on a trained tiny model: cached = uncached, beam 1 = greedy, batch-independence."""

import math

import pytest
import torch

import detr
from detr.batching import pad
from detr.config import DecodeConfig
from detr.model import padding_mask
from detr.search import (
    BeamSearch,
    Guide,
    OnePerSentence,
    beam_search,
    greedy,
    length_penalty,
    row_argmax,
    row_topk,
    sample,
)
from detr.tokenizer import BOS, EOS


@pytest.fixture(scope="module")
def toy(toy_run):
    translator = detr.load(toy_run / "run")
    sources = (toy_run / "data" / "test.en").read_text().splitlines()
    return translator, sources


def source_ids(translator, lines):
    return pad([translator.encode_line(i, line) for i, line in enumerate(lines, 1)])


def log_prob(model, src, tokens):
    """Teacher-forced log-probability of `tokens` + </s> (the explicit, uncached computation)."""
    tgt = torch.tensor([[BOS] + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(src, tgt).float(), -1)[0]
    return float(sum(logp[i, t] for i, t in enumerate(tokens + [EOS])))


def test_greedy_with_the_cache_equals_greedy_recomputed_from_scratch(toy):
    translator, sources = toy
    model = translator.model
    for line in sources[:10]:
        src = source_ids(translator, [line])
        fast = greedy(model, src)[0]
        memory, out = model.encode(src), []
        for _ in range(60):  # the explicit way: the whole prefix again at every step
            with torch.no_grad():
                logits = model.decode(torch.tensor([[BOS] + out]), memory, padding_mask(src))[0, -1]
            token = int(logits.argmax())
            if token == EOS:
                break
            out.append(token)
        assert fast.tokens == out
        assert fast.score == pytest.approx(log_prob(model, src, out), abs=1e-4)


def test_anti_lm_greedy_equals_its_definition_recomputed_from_scratch(toy):
    """MMI-antiLM: over the first `anti_lm_steps` tokens each choice maximises log p(y | source) −
    λ·log p(y | blank source) (</s> not penalised); after them, plain log p(y | source)."""
    translator, sources = toy
    model, weight, steps = translator.model, 0.8, 3
    decode = DecodeConfig(beam_size=1, anti_lm=weight, anti_lm_steps=steps)
    blank = torch.tensor([[EOS]])
    changed = 0
    for line in sources[:12]:
        src = source_ids(translator, [line])
        fast = greedy(model, src, decode)[0]
        memory, lm_memory, out, score = model.encode(src), model.encode(blank), [], 0.0
        for t in range(60):
            prefix = torch.tensor([[BOS] + out])
            with torch.no_grad():
                logp = torch.log_softmax(model.decode(prefix, memory, padding_mask(src))[0, -1], -1)
                lm = torch.log_softmax(model.decode(prefix, lm_memory, padding_mask(blank))[0, -1], -1)
            if t < steps:
                lm[EOS] = 0.0
                logp = logp - weight * lm
            token = int(logp.argmax())
            score += float(logp[token])
            if token == EOS:
                break
            out.append(token)
        assert fast.tokens == out
        assert fast.score == pytest.approx(score, abs=1e-4)
        changed += out != greedy(model, src)[0].tokens
    assert changed  # the anti-LM changed some outputs


def test_beam_size_one_is_exactly_greedy(toy):
    translator, sources = toy
    src = source_ids(translator, sources[:64])
    greedy_out = [h.tokens for h in greedy(translator.model, src)]
    beam_out = [nbest[0].tokens for nbest in beam_search(translator.model, src, DecodeConfig(beam_size=1))]
    assert beam_out == greedy_out


@pytest.mark.parametrize("beam", [1, 4])
def test_output_does_not_depend_on_the_batch(toy, beam):
    translator, sources = toy
    together = translator.translate(sources, translator.options(beam_size=beam, batch_size=64))
    alone = [translator.translate([line], translator.options(beam_size=beam))[0] for line in sources]
    assert together == alone
    assert sum(a == "" for a in alone) == 0


def decode_joining(search, translator, lines, guides=None):
    """Decode `lines` with sentences joining a running `search` in waves of 1, 2, 3, ... between steps
    (continuous batching), every wave while others run; each line's result, in order."""
    pending, results, wave, joined = list(range(len(lines))), {}, 1, 0
    owner = {}
    while pending or search.running:
        if pending:
            batch, pending = pending[:wave], pending[wave:]
            ids = search.admit(source_ids(translator, [lines[i] for i in batch]),
                               None if guides is None else [guides[i] for i in batch])
            owner.update(zip(ids, batch))
            wave += 1
        joined += search.joined  # sentences of different ages share this step
        for sid, found in search.step():
            results[owner[sid]] = found
    assert joined > 10  # the waves really ran side by side
    assert search.state is None and not search.running
    return [results[i] for i in range(len(lines))]


@pytest.mark.parametrize("options", [dict(beam_size=1), dict(beam_size=1, no_repeat_ngram=2, repetition_penalty=1.5,
                                                                 min_len=3),
                                     dict(beam_size=4, nbest=2), dict(beam_size=3, no_repeat_ngram=2, min_len=4),
                                     dict(beam_size=1, anti_lm=0.5, anti_lm_steps=3),
                                     dict(beam_size=4, anti_lm=0.7, anti_lm_steps=2),
                                     dict(beam_size=4, nbest=4, beam_groups=2, diversity_penalty=1.5, min_len=2)])
def test_sentences_joining_a_running_batch_get_what_they_get_alone(toy, options):
    translator, sources = toy
    lines = sorted(sources[:40], key=len, reverse=True)[::2] + sources[:20]  # long and short sources mixed
    decode = DecodeConfig(**options)
    search = BeamSearch(translator.model, decode) if decode.beam_size > 1 else \
        OnePerSentence(translator.model, decode, row_argmax)
    joined = decode_joining(search, translator, lines)
    for line, got in zip(lines, joined):
        alone = beam_search(translator.model, source_ids(translator, [line]), decode)[0] if decode.beam_size > 1 \
            else greedy(translator.model, source_ids(translator, [line]), decode)[0]
        got, alone = (got, alone) if decode.beam_size > 1 else ([got], [alone])
        assert [h.tokens for h in got] == [h.tokens for h in alone]
        assert [h.score for h in got] == pytest.approx([h.score for h in alone], abs=1e-4)


def test_guides_hold_for_sentences_that_join_later(toy):
    translator, sources = toy
    lines = sources[:12]
    first = translator.tokenizer.tgt.encode(translator.translate([lines[0]])[0])[:2]
    guides = [Guide(prefix=tuple(first)) if i % 3 == 0 else Guide(exclude=((first[0],),)) for i in range(len(lines))]
    decode = DecodeConfig(beam_size=1)
    joined = decode_joining(OnePerSentence(translator.model, decode, row_argmax), translator, lines, guides)
    for line, guide, got in zip(lines, guides, joined):
        alone = greedy(translator.model, source_ids(translator, [line]), decode, [guide])[0]
        assert got.tokens == alone.tokens
        assert got.tokens[:len(guide.prefix)] == list(guide.prefix)
        assert not guide.exclude or first[0] not in got.tokens


def test_a_translation_stream_gives_each_request_what_translate_gives(toy):
    from detr.constraints import Constraints
    from detr.errors import ConfigError

    translator, sources = toy
    options = translator.options(beam_size=3, nbest=2)
    requests = {"a": sources[:5], "b": ["", "   "], "c": [sources[5], "", (sources[6], Constraints(prefix="wir"))]}
    stream, got = translator.stream(options), {}
    for tag, lines in requests.items():
        got.update(stream.add(tag, lines))
        got.update(stream.step())  # the next request joins one step later
    while stream.running:
        got.update(stream.step())
    assert got["b"] == [[("", 0.0)] * 2] * 2  # blank lines only: done as it joined
    for tag, lines in requests.items():
        plain = [x if isinstance(x, str) else x[0] for x in lines]
        wishes = [Constraints() if isinstance(x, str) else x[1] for x in lines]
        expected = translator.translate_nbest(plain, options, wishes)
        assert [[t for t, _ in n] for n in got[tag]] == [[t for t, _ in n] for n in expected]
    assert got["c"][2][0][0].startswith("wir")
    with pytest.raises(ConfigError, match="include"):
        stream.add("d", [(sources[0], Constraints(include=("Hund",)))])
    with pytest.raises(ConfigError, match="MBR"):
        translator.stream(translator.options(mbr=4))


def test_a_beam_stream_takes_new_lines_only_in_its_first_steps(toy):
    from detr.translator import BEAM_JOIN_STEPS

    translator, sources = toy
    greedy_stream = translator.stream(translator.options(beam_size=1, max_len_a=0, max_len_b=20, min_len=10))
    beam_stream = translator.stream(translator.options(beam_size=2, max_len_a=0, max_len_b=20, min_len=10))
    for stream in (greedy_stream, beam_stream):
        stream.add("a", sources[:2])
        for _ in range(BEAM_JOIN_STEPS):
            assert stream.joinable
            stream.step()
    assert greedy_stream.joinable and beam_stream.running and not beam_stream.joinable
    while beam_stream.running:
        beam_stream.step()
    assert beam_stream.joinable  # a new batch: open again


def test_a_stream_warns_of_an_unkept_phrase_as_translate_does(toy, caplog, monkeypatch):
    """A phrase kept out token by token can still appear made of other subwords: `translate` warns,
    naming the line, and so does a stream (the check itself is forced to fire here)."""
    import logging

    from detr.constraints import Constraints

    translator, sources = toy
    monkeypatch.setattr(Constraints, "violated", lambda self, text: list(self.exclude))
    stream = translator.stream(translator.options(beam_size=1))
    stream.add("a", [sources[0], (sources[1], Constraints(exclude=("zzz",)))])
    with caplog.at_level(logging.WARNING, logger="detr.translator"):
        while stream.running:
            stream.step()
    assert "line 2: the output holds the excluded phrase 'zzz'" in caplog.text
    assert "line 1:" not in caplog.text


def test_beam_scores_are_length_normalised_log_probabilities_and_nbest_is_sorted(toy):
    translator, sources = toy
    for line in sources[:5]:
        src = source_ids(translator, [line])
        nbest = beam_search(translator.model, src, DecodeConfig(beam_size=4, nbest=4, length_penalty=0.6))[0]
        assert len(nbest) == 4
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
        assert len({tuple(h.tokens) for h in nbest}) == 4
        for h in nbest:
            expected = log_prob(translator.model, src, h.tokens) / length_penalty(len(h.tokens) + 1, 0.6)
            assert h.score == pytest.approx(expected, abs=1e-3)


def test_diverse_beam_without_a_penalty_is_the_narrow_beam_once_per_group(toy):
    translator, sources = toy
    src = source_ids(translator, sources[:24])
    narrow = beam_search(translator.model, src, DecodeConfig(beam_size=2, nbest=2, length_penalty=0.6))
    grouped = beam_search(translator.model, src, DecodeConfig(beam_size=6, nbest=6, beam_groups=3,
                                                              length_penalty=0.6))
    for two, six in zip(narrow, grouped):
        assert [h.tokens for h in six] == [h.tokens for h in two for _ in range(3)]
        assert [h.score for h in six] == pytest.approx([h.score for h in two for _ in range(3)], abs=1e-5)


def test_diverse_beam_groups_start_apart_and_score_outputs_by_the_model_alone(toy):
    translator, sources = toy
    lines = [line for line in sources if len(line.split()) > 4][:6]
    src = source_ids(translator, lines)
    groups = beam_search(translator.model, src, DecodeConfig(beam_size=4, nbest=4, beam_groups=4,
                                                            diversity_penalty=100.0, length_penalty=0.6))
    weak = beam_search(translator.model, src, DecodeConfig(beam_size=4, nbest=4, beam_groups=4,
                                                          diversity_penalty=0.1, length_penalty=0.6))
    plain = greedy(translator.model, src)  # the first group: a beam of one, never penalised
    for i, (found, first) in enumerate(zip(groups, plain)):
        assert len({tuple(h.tokens[:1]) for h in found}) == 4  # a penalty of 100 keeps every first token apart
        assert first.tokens in [h.tokens for h in found] and first.tokens in [h.tokens for h in weak[i]]
        assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
        for h in found + weak[i]:  # the penalty ranks candidates; the score is the model's
            expected = log_prob(translator.model, src[i:i + 1], h.tokens) / length_penalty(len(h.tokens) + 1, 0.6)
            assert h.score == pytest.approx(expected, abs=1e-3)
    assert groups != weak


@pytest.mark.parametrize("changes,message", [
    (dict(beam_size=4, beam_groups=3), "decode.beam_groups=3 must divide decode.beam_size=4"),
    (dict(beam_size=4, diversity_penalty=1.0), "decode.diversity_penalty keeps beam groups apart"),
    (dict(beam_size=4, beam_groups=0), "decode.beam_groups must be positive"),
    (dict(beam_size=4, beam_groups=2, diversity_penalty=-1.0), "decode.diversity_penalty must not be negative"),
])
def test_bad_diverse_beam_settings_name_the_key(toy, changes, message):
    translator, _ = toy
    with pytest.raises(detr.ConfigError, match=message):
        translator.options(**changes)


def test_wider_beams_find_outputs_at_least_as_probable(toy):
    translator, sources = toy
    src = source_ids(translator, sources[:32])
    g = greedy(translator.model, src)
    b = beam_search(translator.model, src, DecodeConfig(beam_size=8, length_penalty=0.0))
    assert all(bb[0].score >= gg.score - 1e-4 for gg, bb in zip(g, b))


def test_length_limits_and_no_repeat_ngram_are_respected(toy):
    translator, sources = toy
    src = source_ids(translator, sources[:16])
    lengths = (src != 0).sum(1) - 1
    for h, n in zip(greedy(translator.model, src, DecodeConfig(max_len_a=0.5, max_len_b=1)), lengths.tolist()):
        assert len(h.tokens) <= int(0.5 * n + 1)
    for nbest in beam_search(translator.model, src, DecodeConfig(beam_size=3, min_len=40, max_len_a=0, max_len_b=45)):
        assert 40 <= len(nbest[0].tokens) <= 45
    for h in greedy(translator.model, src, DecodeConfig(min_len=30, max_len_b=40, no_repeat_ngram=2)):
        bigrams = list(zip(h.tokens, h.tokens[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_sampling_is_reproducible_and_top_k_one_is_greedy(toy):
    translator, sources = toy
    src = source_ids(translator, sources[:16])
    draw = [sample(translator.model, src, DecodeConfig(top_p=0.9, temperature=1.5), torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert [h.tokens for h in draw[0]] == [h.tokens for h in draw[1]]
    assert [h.tokens for h in draw[0]] != [h.tokens for h in draw[2]]
    top1 = sample(translator.model, src, DecodeConfig(top_k=1), torch.Generator().manual_seed(0))
    assert [h.tokens for h in top1] == [h.tokens for h in greedy(translator.model, src)]
    nucleus = sample(translator.model, src, DecodeConfig(top_p=1e-6), torch.Generator().manual_seed(0))
    assert [h.tokens for h in nucleus] == [h.tokens for h in top1]


def test_generate_gives_num_samples_per_line(toy):
    translator, sources = toy
    out = translator.generate(sources[:3], translator.options(num_samples=4, seed=3, temperature=1.2))
    assert [len(o) for o in out] == [4, 4, 4]
    assert out == translator.generate(sources[:3], translator.options(num_samples=4, seed=3, temperature=1.2))
    assert all(math.isfinite(score) for samples in out for _, score in samples)


def test_the_repetition_penalty_scales_seen_tokens_only(toy):
    from detr.search import constrain

    logp = torch.log_softmax(torch.randn(2, 10), dim=-1)
    history = torch.tensor([[5, 7], [7, 7]])
    edited = logp.clone()
    constrain(DecodeConfig(repetition_penalty=2.0), edited, history, torch.tensor([False, False]))
    expected = logp.clone()
    expected[0, [5, 7]] *= 2
    expected[1, 7] *= 2
    assert torch.equal(edited, expected)
    translator, sources = toy
    src = source_ids(translator, sources[:16])
    plain = greedy(translator.model, src, DecodeConfig(min_len=30, max_len_b=40))
    assert [h.tokens for h in greedy(translator.model, src, DecodeConfig(min_len=30, max_len_b=40,
                                                                          repetition_penalty=1.0))] == \
        [h.tokens for h in plain]
    strict = greedy(translator.model, src, DecodeConfig(min_len=30, max_len_b=40, repetition_penalty=1e6))
    repeats = lambda hyps: sum(len(h.tokens) - len(set(h.tokens)) for h in hyps)
    assert repeats(plain) > 0 and repeats(strict) < repeats(plain)
    for nbest in beam_search(translator.model, src, DecodeConfig(beam_size=3, repetition_penalty=1e6)):
        assert len(nbest[0].tokens) == len(set(nbest[0].tokens))


@pytest.mark.parametrize("vocab", [32000, 8000, 997, 40])  # chunked (several widths), prime (plain), too few chunks
def test_two_pass_argmax_and_topk_equal_torchs(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(37, vocab, generator=g)
    x[0] = -torch.inf  # a row forced to nothing (only </s> at a length limit looks like this, minus one)
    x[1, :] = -torch.inf
    x[1, vocab - 1] = 0.0  # the maximum in the last chunk
    x[2] = x[2].round()  # many ties: the first maximal position must win, as argmax's
    x[3, 5] = x[3, vocab // 2] = x[3].max() + 1  # a tie for the maximum across chunks
    assert torch.equal(row_argmax(x), x.argmax(-1))
    for k in (1, 8, 10):
        values, positions = row_topk(x, k)
        expected = x.topk(k, dim=1).values
        assert torch.equal(values, expected)  # the exact top k values, best first
        assert torch.equal(x.gather(1, positions), values)  # at positions that hold them
        assert all(len(set(row)) == k for row in positions.tolist())  # k distinct positions

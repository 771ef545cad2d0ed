"""Export to ONNX: detr's search over the graphs in ONNX Runtime decodes exactly as detr does (greedy and
beam), the conversion is made once into the run, and a partial or damaged export is never used."""

import shutil

import pytest

from detr import load
from detr.errors import CheckpointError
from detr.rundir import RunDir
from tests.conftest import detr_cli

pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")
from detr.export import onnx as export  # noqa: E402  (after the skip: needs onnxruntime)
from detr.export.folder import is_current  # noqa: E402


@pytest.fixture(scope="module")
def exported(toy_run, tmp_path_factory):
    return export.export(toy_run / "run", tmp_path_factory.mktemp("onnx") / "graphs")


@pytest.mark.parametrize("beam, anti_lm, groups", [(1, 0.0, 1), (4, 0.6, 1), (4, 0.0, 2)])  # (plain beam: the CLI test)
def test_the_graphs_decode_exactly_like_detr(toy_run, exported, beam, anti_lm, groups):
    translator = load(toy_run / "run")
    lines = (toy_run / "data" / "test.en").read_text().splitlines()  # 200 sentences
    options = translator.options(beam_size=beam, nbest=min(beam, 2), anti_lm=anti_lm, beam_groups=groups,
                                 diversity_penalty=1.0 if groups > 1 else 0.0)  # the run's length penalty
    expected = translator.translate_nbest(lines, options)
    translator.engine = export.OnnxSearch(exported)
    got = translator.translate_nbest(lines, options)
    assert [[text for text, _ in n] for n in got] == [[text for text, _ in n] for n in expected]
    for mine, theirs in zip(got, expected):
        assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], abs=1e-4)


def test_translate_engine_onnxruntime_converts_once_into_the_run(toy_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run / "run", run)
    src = tmp_path / "test.en"
    src.write_text("".join((toy_run / "data" / "test.en").read_text().splitlines(keepends=True)[:50]) + "\n")
    args = ["translate", str(run), "-i", str(src), "--beam-size", "3"]
    onnx_out = detr_cli(*args, "--engine", "onnxruntime")
    assert onnx_out.returncode == 0 and onnx_out.stdout == detr_cli(*args).stdout, onnx_out.stderr
    assert len(onnx_out.stdout.splitlines()) == 51 and onnx_out.stderr == ""
    cache = RunDir(run).engine_cache("onnx")
    assert is_current(cache, RunDir(run).model, export.read_marker)  # kept, and used as it is next time
    (cache / "encoder.onnx").unlink()  # a partial conversion is not current: it is made again, never half-used
    assert not is_current(cache, RunDir(run).model, export.read_marker)  # (remaking it: test_export, CTranslate2)
    int8 = detr_cli(*args, "--engine", "onnxruntime", "--quantize", "int8")
    assert int8.returncode == 2 and "the ONNX graphs are float32" in int8.stderr and int8.stdout == ""


def test_a_partial_or_damaged_export_is_named_on_load(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "cross.onnx").unlink()
    with pytest.raises(CheckpointError, match="not a complete ONNX export .missing cross.onnx."):
        export.OnnxSearch(broken)
    (broken / "cross.onnx").write_bytes(b"half a graph")
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load the graphs"):
        export.OnnxSearch(broken)

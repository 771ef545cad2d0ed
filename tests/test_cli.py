import subprocess
import sys

import detr
from tests.conftest import ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "detr", *args], capture_output=True, text=True, cwd=cwd)


def test_help_and_version():
    assert run("--version").stdout.strip() == f"detr {detr.__version__}"
    out = run("--help")
    assert out.returncode == 0 and "model" in out.stdout and "data" in out.stdout


def test_model_command_prints_size_and_a_forward_pass():
    out = run("model", "configs/tiny.yaml")
    assert out.returncode == 0, out.stderr
    assert "parameters: 74,880" in out.stdout
    assert "logits (2, 5, 1000)" in out.stdout


def test_impossible_model_is_one_line_error_without_traceback():
    out = run("model", "tiny", "--set", "model.n_heads=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["detr: error: model.d_model=32 is not divisible by model.n_heads=3"]


def test_unknown_key_suggests_the_nearest_name():
    out = run("model", "configs/tiny.yaml", "--set", "model.d_modl=64")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "did you mean 'model.d_model'" in out.stderr

"""Shared fixtures: tiny models, paths to ../shared/data (tests needing it skip when absent)."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Determinism and speed on small CI machines. The suite runs in two worker processes on two cores,
# so every `detr` process a test starts (CLI, server, torchrun rank) gets one thread as well: two
# threads beside another busy process wait on each other and run several times slower.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def detr_cli(*args: str, stdin: str | bytes | None = None, text: bool = True, timeout: float | None = None,
             fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m detr ARGS` from the repository root, capturing its output (str, or bytes with
    text=False; a str stdin is encoded as UTF-8). The command runs in a fork of a Python that has
    imported detr already (`tests/zygote.py`: the seconds importing torch takes, once per test
    worker); `fresh=True`, or DETR_TEST_FRESH=1 for every call, starts a new interpreter instead."""
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    command = [sys.executable, "-m", "detr", *args]
    if fresh or os.environ.get("DETR_TEST_FRESH") == "1":
        done = subprocess.run(command, input=stdin, capture_output=True, cwd=ROOT, timeout=timeout)
    else:
        done = _ZYGOTE.run(command, stdin or b"", timeout)
    if text:  # as subprocess's text mode reads it: the locale's encoding (UTF-8 here), universal newlines
        done.stdout, done.stderr = (io.TextIOWrapper(io.BytesIO(data)).read() for data in (done.stdout, done.stderr))
    return done


class _Zygote:
    """This test worker's `tests/zygote.py` process, started on first use; see there."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py"), str(theirs.fileno())], cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        theirs.close()
        return ours

    def run(self, command: list[str], stdin: bytes, timeout: float | None) -> subprocess.CompletedProcess:
        from tests.zygote import receive, send

        if self.sock is None:
            self.sock = self._start()
        with tempfile.TemporaryDirectory(prefix="detr_cli") as folder:
            paths = {name: os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")}
            Path(paths["stdin"]).write_bytes(stdin)
            for name in ("stdout", "stderr"):
                Path(paths[name]).touch()
            send(self.sock, {"args": command[3:], "env": dict(os.environ), "cwd": str(ROOT), **paths})
            pid = receive(self.sock)
            if pid is None:  # the zygote died: say so rather than hang the next call
                self.sock = None
                raise RuntimeError("tests/zygote.py ended; DETR_TEST_FRESH=1 runs each command on its own")
            self.sock.settimeout(timeout)
            try:
                code = receive(self.sock)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self.sock.settimeout(None)
                receive(self.sock)
                raise subprocess.TimeoutExpired(command, timeout, Path(paths["stdout"]).read_bytes(),
                                                Path(paths["stderr"]).read_bytes()) from None
            finally:
                if self.sock is not None:
                    self.sock.settimeout(None)
            return subprocess.CompletedProcess(command, code, Path(paths["stdout"]).read_bytes(),
                                               Path(paths["stderr"]).read_bytes())


_ZYGOTE = _Zygote()


def shared_data(relative: str) -> Path:
    """Path inside ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def tiny_config():
    from detr import ModelConfig

    return ModelConfig.preset("tiny", src_vocab_size=50, tgt_vocab_size=60)


def train_toy(root: Path, steps: int = 250, test: int = 200, **settings: object) -> Path:
    """Train `configs/tiny.yaml` (with `settings`, dotted keys) for `steps` on a toy corpus written to
    root/data; the run is root/run. Returns `root`."""
    from detr import load_config, train
    from detr.toy import make_toy_corpus

    make_toy_corpus(root / "data", train=3000, valid=50, test=test, seed=7)
    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(root / "run"), "data.train": str(root / "data" / "train"),
        "data.valid": str(root / "data" / "valid"), "data.test": str(root / "data" / "test"),
        "train.max_steps": steps, "train.eval_every": steps, "train.save_every": steps, "train.threads": 1,
        **settings})
    train(config)
    return root


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """A tiny English→German model trained for a few seconds on the toy corpus, once per test session:
    the xdist workers share it through a lock in their session's common temporary folder. Tests read
    it; one that changes a run copies it first."""
    base = tmp_path_factory.getbasetemp()  # an xdist worker's is one folder below the session's
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy_run"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            train_toy(root)
            (root / ".done").touch()
    return root

"""Data-parallel training under torchrun: 2 processes on gloo (CPU, one thread each), tiny model.

The reference for equivalence is one process fed the same global batches: 2 ranks with
`train.accumulate` A against 1 process with 2A. Runs with dropout compare 2-rank runs with each
other (a killed-and-resumed run, two "nodes" on loopback, a torchrun restart) bitwise.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detr.checkpoint import load_trainer_state
from detr.rundir import RunDir
from detr.trainer import train
from tests.conftest import ROOT, detr_cli
from tests.test_train import toy_config, write_yaml

MODEL = RunDir(".").model.name
TRAINER_STATE = RunDir(".").trainer_state.name
STEPS = 20
# One thread per rank; a rank that aborts (SIGABRT, SIGSEGV) prints its Python stacks.
RANK_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(*detr_args: str, nproc: int = 2, nodes: tuple[int, int] | None = None, port: int | None = None,
                  restarts: int = 0) -> list[str]:
    """The command line of `torchrun ... -m detr ARGS`: one machine (--standalone), or node
    `nodes[0]` of `nodes[1]` meeting on 127.0.0.1:`port`."""
    where = ["--standalone"] if nodes is None else [
        "--nnodes", str(nodes[1]), "--node-rank", str(nodes[0]), "--master-addr", "127.0.0.1",
        "--master-port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), "--monitor-interval", "0.5", "-m", "detr", *detr_args]


def run_torchrun(*detr_args: str, timeout: float = 180, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **RANK_ENV}
    return subprocess.run(torchrun_args(*detr_args, **kwargs), capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def config_file(tmp_path: Path, name: str, **overrides) -> Path:
    values = {"train.max_steps": STEPS, "train.save_every": 5, "train.eval_every": 10, "train.max_tokens": 300,
              "model.dropout": 0.1}
    values.update(overrides)
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return write_yaml(folder, toy_config(tmp_path, **values))


def weights(run_dir: Path, name: str = MODEL) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name))


def assert_same_weights(a: Path, b: Path, tolerance: float = 0.0) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=tolerance, msg=key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run with dropout, validation and checkpoints: the reference."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = config_file(tmp, "c")
    done = run_torchrun("train", str(config), "--run_dir", str(tmp / "whole"), "--no-progress")
    assert done.returncode == 0, done.stderr
    return tmp, config


def test_the_reference_run_is_written_once_by_rank_0(two_ranks):
    tmp, _ = two_ranks
    run = tmp / "whole"
    state = load_trainer_state(run / TRAINER_STATE)
    assert state["step"] == STEPS and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["torch"], state["ranks"][1]["torch"])  # dropout differs per rank
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) and '"split": "valid"' in steps[-1]  # one writer: no line twice
    assert not RunDir(run).world_marker.exists()


@pytest.mark.parametrize("accumulate,fsdp", [(1, False), (2, False), (1, True)], ids=["ddp", "ddp-accumulate", "fsdp"])
def test_two_ranks_train_like_one_process_fed_the_same_global_batches(tmp_path, accumulate, fsdp):
    config = config_file(tmp_path, "c", **{"model.dropout": 0.0, "train.accumulate": accumulate,
                                           "train.fsdp": fsdp})
    args = ["train", str(config), "--run_dir", str(tmp_path / "ddp"), "--no-progress"]
    if fsdp:  # sharded optimizer state goes through a checkpoint and back: stop half-way, then resume
        half = run_torchrun(*args, "--train.max_steps", str(STEPS // 2))
        assert half.returncode == 0, half.stderr
        args.append("--resume")
    done = run_torchrun(*args)
    assert done.returncode == 0, done.stderr
    single = toy_config(tmp_path, "single", **{"model.dropout": 0.0, "train.max_steps": STEPS,
                                               "train.save_every": 5, "train.eval_every": 10,
                                               "train.max_tokens": 300, "train.accumulate": 2 * accumulate})
    train(single)
    for step in (STEPS - 5, STEPS):  # the two checkpoints kept
        name = f"checkpoints/step_{step:08d}.safetensors"
        for key, value in weights(tmp_path / "single", name).items():
            torch.testing.assert_close(weights(tmp_path / "ddp", name)[key], value, rtol=0, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("single", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # training and validation losses, step by step
    if fsdp:  # the gathered weights are an ordinary run: other commands read them unchanged
        out = detr_cli("translate", str(tmp_path / "ddp"), stdin="a house\n")
        assert out.returncode == 0 and len(out.stdout.splitlines()) == 1, out.stderr


def test_a_killed_two_rank_job_resumes_bitwise_equal_to_the_uninterrupted_one(two_ranks):
    tmp, config = two_ranks
    run_dir = tmp / "killed"
    args = torchrun_args("train", str(config), "--run_dir", str(run_dir), "--no-progress")
    job = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, **RANK_ENV})
    deadline = time.time() + 120
    while not (run_dir / TRAINER_STATE).exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [job.pid, *workers(job.pid).values()]:  # the launcher and both ranks
        os.kill(pid, signal.SIGKILL)
    job.wait()
    killed_at = load_trainer_state(run_dir / TRAINER_STATE)["step"]
    assert killed_at < STEPS, "the run finished before it could be killed: make it longer"
    resumed = run_torchrun("train", str(config), "--run_dir", str(run_dir), "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run_dir} at step {killed_at}" in resumed.stderr
    assert_same_weights(run_dir, tmp / "whole")


def test_two_nodes_on_loopback_train_like_one_node_with_two_ranks(two_ranks):
    tmp, config = two_ranks
    port = free_port()
    args = ["train", str(config), "--run_dir", str(tmp / "nodes"), "--no-progress"]
    env = {**os.environ, **RANK_ENV}
    nodes = [subprocess.Popen(torchrun_args(*args, nproc=1, nodes=(rank, 2), port=port), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_same_weights(tmp / "nodes", tmp / "whole")


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the workers the torchrun process `launcher` started (each in its own session)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if parent == launcher and ranks:
            found[ranks[0]] = int(proc.name)
    return found


def kill_rank_after_first_checkpoint(args: list[str], run_dir: Path) -> tuple[subprocess.Popen, float]:
    job = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, **RANK_ENV})
    deadline = time.time() + 120
    while not (run_dir / TRAINER_STATE).exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = workers(job.pid).get(1)
    assert victim is not None and job.poll() is None, "no rank 1 to kill"
    os.kill(victim, signal.SIGKILL)
    return job, time.time()


def finish(job: subprocess.Popen, timeout: float) -> str:
    """The job's output once it ends; a job still running after `timeout` is killed (launcher and
    workers) and the test fails with what it printed."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [*workers(job.pid).values(), job.pid]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s:\n{job.communicate()[0]}")


def test_a_killed_rank_ends_the_job_with_a_clear_line_and_max_restarts_finishes_it(two_ranks):
    tmp, config = two_ranks
    run_dir = tmp / "lost"
    job, killed = kill_rank_after_first_checkpoint(
        torchrun_args("train", str(config), "--run_dir", str(run_dir), "--no-progress",
                      "--train.max_steps", "100000"), run_dir)
    out = finish(job, 120)
    assert job.returncode != 0 and time.time() - killed < 60, out
    assert "exitcode  : -9" in out, out  # torchrun's report names the dead worker
    assert "detr: error: rank 0 of 2" in out and "lost the other processes of the job" in out, out
    # The one traceback is the launcher's own report (ChildFailedError); no rank prints one.
    assert out.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in out, out

    run_dir = tmp / "restarted"
    job, _ = kill_rank_after_first_checkpoint(
        torchrun_args("train", str(config), "--run_dir", str(run_dir), "--no-progress", restarts=1), run_dir)
    out = finish(job, 120)
    assert job.returncode == 0, out
    assert "torchrun restart 1: resuming from the last checkpoint" in out
    assert_same_weights(run_dir, tmp / "whole")  # exact resume: as if nothing had happened


def test_nodes_with_different_configs_stop_with_one_line(two_ranks):
    tmp, config = two_ranks
    port = free_port()
    env = {**os.environ, **RANK_ENV}
    nodes = [subprocess.Popen(torchrun_args("train", str(config), "--run_dir", str(tmp / "mismatch"), "--no-progress",
                                            *extra, nproc=1, nodes=(rank, 2), port=port),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, extra in ((0, []), (1, ["--train.lr", "0.002"]))]
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    for err in errors:
        lines = [line for line in err.splitlines() if line.startswith("detr: error:")]
        assert len(lines) == 1 and "ranks disagree on the configuration: rank 1" in lines[0], err


def test_a_run_directory_not_shared_between_nodes_is_refused(two_ranks, tmp_path):
    tmp, _ = two_ranks
    config = write_yaml(tmp_path, toy_config(tmp, **{"run_dir": "relative-run", "train.max_steps": 4}))
    port = free_port()
    env = {**os.environ, **RANK_ENV}
    cwds = [tmp_path / "node0", tmp_path / "node1"]  # "relative-run" is a different folder on each "machine"
    for cwd in cwds:
        cwd.mkdir()
    nodes = [subprocess.Popen(torchrun_args("train", str(config), "--no-progress", nproc=1, nodes=(rank, 2),
                                            port=port), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank, cwd in enumerate(cwds)]
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    for err in errors:
        lines = [line for line in err.splitlines() if line.startswith("detr: error:")]
        assert len(lines) == 1 and "is not shared" in lines[0] and "rank 1 of 2" in lines[0], err


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes_exactly(two_ranks):
    tmp, config = two_ranks
    for attempt in range(3):  # the signal lands anywhere in a step: in training, validation or a save
        run_dir = tmp / f"sigterm{attempt}"
        job = subprocess.Popen(torchrun_args("train", str(config), "--run_dir", str(run_dir), "--no-progress"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **RANK_ENV})
        deadline = time.time() + 120
        while not (run_dir / TRAINER_STATE).exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        rank1 = workers(job.pid).get(1)  # (none when the job has ended)
        if rank1 is not None:
            os.kill(rank1, signal.SIGTERM)  # a preemption notice reaching one machine only
        out = finish(job, 120)  # (a job that hangs is killed, launcher and ranks, and its output shown)
        step = load_trainer_state(run_dir / TRAINER_STATE)["step"]
        if step < STEPS:
            break  # on a busy machine the run can end before the signal reaches it: then again
    assert step < STEPS, "the run finished before the signal three times: make it longer"
    # Rank 0 saved at the step rank 1 stopped at (a rank that went on would have lost its peer instead).
    assert out.count(f"stopped by SIGTERM at step {step}; checkpoint saved") == 1, out
    assert out.count("resume with: detr train") == 1 and "lost the other processes" not in out, out
    resumed = run_torchrun("train", str(config), "--run_dir", str(run_dir), "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(run_dir, tmp / "whole")

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detr import ConfigError, DataError, TrainingError, load_config
from detr.checkpoint import average_checkpoints, list_checkpoints, load_trainer_state
from detr.rundir import RunDir
from detr.toy import make_toy_corpus
from detr.trainer import Trainer, learning_rate, train
from tests.conftest import ROOT, detr_cli

MODEL, TRAINER_STATE = RunDir(".").model.name, RunDir(".").trainer_state.name


def toy_config(tmp_path, run="run", **overrides):
    data = tmp_path / "toy"
    if not (data / "train.en").exists():
        make_toy_corpus(data, train=400, valid=20, test=0, seed=3)
    values = {
        "run_dir": str(tmp_path / run), "model_preset": "tiny", "data.train": str(data / "train"),
        "data.valid": str(data / "valid"), "data.src_lang": "en", "data.tgt_lang": "de", "data.vocab_size": 300,
        "model.share_embeddings": True, "model.dropout": 0.1, "train.max_steps": 12, "train.save_every": 4,
        "train.eval_every": 6, "train.log_every": 2, "train.max_tokens": 600, "train.warmup_steps": 4,
        "train.lr": 1e-3, "train.threads": 1, "train.keep_last": 2,
    }
    values.update(overrides)
    return load_config(None, values)


def write_yaml(tmp_path, config):
    path = tmp_path / "c.yaml"
    config.save(path)
    return path


# ----------------------------------------------------------------------------- schedule


def test_inverse_sqrt_warms_up_linearly_then_decays_with_the_square_root():
    c = load_config(None, {"train.max_steps": 100, "train.lr": 1e-3, "train.warmup_steps": 10}).train
    assert learning_rate(c, 5) == pytest.approx(5e-4)
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 40) == pytest.approx(1e-3 * math.sqrt(10 / 40))


def test_cosine_reaches_min_lr_at_max_steps_and_constant_stays():
    c = load_config(None, {"train.max_steps": 100, "train.lr": 1e-3, "train.warmup_steps": 10,
                           "train.schedule": "cosine", "train.min_lr": 1e-5}).train
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert learning_rate(c, 100) == pytest.approx(1e-5)
    c = load_config(None, {"train.max_steps": 100, "train.lr": 1e-3, "train.warmup_steps": 0,
                           "train.schedule": "constant"}).train
    assert learning_rate(c, 1) == learning_rate(c, 99) == 1e-3


def test_a_schedule_fitted_to_the_clock_ends_where_the_minutes_do(tmp_path, monkeypatch):
    config = toy_config(tmp_path, **{"train.max_steps": 0, "train.max_minutes": 0.4, "train.schedule": "cosine",
                                     "train.fit_schedule_to_clock": True, "train.min_lr": 1e-5})
    fit = Trainer.fit_schedule

    def two_seconds_a_step(self):  # a clock that read 2 s per step during warm-up
        self.seconds = 2.0 * self.step
        fit(self)

    monkeypatch.setattr(Trainer, "fit_schedule", two_seconds_a_step)
    result = train(config)
    # 4 warm-up steps took 8 s of the 24: the 16 left hold 8 more steps at 2 s each
    assert result.stopped == "schedule_end" and result.steps == 12
    assert load_trainer_state(tmp_path / "run" / TRAINER_STATE)["horizon"] == 12
    lrs = [m["lr"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if m["split"] == "train"]
    assert lrs[-1] == pytest.approx(1e-5) and lrs[1] == pytest.approx(learning_rate(config.train, 4))
    resumed = Trainer(config, resume=True)
    assert resumed.horizon == 12 and resumed.stop_reason() == "schedule_end"
    resumed.close()
    with pytest.raises(ConfigError, match="fit_schedule_to_clock needs train.schedule: cosine"):
        toy_config(tmp_path, **{"train.max_minutes": 1, "train.fit_schedule_to_clock": True})


# ----------------------------------------------------------------------------- the run directory


def test_a_run_writes_a_self_describing_directory(tmp_path):
    result = train(toy_config(tmp_path))
    run = tmp_path / "run"
    assert result.steps == 12 and result.stopped == "max_steps"
    for name in ("config.yaml", "tokenizer.json", MODEL, TRAINER_STATE, "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert [s for s, _ in list_checkpoints(run)] == [8, 12]  # keep_last=2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["split"] == "valid"] == [6, 12]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0])
    assert {"loss", "ppl", "bleu"} <= set(lines[-1])
    saved = load_config(run / "config.yaml")
    assert saved.model.src_vocab_size == saved.model.tgt_vocab_size == 300  # taken from the tokenizer
    state = load_trainer_state(run / TRAINER_STATE)
    assert state["step"] == 12 and state["best"]["metric"] == "bleu"

    # A run directory alone is enough to decode.
    import detr.translator

    translator = detr.load(run)
    out = translator.translate(["we have two red dogs.", ""], translator.options(beam_size=1))
    assert len(out) == 2 and out[1] == ""


def test_a_finished_run_is_never_overwritten_and_resume_says_it_is_done(tmp_path):
    config = toy_config(tmp_path, **{"train.max_steps": 2})
    train(config)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        train(config)
    before = (tmp_path / "run" / MODEL).read_bytes()
    result = train(config, resume=True)
    assert result.steps == 2 and (tmp_path / "run" / MODEL).read_bytes() == before
    longer = toy_config(tmp_path, **{"train.max_steps": 4})
    assert train(longer, resume=True).steps == 4  # a larger budget continues the same run


def test_resume_refuses_a_different_model(tmp_path):
    train(toy_config(tmp_path, **{"train.max_steps": 2}))
    with pytest.raises(ConfigError, match="model.d_ff: 128 differs from 64"):
        train(toy_config(tmp_path, **{"train.max_steps": 4, "model.d_ff": 128}), resume=True)


@pytest.mark.parametrize("override,message", [
    ({"data.train": "/nonexistent/train"}, "/nonexistent/train.en: file not found (data.train)"),
    ({"data.valid": "/nonexistent/valid"}, "/nonexistent/valid.en: file not found (data.valid)"),
    ({"run_dir": "/proc/detr-run"}, "run_dir: cannot write to /proc/detr-run"),
    ({"train.precision": "bf16", "train.device": "cpu"}, "train.precision=bf16 needs a CUDA device"),
])
def test_bad_input_fails_before_training_with_the_key_or_path(tmp_path, override, message):
    with pytest.raises((ConfigError, DataError), match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(toy_config(tmp_path, **override))
    assert not (tmp_path / "run" / TRAINER_STATE).exists()


def test_cli_train_reports_a_wrong_type_in_one_line(tmp_path):
    path = write_yaml(tmp_path, toy_config(tmp_path))
    out = detr_cli("train", str(path), "--train.max_steps", "many")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"detr: error: {path}: train.max_steps: expected int, got 'many'"]
    out = detr_cli("train", str(path), "--train.max_stesp", "3")
    assert out.returncode == 2 and "did you mean 'train.max_steps'" in out.stderr


# ----------------------------------------------------------------------------- learning


def test_nonfinite_losses_are_skipped_and_too_many_stop_with_a_clear_message(tmp_path):
    trainer = Trainer(toy_config(tmp_path, **{"train.max_steps": 6, "train.max_nonfinite": 3}))
    forward, calls = trainer.model.forward, {"n": 0}

    def sometimes_nan(src, tgt_in):
        calls["n"] += 1
        logits = forward(src, tgt_in)
        return logits * float("nan") if calls["n"] in (2, 3) else logits

    trainer.model.forward = sometimes_nan
    result = trainer.run()
    assert result.steps == 6 and result.nonfinite_skipped == 2

    trainer = Trainer(toy_config(tmp_path, run="run2", **{"train.max_steps": 20, "train.max_nonfinite": 3}))
    forward2, calls2 = trainer.model.forward, {"n": 0}

    def nan_after_five(src, tgt_in):
        calls2["n"] += 1
        logits = forward2(src, tgt_in)
        return logits * float("nan") if calls2["n"] > 5 else logits

    trainer.model.forward = nan_after_five
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row .* last good checkpoint is step 4"):
        trainer.run()
    assert load_trainer_state(tmp_path / "run2" / TRAINER_STATE)["step"] == 4


def test_accumulation_equals_one_big_batch(tmp_path):
    """Two accumulated batches give the loss and gradient of their union in one batch."""
    trainer = Trainer(toy_config(tmp_path, **{"model.dropout": 0.0}))
    a, b = trainer.next_batches(), trainer.next_batches()
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    accumulated = trainer.train_step(a + b)

    from detr.batching import Batch, pad

    def rows(batch, tensor):
        return [[t for t in row if t != 0] for row in getattr(batch, tensor).tolist()]

    union = Batch(*(pad(rows(a[0], n) + rows(b[0], n)) for n in ("src", "tgt_in", "tgt_out")), [])
    trainer.model.load_state_dict(start)
    whole = trainer.train_step([union])
    assert whole["tokens"] == accumulated["tokens"]
    assert whole["loss"] == pytest.approx(accumulated["loss"], rel=1e-5)
    assert whole["grad_norm"] == pytest.approx(accumulated["grad_norm"], rel=1e-4)


def test_early_stopping_stops_after_patience_validations_without_improvement(tmp_path):
    config = toy_config(tmp_path, **{"train.max_steps": 100, "train.eval_every": 1, "train.lr": 1e-9,
                                     "train.warmup_steps": 0, "train.patience": 2,
                                     "train.early_stopping_metric": "bleu"})
    result = train(config)
    assert result.stopped == "early_stopping" and result.steps == 3  # BLEU stays at 0 from step 1 on
    assert train(config, resume=True).stopped == "early_stopping"


def test_average_of_the_last_checkpoints_is_their_mean(tmp_path):
    train(toy_config(tmp_path))
    out, steps = average_checkpoints(tmp_path / "run", 2)
    assert steps == [8, 12]
    from safetensors.torch import load_file

    a, b = (load_file(str(p)) for _, p in list_checkpoints(tmp_path / "run"))
    avg = load_file(str(out))
    for name in avg:
        torch.testing.assert_close(avg[name], (a[name] + b[name]) / 2)
    cli = detr_cli("average", str(tmp_path / "run"), "--last", "3")
    assert cli.returncode == 2 and "asked to average 3 checkpoints, found 2" in cli.stderr


# ----------------------------------------------------------------------------- exact resume


def resume_config(tmp_path):
    # Dropout on, accumulation, several epochs, validation: every piece of state matters.
    return write_yaml(tmp_path, toy_config(tmp_path, **{
        "train.max_steps": 40, "train.save_every": 5, "train.eval_every": 10, "train.accumulate": 2,
        "train.max_tokens": 400, "model.dropout": 0.2}))


def test_killed_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    config = resume_config(tmp_path)
    whole = detr_cli("train", str(config), "--run_dir", str(tmp_path / "whole"), "--no-progress")
    assert whole.returncode == 0, whole.stderr
    for delay in (0.0, 0.4):
        run_dir = tmp_path / f"killed{delay}"
        args = [sys.executable, "-m", "detr", "train", str(config), "--run_dir", str(run_dir), "--no-progress"]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run_dir / TRAINER_STATE).exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = load_trainer_state(run_dir / TRAINER_STATE)["step"]
        assert killed_at < 40, "the run finished before it could be killed: make it longer"
        resumed = detr_cli("train", str(config), "--run_dir", str(run_dir), "--resume", "--no-progress")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed {run_dir} at step {killed_at}" in resumed.stderr
        assert (run_dir / MODEL).read_bytes() == (tmp_path / "whole" / MODEL).read_bytes()
        metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["step"] for m in metrics] == \
            [json.loads(m)["step"] for m in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    config = resume_config(tmp_path)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "detr", "train", str(config), "--run_dir", str(run_dir), "--no-progress",
            "--train.max_steps", "100000", "--train.save_every", "100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # wait for the first log line (step 2)
        line = proc.stderr.readline()
        if "step 2/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    state = load_trainer_state(run_dir / TRAINER_STATE)
    assert state["step"] >= 2
    assert f"stopped by SIGTERM at step {state['step']}; checkpoint saved in {run_dir}" in err
    assert "resume with: detr train" in err and "--resume" in err and "Traceback" not in err


def test_a_signal_caught_after_a_steps_agreement_stops_the_run_at_the_next_one(tmp_path):
    """Under torchrun the ranks agree after each step on whether a signal came; one that comes later
    in the step (here during the step-4 save; on one rank, during validation or a save) must wait
    for the next agreement. Acting on it at once sent that rank alone to save while the others
    trained on and waited for it (the job hung)."""
    from detr.trainer import Interrupted

    trainer = Trainer(toy_config(tmp_path))
    save = trainer.save

    def save_and_catch_a_signal():
        save()
        if trainer.step == 4 and trainer.signal_received is None:
            trainer._on_signal(signal.SIGTERM, None)

    trainer.save = save_and_catch_a_signal
    with pytest.raises(Interrupted) as stopped:
        trainer.run()
    assert stopped.value.step == 5 and load_trainer_state(tmp_path / "run" / TRAINER_STATE)["step"] == 5


# ----------------------------------------------------------------------------- it learns


@pytest.mark.parametrize("task,steps", [("copy", 400), ("reverse", 700)])
def test_a_small_model_learns_to_copy_and_to_reverse_exactly(tmp_path, task, steps):
    import random

    import detr.translator

    rng = random.Random(0)
    letters = "a b c d e f g h".split()

    def write(split, n):
        seqs = [[rng.choice(letters) for _ in range(rng.randint(1, 5))] for _ in range(n)]
        (tmp_path / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in seqs))
        (tmp_path / f"{split}.tgt").write_text("".join(" ".join(s if task == "copy" else s[::-1]) + "\n"
                                                       for s in seqs))

    write("train", 3000)
    write("test", 200)
    config = load_config(None, {
        "run_dir": str(tmp_path / "run"), "model_preset": "tiny", "data.train": str(tmp_path / "train"),
        "data.vocab_size": 300, "model.share_embeddings": True, "model.d_model": 64, "model.d_ff": 128,
        "train.max_steps": steps, "train.schedule": "cosine", "train.lr": 5e-3, "train.warmup_steps": 50,
        "train.max_tokens": 512, "train.label_smoothing": 0.0, "train.save_every": 10000, "train.threads": 1})
    train(config)
    translator = detr.load(tmp_path / "run")
    out = translator.translate((tmp_path / "test.src").read_text().splitlines(), translator.options(beam_size=1))
    expected = (tmp_path / "test.tgt").read_text().splitlines()
    correct = sum(o == e for hyp, ref in zip(out, expected) for o, e in zip(hyp.split(), ref.split()))
    total = sum(len(ref.split()) for ref in expected)
    assert [len(h.split()) for h in out] == [len(r.split()) for r in expected]
    assert correct == total, f"token accuracy {correct / total:.3f}"

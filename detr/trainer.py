"""The learning loop (module `trainer`, so that it does not shadow the function `detr.train`):
teacher-forced cross-entropy, backpropagation, Adam, checkpoints.

    trainer = Trainer(config)          # checks data and run directory, learns the tokenizer
    result = trainer.run()             # steps until max_steps / max_epochs / max_minutes / early stopping

One optimiser step consumes `train.accumulate` batches of at most `train.max_tokens`
padded tokens; the loss is the label-smoothed cross-entropy summed over their target
tokens (padding ignored) divided by that token count, so accumulation is exact.

Resume is exact: `trainer_state.pt` holds the optimizer, every RNG state, the data
stream's position and all counters, saved together with the weights at each checkpoint.
Replaying from it takes the same batches in the same order through the same random
numbers, so on a CPU with fixed threads an interrupted-and-resumed run ends bitwise equal
to an uninterrupted one (tests/test_train.py checks this with SIGKILL).

Under torchrun the same loop runs data-parallel (`detr.distributed`): each rank trains on its
share of the step's global batch, DistributedDataParallel sums the gradients, rank 0 alone
writes the run directory and validates, and the ranks agree on every decision (loss finite,
clock, signals, early stopping) so that they stop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detr.analysis import gradient_norms, update_ratios
from detr.atomic import atomic_write_text
from detr.checkpoint import load_trainer_state, load_weights, save_trainer_state, save_weights, weights_fingerprint
from detr.config import Config, TrainConfig, load_config
from detr.distributed import World, config_digest, whole
from detr.errors import CheckpointError, ConfigError, TrainingError
from detr.freeze import freeze_encoder
from detr.pretrained import encoder_for, pretrained_parameters
from detr.rundir import RunDir
from detr.tasks import make_task

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_KEYS = ("step", "checkpoint", "optimizer", "scaler", "data", "rng", "best", "bad_evals", "nonfinite", "stopped",
              "seconds")


@dataclass
class TrainResult:
    """What a finished (or already finished) run reports."""

    run_dir: Path
    steps: int
    epochs: int  # epochs completed
    seconds: float  # training time over all sessions of this run
    stopped: str  # "max_steps", "max_epochs", "max_minutes", "early_stopping", "schedule_end"
    best: dict[str, Any] | None  # {"metric", "value", "step"} of the best validation
    model_path: Path
    nonfinite_skipped: int


class Interrupted(TrainingError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {run_dir}")


def learning_rate(config: TrainConfig, step: int, horizon: int | None = None) -> float:
    """Learning rate for optimiser step `step` (1-based).

    inverse_sqrt (the paper's): linear warm-up to `lr`, then `lr · sqrt(warmup / step)`;
    cosine: warm-up, then half a cosine down to `min_lr` at `horizon` (default `max_steps`);
    constant: warm-up, then `lr`.
    """
    warm = config.warmup_steps
    if warm and step < warm:
        return config.lr * step / warm
    if config.schedule == "inverse_sqrt":
        rate = config.lr * math.sqrt(max(warm, 1) / max(step, 1))
    elif config.schedule == "cosine":
        span = max((horizon or config.max_steps) - warm, 1)
        progress = min(max(step - warm, 0) / span, 1.0)
        rate = config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        rate = config.lr
    return max(rate, config.min_lr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available")
    return device


def rng_state() -> dict[str, Any]:
    """Every random number generator training touches, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the model, optimizer, data stream and run directory of one training run.

    Construction does every check that can fail on user input — config, data files, run
    directory, tokenizer — so that a mistake costs seconds, not a training run.
    """

    def __init__(self, config: Config, resume: bool = False, progress: bool = False) -> None:
        config.validate()
        self.world = World.from_environment()
        self.progress = progress and self.world.main
        self.tc = config.train
        self.rundir = RunDir(config.run_dir)
        self.run_dir = self.rundir.root
        self.device = resolve_device(self.tc.device)
        if self.world.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per process
        if self.tc.precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"train.precision={self.tc.precision} needs a CUDA device; use fp32 on {self.device}")
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        if config.data.train is None:
            raise ConfigError("data.train is not set: nothing to train on")
        self.task = make_task(config)
        self.metric = self.task.default_metric if self.tc.early_stopping_metric == "auto" \
            else self.tc.early_stopping_metric
        if self.metric not in self.task.metrics:
            raise ConfigError(f"train.early_stopping_metric: {self.metric!r} is not a metric of task {config.task} "
                              f"(choose from {', '.join(self.task.metrics)})")
        self.task.check_data()
        self.lock: Any = None  # rank 0's writer lock on the run directory, for this process's life
        self.world.start(self.tc.backend, self.tc.backend_timeout_minutes, self.device)
        try:
            self.world.same_everywhere("the configuration", config_digest(config.to_dict()))
            if self.world.restarts and not resume:
                log.info("torchrun restart %d: resuming from the last checkpoint", self.world.restarts)
            state = self._set_up_run_dir(config, resume or self.world.restarts > 0)
            self.fingerprint = self.task.fingerprint()  # stored with every weights file of the run

            seed_everything(self.tc.seed)
            self.model = self.task.build_model(self.config.model, encoder_for(self.config.model)).to(self.device)
            if state is not None:
                load_weights(self.model, self.run_dir / state["checkpoint"])
            elif self.tc.init_from is not None:
                self._start_from(Path(self.tc.init_from))
            freeze_encoder(self.model, self.tc.freeze_encoder_layers)
            self.train_model = self.world.wrap(self.model, self.device, self.tc.fsdp)  # what the training step calls
            # Under FSDP rank 0 validates and saves through a whole copy, loaded from the gathered shards.
            self.whole = None
            if self.tc.fsdp and self.world.active and self.world.main:
                encoder = encoder_for(self.config.model, self.rundir.pretrained)  # its architecture, no weights
                self.whole = self.task.build_model(self.config.model, encoder).to(self.device)
            self.optimizer = self._optimizer()
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.tc.precision == "fp16")
            self.stream = self.task.stream(self.tc.max_tokens, self.tc.seed)
            self.valid = self.task.valid

            self.step = 0
            self.seconds = 0.0
            self.best: dict[str, Any] | None = None
            self.bad_evals = 0
            self.nonfinite_in_row = self.nonfinite_total = 0
            self.stopped: str | None = None
            self.horizon = self.tc.max_steps  # the last step, where the cosine ends; fit_schedule_to_clock sets it
            self.saved_step = self.evaluated_step = -1
            # The signal this process caught (its handler sets it at any moment), and the one every rank
            # agreed on after a step (`_agree`): only the agreed one stops the loop, so ranks stop together.
            self.signal_received: int | None = None
            self.stop_signal: int | None = None
            self._batches = None  # the running epoch's iterator
            self._grad_stats: dict[str, float] | None = None
            if state is not None:
                self._load_state(state)
            elif self.world.rank:
                seed_everything(random.Random(f"{self.tc.seed}/rank {self.world.rank}").getrandbits(62))
            self.resumed_from = self.step if state is not None else None
        except BaseException:
            self.close()  # a failed set-up leaves the run directory to the next writer
            raise

    # ------------------------------------------------------------------ set-up

    def _lock_run_dir(self):
        """Create the run directory and take its writer lock (a second trainer gets one clear line)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return self.rundir.lock().acquire()
        except OSError as err:
            raise ConfigError(f"run_dir: cannot write to {self.run_dir}: {err.strerror or err}") from None

    def close(self) -> None:
        """Release the run directory's writer lock (the OS also drops it when the process ends) and
        leave the process group."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.world.close()

    def _start_from(self, weights: Path) -> None:
        """Fine-tuning: the model starts from `weights` (the step count, optimizer and schedule start
        afresh), which must have been trained with this run's tokenizer."""
        stored = weights_fingerprint(weights) if weights.is_file() else None
        if stored is not None and self.fingerprint is not None and stored != self.fingerprint:
            raise ConfigError(f"train.init_from: {weights} was trained with another tokenizer (fingerprint {stored}, "
                              f"this run's is {self.fingerprint}); set data.tokenizer to that run's tokenizer.json")
        load_weights(self.model, weights)
        log.info("starting from the weights in %s", weights)

    def _set_up_run_dir(self, config: Config, resume: bool) -> dict[str, Any] | None:
        """Rank 0 checks the run directory, learns (or loads) the tokenizer and writes the effective
        config; the other ranks then check that they see that directory, and read the tokenizer and
        the trainer state from it. Returns the state to resume from, if any."""
        main_state: list[dict[str, Any] | None] = [None]

        def on_main() -> tuple[bool, str]:
            try:
                self.lock = self._lock_run_dir()
                state = main_state[0] = self._prepare_run_dir(resume)
                vocab = self.task.setup(self.rundir, resuming=state is not None)
                self.config = config.with_vocab(*vocab)  # the effective config: vocabulary sizes from the tokenizer
                self._save_config(state)
                token = secrets.token_hex(8)
                if self.world.active:
                    atomic_write_text(self.rundir.world_marker, token)
            except OSError as err:  # a full disk or a read-only folder while writing the run's first files
                raise ConfigError(f"run_dir: cannot write to {self.run_dir}: {err.strerror or err}") from None
            return state is not None, token

        resuming, token = self.world.on_main(on_main)
        if not self.world.active:
            return main_state[0]
        problem = None
        if not self.world.main:
            try:
                seen = self.rundir.world_marker.read_text()
            except OSError:
                seen = None
            if seen != token:
                problem = (f"run_dir: {self.run_dir} is not shared: {self.world} does not see the files rank 0 "
                           f"writes there; every machine must reach the same run directory (a shared file system)")
        self.world.agree("run_dir", problem)
        if self.world.main:
            with contextlib.suppress(OSError):
                self.rundir.world_marker.unlink(missing_ok=True)
            return main_state[0]
        vocab = self.task.setup(self.rundir, resuming=True)  # rank 0's tokenizer
        self.config = config.with_vocab(*vocab)
        return load_trainer_state(self.rundir.trainer_state) if resuming else None

    def _prepare_run_dir(self, resume: bool) -> dict[str, Any] | None:
        """Check the run directory; return the saved trainer state when resuming."""
        run, run_dir = self.rundir, self.run_dir
        try:
            probe = run_dir / ".detr-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"run_dir: cannot write to {run_dir}: {err.strerror or err}") from None
        if not resume:
            if run.holds_run():
                raise ConfigError(f"run_dir: {run_dir} already holds a run; continue it with --resume "
                                  f"or choose another directory (--run_dir)")
            return None
        if not run.trainer_state.is_file():
            if run.holds_run():
                raise CheckpointError(f"{run.trainer_state}: missing, so {run_dir} cannot be resumed")
            log.info("%s holds no checkpoint yet: starting a new run", run_dir)
            return None
        state = load_trainer_state(run.trainer_state)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{run.trainer_state}: unknown trainer state format {found}")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"{run.trainer_state}: the trainer state lacks {', '.join(missing)}; "
                                  f"it cannot be resumed")
        return state

    def _save_config(self, state: dict[str, Any] | None) -> None:
        """Write the effective config; resuming needs the saved model and data sections."""
        if state is not None:
            saved = load_config(self.rundir.config)
            for section in ("model", "data"):
                old = dataclasses.asdict(getattr(saved, section))
                new = dataclasses.asdict(getattr(self.config, section))
                for key in old:
                    if old[key] != new[key]:
                        raise ConfigError(f"{section}.{key}: {new[key]!r} differs from {old[key]!r} in the run being "
                                          f"resumed ({self.rundir.config}); the model and data cannot change")
        self.config.save(self.rundir.config)

    def _optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on matrices only: biases, LayerNorm gains and embeddings' scale stay free.
        # A pretrained encoder (and a decoder warm-started from it, but for its new cross-attention)
        # learns at lr × pretrained_lr_scale: a new decoder needs a far larger
        # step than weights that are already good.
        pretrained = {id(p) for p in pretrained_parameters(self.model)}
        # Frozen parameters (key biases, train.freeze_encoder_layers) stay in the groups: they never have a
        # gradient, which the optimizer skips, and the groups keep their shape for older trainer states.
        new = [p for p in self.model.parameters() if id(p) not in pretrained]
        old = [p for p in self.model.parameters() if id(p) in pretrained]
        groups = []
        for scale, params in ((1.0, new), (self.tc.pretrained_lr_scale, old)):
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "weight_decay": self.tc.weight_decay if decay else 0.0,
                                   "lr_scale": scale})
        cls = torch.optim.AdamW if self.tc.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, lr=self.tc.lr, betas=tuple(self.tc.betas), eps=self.tc.eps)

    # ------------------------------------------------------------------ state

    def state_dict(self, checkpoint: Path, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
        """The trainer state pointing at the weights in `checkpoint`; `optimizer`: the optimizer's
        state when already gathered (FSDP)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "checkpoint": str(checkpoint.relative_to(self.run_dir)),
            "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.stream.state_dict(),
            "rng": rng_state(),
            "best": self.best,
            "bad_evals": self.bad_evals,
            "nonfinite": [self.nonfinite_in_row, self.nonfinite_total],
            "stopped": self.stopped,
            "seconds": self.seconds,
            "horizon": self.horizon,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        """Everything but the weights (loaded before the model was wrapped) from a trainer state."""
        self.world.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        ranks = state.get("ranks", [state["rng"]])  # every rank's random state; a single process's alone
        if len(ranks) == self.world.size:
            set_rng_state(ranks[self.world.rank])
        else:
            log.warning("the run was saved by %d processes and resumes on %d: the global batch and the ranks' "
                        "random states change, so the result will differ from an uninterrupted run",
                        len(ranks), self.world.size)
            set_rng_state(state["rng"])
            if self.world.rank:
                seed_everything(random.Random(f"{self.tc.seed}/rank {self.world.rank}/{state['step']}")
                                .getrandbits(62))
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        self.nonfinite_in_row, self.nonfinite_total = state["nonfinite"]
        self.stopped, self.seconds = state["stopped"], state["seconds"]
        self.horizon = state.get("horizon", self.tc.max_steps)  # states from before the field have none
        self.saved_step = self.step
        if self.world.main:
            self._truncate_metrics()
        log.info("resumed %s at step %d (epoch %d)", self.run_dir, self.step, self.stream.epoch + 1)

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint: they are about to be written again. A line
        a crash cut off (not valid JSON) is dropped too, with a warning."""
        path = self.rundir.metrics
        if not path.is_file():
            return
        kept = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("%s:%d: a line cut off by a crash; dropped", path, number)
                continue
            if isinstance(entry, dict) and entry.get("step", 0) <= self.step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save(self) -> Path:
        """Checkpoint: weights first, then the state that points at them, then old weights go.
        Every rank takes part (its random state is saved); rank 0 writes."""
        path = self.rundir.checkpoint(self.step)
        ranks = self.world.gather(rng_state())
        model = self.whole_model()
        optimizer = self.world.optimizer_state(self.model, self.optimizer)
        if not self.world.main:
            self.saved_step = self.step
            return path
        path.parent.mkdir(exist_ok=True)
        save_weights(model, path, self.fingerprint)
        if not self.valid:
            save_weights(model, self.rundir.model, self.fingerprint)  # no validation: the last weights
        state = self.state_dict(path, optimizer)
        if self.world.active:
            state["ranks"] = ranks
        save_trainer_state(state, self.rundir.trainer_state)
        for _, old in self.rundir.list_checkpoints()[: -self.tc.keep_last]:
            old.unlink()
        self.saved_step = self.step
        return path

    # ------------------------------------------------------------------ learning

    def stop_reason(self) -> str | None:
        if self.stopped:
            return self.stopped
        if self.tc.max_steps and self.step >= self.tc.max_steps:
            return "max_steps"
        if self.tc.max_epochs and self.stream.epoch >= self.tc.max_epochs:
            return "max_epochs"
        if self.tc.max_minutes and self.seconds >= 60 * self.tc.max_minutes:
            return "max_minutes"
        if self.tc.fit_schedule_to_clock and self.step > self.tc.warmup_steps and self.step >= self.horizon:
            return "schedule_end"
        return None

    def fit_schedule(self) -> None:
        """fit_schedule_to_clock, at the last warm-up step: the cosine's end becomes the step at
        which the remaining minutes run out at the speed so far (every rank agrees on the clock).
        Saved with the checkpoints, so a run resumed after this point keeps it exactly."""
        per_step = self.seconds / self.step
        fit = self.step + int((60 * self.tc.max_minutes - self.seconds) / per_step)
        self.horizon = min(fit, self.tc.max_steps) if self.tc.max_steps else fit
        log.info("schedule fitted to the clock: %.2f s per step so far, so the cosine ends at step %d "
                 "(%.1f minutes left)", per_step, self.horizon, self.tc.max_minutes - self.seconds / 60)

    def next_batches(self) -> list[Any]:
        """The step's global batch list: the next `accumulate` batches of every rank, crossing epoch
        boundaries; fewer at the last epoch's end."""
        out: list[Any] = []
        while len(out) < self.tc.accumulate * self.world.size:
            if self.tc.max_epochs and self.stream.epoch >= self.tc.max_epochs:
                break
            if self._batches is None:
                self._batches = iter(self.stream)
            try:
                out.append(next(self._batches))
            except StopIteration:
                self._batches = None
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.tc.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.tc.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loss_of(self, batch: Any, label_smoothing: float, model: nn.Module | None = None) -> torch.Tensor:
        """The task's summed loss over the batch (padding and ignored positions excluded), through
        `model` (default: the bare model)."""
        with self.autocast():
            return self.task.batch_loss(model or self.model, batch.to(self.device), label_smoothing)

    def train_step(self, batches: list[Any]) -> dict[str, float] | None:
        """One optimiser update over the global batch list `batches` (this rank trains on its share);
        None when the loss was not finite (step skipped, on every rank)."""
        self.model.train()
        tokens = sum(self.task.count(b) for b in batches)  # target tokens, sentences or tagged words
        total = torch.zeros((), device=self.device)
        mine = self.world.shard(batches)
        for i, (batch, weight) in enumerate(mine):
            with self.world.accumulating(self.train_model, last=i == len(mine) - 1):
                loss = self.loss_of(batch, self.tc.label_smoothing, self.train_model) * weight
                # DistributedDataParallel averages over the ranks; × world size makes that the sum.
                self.scaler.scale(loss * self.world.size / tokens).backward()
            total += loss.detach()
        loss_value = self.world.sum([float(total)])[0] / tokens
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: loss is %s; step skipped (%d in a row)", self.step + 1, loss_value,
                        self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.tc.max_nonfinite:
                last = f"the last good checkpoint is step {self.saved_step} in {self.run_dir}" \
                    if self.saved_step >= 0 else "no checkpoint was saved yet"
                raise TrainingError(f"the loss was not finite for {self.nonfinite_in_row} steps in a row (up to step "
                                    f"{self.step + 1}); stopping: {last}. Try a lower train.lr or train.clip_norm")
            return None
        self.nonfinite_in_row = 0
        lr = learning_rate(self.tc, self.step + 1, self.horizon)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # states saved before lr_scale existed have none
        self.scaler.unscale_(self.optimizer)
        clip = self.tc.clip_norm if self.tc.clip_norm > 0 else math.inf
        grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)))
        inspect_grads = self.tc.grad_stats_every and (self.step + 1) % self.tc.grad_stats_every == 0
        if inspect_grads:
            norms = gradient_norms(self.model)
            before = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if inspect_grads:
            self._grad_stats = {f"norm/{b}": v for b, v in norms.items()}
            self._grad_stats.update({f"update_ratio/{b}": v for b, v in update_ratios(self.model, before).items()})
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    # ------------------------------------------------------------------ validation

    def whole_model(self) -> nn.Module:
        """The model with all its weights (under FSDP: every rank must call this; rank 0 gets a whole
        copy loaded from the gathered shards, the others their sharded model)."""
        if not (self.tc.fsdp and self.world.active):
            return self.model
        weights = self.world.whole_weights(self.model)  # a collective: every rank gathers
        if self.whole is None:  # ranks > 0
            return self.model
        self.whole.load_state_dict(weights)
        return self.whole

    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        """The task's validation metrics (translate: loss, ppl, greedy BLEU; classify/tag: loss, accuracy, F1)
        of `model` (default: the model being trained)."""
        model = model or self.model
        model.eval()
        try:
            return self.task.validate(model, lambda batch: self.loss_of(batch, 0.0, model), self.tc.max_tokens,
                                      self.tc.eval_max_sentences)
        finally:
            model.train()

    def _after_eval(self, metrics: dict[str, float], model: nn.Module | None = None) -> None:
        name = self.metric
        value = metrics[name]
        better = self.best is None or (
            value < self.best["value"] if self.task.metrics[name] else value > self.best["value"])
        if better:
            self.best = {"metric": name, "value": value, "step": self.step}
            self.bad_evals = 0
            save_weights(model or self.model, self.rundir.model, self.fingerprint)
        else:
            self.bad_evals += 1
            if self.tc.patience and self.bad_evals >= self.tc.patience:
                self.stopped = "early_stopping"
                log.info("early stopping: valid %s has not improved for %d validations (best %.4g at step %d)",
                         name, self.bad_evals, self.best["value"], self.best["step"])
        self.evaluated_step = self.step

    def _agree(self) -> None:
        """Under torchrun: every rank takes rank 0's clock (train.max_minutes) and stops after a step
        at which any rank got SIGINT/SIGTERM, so that all stop at the same step. A signal that comes
        later in a step (during validation or a save) counts at the next step's agreement: acting on it
        at once would send one rank to save while the others train on and wait for it."""
        if not self.world.active:
            self.stop_signal = self.signal_received
            return
        said = self.world.gather((self.seconds, self.signal_received))
        self.seconds = said[0][0]
        self.stop_signal = next((signum for _, signum in said if signum is not None), None)

    # ------------------------------------------------------------------ the loop

    def result(self) -> TrainResult:
        return TrainResult(self.run_dir, self.step, self.stream.epoch, self.seconds, self.stop_reason() or "",
                           self.best, self.rundir.model, self.nonfinite_total)

    def run(self) -> TrainResult:
        """Train until a stopping condition; save; return the summary.

        Raises:
            Interrupted: SIGINT or SIGTERM arrived (a checkpoint was saved first).
            TrainingError: the loss stayed non-finite for `train.max_nonfinite` steps.
            DataError: the training data ran dry (e.g. every example filtered).
        """
        if self.stop_reason():
            log.info("%s already finished (%s at step %d)", self.run_dir, self.stop_reason(), self.step)
            return self.result()
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

        main = self.world.main  # under torchrun, rank 0 alone writes logs
        writer = SummaryWriter(str(self.run_dir), purge_step=self.step + 1 if self.resumed_from else None) \
            if main else None
        metrics_file = open(self.rundir.metrics, "a", encoding="utf-8") if main else None
        bar = tqdm(total=self.horizon or None, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="train")
        previous_handlers = self._catch_signals()

        def record(split: str, values: dict[str, float]) -> None:
            if writer is None or metrics_file is None:
                return
            metrics_file.write(json.dumps({"step": self.step, "split": split, **values}) + "\n")
            metrics_file.flush()
            for key, value in values.items():
                writer.add_scalar(f"{split}/{key}", value, self.step)

        try:
            with self.world.guard("while training"):
                self._loop(record, bar)
        except OSError as err:  # a full disk, a folder made read-only: one line, the last checkpoint intact
            last = f"the last good checkpoint is step {self.saved_step}" if self.saved_step > 0 \
                else "no checkpoint was saved"
            raise TrainingError(f"cannot write to {self.run_dir} at step {self.step}: {err.strerror or err}; {last}; "
                                f"free the space and continue with --resume") from None
        finally:
            self._restore_signals(previous_handlers)
            bar.close()
            with contextlib.suppress(OSError):
                if metrics_file is not None:
                    metrics_file.close()
            with contextlib.suppress(Exception):
                if writer is not None:
                    writer.close()
            self.close()
        result = self.result()
        log.info("done: %d steps (%s) in %.0fs%s; model: %s", result.steps, result.stopped, result.seconds,
                 f"; best valid {self.best['metric']} {self.best['value']:.4g} at step {self.best['step']}"
                 if self.best else "", result.model_path)
        return result

    def _loop(self, record: Any, bar: Any) -> None:
        """Steps, logs, validations and checkpoints until a stopping condition; then the last save."""
        window_tokens, window_start = 0, time.perf_counter()
        session_start, seconds_before = time.perf_counter(), self.seconds
        while not self.stop_reason():
            batches = self.next_batches()
            if not batches:
                continue  # the epoch limit was reached: stop_reason says so
            out = self.train_step(batches)
            if out is None:
                continue
            self.step += 1
            self.seconds = seconds_before + time.perf_counter() - session_start
            self._agree()
            if self.tc.fit_schedule_to_clock and self.step == self.tc.warmup_steps:
                self.fit_schedule()
                bar.total = self.horizon  # the run's last step now
            window_tokens += int(out["tokens"])
            elapsed = time.perf_counter() - window_start
            speed = window_tokens / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix({"loss": f"{out['loss']:.3f}", "lr": f"{out['lr']:.2e}",
                             f"{self.task.unit}/s": f"{speed:,.0f}"}, refresh=False)
            if self.step % self.tc.log_every == 0:
                record("train", {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                                 f"{self.task.unit}_per_s": speed, "epoch": self.stream.epoch + 1})
                if self.world.main:
                    log.info("step %d%s | epoch %d | loss %.4f | lr %.3g | grad %.3g | %s %s/s", self.step,
                             f"/{self.horizon}" if self.horizon else "", self.stream.epoch + 1,
                             out["loss"], out["lr"], out["grad_norm"], f"{speed:,.0f}", self.task.unit)
                window_tokens, window_start = 0, time.perf_counter()
            if self._grad_stats:
                record("grads", self._grad_stats)
                self._grad_stats = None
            if self.valid and self.step % self.tc.eval_every == 0:
                self._validate_and_record(record)
            if self.step % self.tc.save_every == 0:
                self.save()
            if self.stop_signal is not None:
                self.save()
                raise Interrupted(self.stop_signal, self.step, self.run_dir)
        if self.valid and self.evaluated_step != self.step and self.stopped is None:
            self._validate_and_record(record)  # the final weights get their say in choosing the best
        if self.saved_step != self.step or self.stopped:
            self.save()

    def _validate_and_record(self, record: Any) -> None:
        """Validate (under torchrun: on rank 0, the others waiting) and update the best weights and
        early stopping; every rank learns rank 0's decision."""
        model = self.whole_model()
        if self.world.main:
            started = time.perf_counter()
            metrics = self.validate(model)
            record("valid", metrics)
            log.info("step %d | valid %s", self.step, " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            self._after_eval(metrics, model)
            took = time.perf_counter() - started
            if self.world.active and took > 30 * self.tc.backend_timeout_minutes:
                log.warning("validation took %.0f s, more than half of train.backend_timeout_minutes (%g): the "
                            "other ranks wait that long; raise the timeout or train.eval_max_sentences",
                            took, self.tc.backend_timeout_minutes)
        self.best, self.bad_evals, self.stopped = self.world.from_main((self.best, self.bad_evals, self.stopped))
        self.evaluated_step = self.step

    def _catch_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without saving
        self.signal_received = signum
        log.warning("%s received: saving a checkpoint after this step (send it again to stop at once)",
                    signal.Signals(signum).name)


def train(config: Config, resume: bool = False, progress: bool = False) -> TrainResult:
    """Train a model as `config` describes; see `Trainer`. `progress` shows a tqdm bar."""
    trainer = Trainer(config, resume, progress)
    try:
        return trainer.run()
    finally:
        trainer.close()

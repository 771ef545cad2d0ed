"""Data-parallel training over the processes `torchrun` starts: who this process is, and the few
collective operations the trainer needs.

    torchrun --nproc-per-node 2 -m detr train CONFIG

The global batch. Every rank reads the same seeded `BatchStream`, so every rank knows each
step's whole batch list (`world × train.accumulate` batches); rank r trains on batches r, r+N,
r+2N, ... Gradients are summed over the ranks (DistributedDataParallel's all-reduce; the
accumulating micro-steps skip it) and the loss is divided by the token count of the whole global
batch, so N ranks with `train.accumulate` A take the same steps as one process with N·A.
Nothing has to divide by the world size: at the last epoch's end a rank left without a batch
trains on a copy of one with weight 0.

Only rank 0 writes the run directory. It learns the tokenizer; the others read it after rank 0
says set-up went well (a broadcast that carries rank 0's error, if any, to every rank). Every
rank keeps its own random-number state (rank 0's is a single process's), and rank 0 saves all
of them, so resuming an N-rank run is exact.

`train.fsdp: true` shards parameters, gradients and optimizer state over the ranks instead
(PyTorch's FSDP, `fully_shard` on every layer and on the whole model). Checkpoints are gathered
into the usual `model.safetensors`; rank 0 validates on a whole copy of the model.

A world of one (plain `detr train`) makes every method here a no-op: no process group exists.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from detr.errors import ConfigError, DetrError, TrainingError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a failed collective says when another process of the job went away (gloo and NCCL).
PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
             "socket", "recv", "send")


class Followed(DetrError):
    """Rank 0 failed and said why on its own output; another rank exits with the same code, quietly."""

    quiet = True  # the CLI prints no line for it

    def __init__(self, exit_code: int) -> None:
        super().__init__("rank 0 stopped the job")
        self.exit_code = exit_code


class PeerLost(TrainingError):
    """A collective operation failed: another process of the job died or stopped answering."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, world size, rank on its machine, torchrun restarts."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restarts: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """The variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RESTART_COUNT);
        a world of one without them."""
        env = os.environ
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory, logs and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size} on {socket.gethostname()}"

    # ------------------------------------------------------------------ the process group

    def start(self, backend: str, timeout_minutes: float, device: torch.device) -> None:
        """Join the process group: NCCL for CUDA devices, gloo for CPU (`backend` overrides "auto").
        `timeout_minutes` bounds every collective: how long a rank waits at one (for rank 0's
        validation, say) before it gives up."""
        if not self.active:
            return
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError(f"train.backend=nccl needs CUDA devices; this rank trains on {device} (use gloo)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        try:
            store = None
            if self.restarts:
                # After a torchrun restart the store can still hold the dead processes' addresses, which
                # the new ones would try to connect to: each attempt writes under its own prefix.
                base, _, _ = next(dist.rendezvous("env://", self.rank, self.size, timeout=timeout))
                store = dist.PrefixStore(f"detr-attempt-{self.restarts}/", base)
            dist.init_process_group(backend, store=store, rank=self.rank if store else -1,
                                    world_size=self.size if store else -1, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"{self}: cannot join the process group ({backend}): {first_line(err)}") from None
        log.info("%s: process group %s, timeout %g min", self, backend, timeout_minutes)

    def close(self) -> None:
        """Leave the process group, all ranks together (a rank tearing it down while another is
        still on its way out can leave that one waiting)."""
        if self.active and dist.is_initialized():
            with contextlib.suppress(RuntimeError, dist.DistError):
                dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives

    @contextlib.contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Turn a collective's failure (a peer died, or a timeout) into one line naming this rank."""
        try:
            yield
        except (RuntimeError, dist.DistError) as err:
            text = str(err).lower()
            if not self.active or not any(word in text for word in PEER_LOST):
                raise
            raise PeerLost(f"{self}: lost the other processes of the job {where} ({first_line(err)}); "
                           f"resume from the last checkpoint with --resume (torchrun --max-restarts does it "
                           f"by itself)") from None

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over all ranks (float64, so counts stay exact)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        with self.guard("while summing"):
            dist.all_reduce(tensor)
        return tensor.tolist()

    def from_main(self, obj: T) -> T:
        """Rank 0's `obj`, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        with self.guard("while waiting for rank 0"):
            dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        with self.guard("while gathering"):
            dist.all_gather_object(out, obj)
        return out

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only and hand its result to every rank; an error there (a user's
        mistake, said once by rank 0) stops every rank."""
        if not self.active:
            return work()
        error: DetrError | None = None
        result: Any = None
        if self.main:
            try:
                result = work()
            except DetrError as err:
                error = err
            except BaseException:
                self.from_main(("crashed", 1))  # let the others go before this rank's traceback
                raise
        outcome = self.from_main(("failed", error.exit_code) if error else ("ok", result))
        if error is not None:
            raise error
        if outcome[0] != "ok":
            raise Followed(outcome[1])
        return outcome[1]

    def agree(self, what: str, problem: str | None) -> None:
        """Every rank states its `problem` with `what` (None: none); if any has one, every rank
        stops: the ranks with the problem and rank 0 say it, the rest quietly."""
        problems = [(rank, p) for rank, p in enumerate(self.gather(problem)) if p]
        if not problems:
            return
        mine = [p for rank, p in problems if rank == self.rank]
        if mine:
            raise ConfigError(mine[0])
        if self.main:
            raise ConfigError(f"{what}: {problems[0][1]}")
        raise Followed(ConfigError.exit_code)

    def same_everywhere(self, what: str, value: str) -> None:
        """Stop every rank unless all hold the same `value` (a digest of the config, say)."""
        values = self.gather((value, socket.gethostname()))
        differ = [(rank, host) for rank, (v, host) in enumerate(values) if v != values[0][0]]
        if differ:
            rank, host = differ[0]
            problem = (f"ranks disagree on {what}: rank {rank} (on {host}) differs from rank 0 (on {values[0][1]}); "
                       f"start every process with the same config and flags")
            raise ConfigError(problem) if self.main or self.rank == rank else Followed(ConfigError.exit_code)

    def shard(self, batches: list[T]) -> list[tuple[T, float]]:
        """This rank's part of a step's global batch list: every N-th batch from its rank, each with
        its weight in the loss. A rank left with none (the last, short step of the last epoch)
        gets a copy of the first with weight 0, so that it still takes part in the all-reduce."""
        mine = [(b, 1.0) for b in batches[self.rank::self.size]]
        return mine or [(batches[0], 0.0)]

    # ------------------------------------------------------------------ the model

    def wrap(self, model: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
        """The module the training step calls: DistributedDataParallel around `model` (whose
        parameters it shares); with `fsdp`, `model` itself with every layer of its layer lists and
        the whole sharded in place; `model` itself in a world of one."""
        if not self.active:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard  # imported by the runs that shard: a second of start-up

            for layers in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
                for layer in layers:
                    fully_shard(layer)
            fully_shard(model)
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def accumulating(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """No gradient all-reduce on accumulating micro-steps: only the step's last backward syncs."""
        if _sharded(module):
            module.set_requires_gradient_sync(last)
        if last or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def whole_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's weights, whole, on rank 0 (gathered from the shards under FSDP: every rank
        must call this then); None on the other ranks."""
        if _sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            with self.guard("while gathering the weights"):
                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.main else None
        return model.state_dict() if self.main else None

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's state on rank 0, whole (keyed by parameter name under FSDP: every rank
        must call this then); None on the other ranks."""
        if _sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            with self.guard("while gathering the optimizer state"):
                state = get_optimizer_state_dict(model, optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.main else None
        return optimizer.state_dict() if self.main else None

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state` returned (every rank reads the whole state; FSDP keeps its shard)."""
        if _sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` sharded `module`. FSDP is imported only by the runs that shard: its
    import costs every other command a second of start-up."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in full: a sharded DTensor (an FSDP gradient norm, say) gathered."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def config_digest(settings: dict[str, Any]) -> str:
    """A digest of a config's settings, to check that every rank runs the same one."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

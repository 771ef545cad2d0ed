"""`detr serve`: trained runs as an HTTP service, with dynamic batching and a web page.

    from detr.serve import serve
    serve({"de": "runs/tiny"}, ServeConfig(port=8000))     # blocks until SIGTERM / SIGINT

Built only on the public API: `detr.load_run`, the predictors, `DecodeConfig`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import torch

from detr.apps.assistant import Assistant
from detr.checkpoint import Run, load_run
from detr.config import MonitorConfig, ServeConfig
from detr.errors import ConfigError
from detr.serve.app import create_app, read_api_keys
from detr.serve.processes import listening, serve_processes

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_names(specs: list[str]) -> dict[str, Path]:
    """`RUN` or `NAME=RUN` → {name: run directory}; a bare run is named after its directory.

    Raises:
        ConfigError: two models with one name.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if name in out:
            raise ConfigError(f"two models are named {name!r}: name them NAME=RUN")
        out[name] = Path(path)
    return out


def check_binding(config: ServeConfig) -> list[str] | None:
    """The API keys, after checking that the address is safe to listen on.

    Raises:
        ConfigError: a non-loopback host without keys and without --insecure-public.
    """
    keys = read_api_keys(config.api_key_file) if config.api_key_file else None
    if not is_loopback(config.host) and keys is None and not config.insecure_public:
        raise ConfigError(f"serve.host={config.host} is reachable from other machines: give --api-key-file, "
                          f"or --insecure-public to serve without keys")
    return keys


def worker_plan(config: ServeConfig, models: int) -> tuple[int, int]:
    """How each model computes: (worker threads, intra-op threads of each), in each server process. The
    cores are shared among the processes, and in each among the models (and an assistant, which has
    one worker). With the torch engine and neither `--workers` nor `--threads` given, each core gets a
    worker of one thread: a worker of several threads stalls whenever anything else on the machine
    takes a core from one of them, which on a small server the event loop and the clients always do
    (benchmarks/RESULTS.md, "two workers"). Another engine runs on threads of its own: one worker
    with the model's cores."""
    cores = max(1, torch.get_num_threads() // config.processes // (models + (1 if config.assistant else 0)))
    if config.engine != "torch" or config.workers:
        workers = config.workers or 1
        return workers, config.threads or max(1, cores // workers)
    threads = config.threads or 1
    return max(1, cores // threads), threads


def serve(specs: dict[str, str | Path], config: ServeConfig, device: str = "cpu",
          monitoring: MonitorConfig | None = None) -> None:
    """Load the runs and serve them until SIGTERM or SIGINT (in-flight requests finish first), in
    `config.processes` processes (`detr.serve.processes`). `monitoring`: the windows and alert rules of
    /v1/monitor (when `config.monitor_db` is set). The calling thread is left at one intra-op thread:
    the models compute on their worker threads (`worker_plan`; why: `detr.serve.app.intra_op`).

    Raises:
        ConfigError: an unsafe address, a bad key file, a port already in use, or several processes
            asked for where they cannot serve.
        CheckpointError: a run that does not load.
        DetrError: one of several processes could not start, or ended on its own.
    """
    config.validate()
    if config.processes > 1 and device != "cpu":
        raise ConfigError(f"serve.processes={config.processes} runs on the CPU only (a forked process cannot "
                          f"use the CUDA its parent started): serve --device {device} with --processes 1")
    keys = check_binding(config)
    workers, threads = worker_plan(config, len(specs))
    config = dataclasses.replace(config, workers=workers, threads=threads)
    torch.set_num_threads(1)  # the main thread loads and then only serves HTTP: it starts no OpenMP team
    runs: dict[str, Run] = {name: load_run(path, device) for name, path in specs.items()}
    access = "API keys required" if keys else ("no API keys: loopback only" if is_loopback(config.host)
                                                else "no API keys, public (--insecure-public)")
    processes = f"; {config.processes} processes" if config.processes > 1 else ""

    def build(sock: socket.socket) -> Callable[[], None]:
        assistant = Assistant.load(config.assistant, device=device) if config.assistant else None
        app = create_app(runs, config, keys, monitoring, assistant)
        return lambda: run_uvicorn(app, config, sock)

    def ready() -> None:
        log.info("detr serve: http://%s:%d (models: %s; %s%s)", config.host, config.port, ", ".join(runs),
                 access, processes)

    sockets = listening(config.host, config.port, config.processes)
    if config.processes == 1:
        with sockets[0]:
            run = build(sockets[0])
            ready()
            run()
    else:
        serve_processes(sockets, build, ready)
    log.info("detr serve: stopped")


def run_uvicorn(app: Callable, config: ServeConfig, sock: socket.socket) -> None:
    """Serve `app` on `sock` with uvicorn until SIGTERM or SIGINT, letting requests in flight finish."""
    import uvicorn  # the serving extra: imported only to serve

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=config.grace_seconds,
                                           access_log=False,
                                           # longer than clients' usual 5 s, so a client never reuses a
                                           # connection the server is closing at that moment
                                           timeout_keep_alive=30))
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal it caught; with this handler
    # in place that last signal is a no-op and a graceful stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["ServeConfig", "check_binding", "create_app", "is_loopback", "model_names", "serve", "worker_plan"]

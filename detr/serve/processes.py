"""Several server processes on one port: `detr serve --processes N`.

One Python process runs one thread of Python at a time. A small model decodes in steps that are
mostly Python handing small tensor operations to PyTorch, so two worker threads in one process
take turns at the interpreter and leave the cores idle between them: on 2 cores under 64 clients,
two worker threads each computed 60 % of the time, and two processes of one worker each served
1.4x as many sentences (benchmarks/RESULTS.md, "`detr serve` in two processes").

`serve_processes` forks the processes once the runs are loaded, so their weights are shared
until written. Each process builds its own app (batchers, metrics, connections to the apps'
databases) and accepts on a listening socket of its own, all on one port (SO_REUSEPORT): the
kernel spreads new connections evenly among them. (On one shared socket the first process to wake
took all 64 clients' connections.) Each process has its own queue and batches only its own
requests. The metrics are shared through prometheus_client's multiprocess mode (a file per
process in a temporary folder), so /metrics answers for the whole server from whichever process
the scraper reaches.

The parent forwards SIGTERM and SIGINT to the processes (each finishes its requests in flight),
waits for all of them, and succeeds only if each did. A process that ends on its own stops the
others: a server does not go on at a fraction of its size without saying so. A process whose
parent is gone stops too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable

from prometheus_client import multiprocess, values

from detr.errors import ConfigError, DetrError

log = logging.getLogger(__name__)

ORPHAN_POLL_SECONDS = 1.0


def share_metrics(folder: str) -> None:
    """Keep this process's Prometheus values in `folder`, beside its sibling processes' (prometheus_client's
    multiprocess mode; metrics made before this call keep their old values)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()


def listening(host: str, port: int, n: int) -> list[socket.socket]:
    """`n` sockets listening on one port, among which the kernel spreads new connections.

    Raises:
        ConfigError: the address cannot be listened on (in use, not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        if n > 1:  # a port that another server holds, even one sharing it the same way, is refused
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        for _ in range(n):
            sock = socket.socket(family)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if n > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
    except OSError as err:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"serve: cannot listen on {host}:{port}: {err.strerror}") from None
    return sockets


def serve_processes(sockets: list[socket.socket], build: Callable[[socket.socket], Callable[[], None]],
                    on_ready: Callable[[], None]) -> None:
    """Fork a process per socket; each calls `build(its socket)` (its app), then the function that returns
    (its server, until a signal). `on_ready` runs in the parent once every process has built its app.
    Blocks until all end. The parent closes the sockets once the processes have them.

    Raises:
        DetrError: a process could not build its app (its error), or a process ended on its own.
    """
    with tempfile.TemporaryDirectory(prefix="detr-serve-metrics-") as folder:
        children: dict[int, int] = {}  # pid: the read end of its start-up pipe
        for mine in sockets:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                for other in sockets:
                    if other is not mine:
                        other.close()
                _child(folder, write, build, mine)
            os.close(write)
            children[pid] = read
        for sock in sockets:  # connections the kernel gave a socket here would wait for ever
            sock.close()
        stopping = threading.Event()

        def stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
            stopping.set()
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            failures = [message for message in map(_started, children.values()) if message]
            if failures:
                stop()
            else:
                on_ready()
            while children:
                pid, status = os.wait()
                multiprocess.mark_process_dead(pid, folder)
                os.close(children.pop(pid))
                code = os.waitstatus_to_exitcode(status)
                if not stopping.is_set():
                    failures.append(f"serve: server process {pid} ended on its own (status {code}); "
                                    f"the others were stopped")
                    stop()
                elif code != 0 and not failures:
                    failures.append(f"serve: server process {pid} ended with status {code} while stopping")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failures:
            raise DetrError(failures[0])


def _started(read: int) -> str:
    """'' once the process behind the pipe has built its app, else why it did not."""
    message = b""
    while not message.endswith(b"\n"):
        chunk = os.read(read, 4096)
        if not chunk:
            return "serve: a server process ended while starting (see the log above)"
        message += chunk
    text = message.decode().rstrip("\n")
    return "" if text == "ok" else text


def _child(folder: str, ready: int, build: Callable[[socket.socket], Callable[[], None]], sock: socket.socket) -> None:
    """A server process: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent alone, which stops every process once
        share_metrics(folder)
        threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
        try:
            run = build(sock)
        except DetrError as err:
            os.write(ready, f"{err}\n".encode())
            return
        os.write(ready, b"ok\n")
        os.close(ready)
        run()
        code = 0
    except BaseException:  # the parent reports that this process ended; the log says why
        log.exception("detr serve: server process %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)

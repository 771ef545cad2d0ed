"""`detr serve` under load: throughput against offline `translate`, latency, overload, fuzzing.

For a trained translation run and its test sentences:
1. offline: `Translator.translate` of all sentences in one call (greedy, beam 4), sentences/s;
2. load: `detr serve` on loopback, `--clients` concurrent clients (an aiohttp/asyncio script;
   `--client httpx`) for `--seconds` each sending one sentence per request: greedy and beam 4 with
   continuous batching (the default), the same batching by request (`--batching request`), and
   greedy with batching off (`--max-batch-tokens 1`: every request alone); sentences/s,
   p50/p95/p99 latency, failures, the mean requests per model call (per decoding step with
   continuous batching; /metrics), and the CPU-seconds the clients and the server (all its
   processes, `--server-processes`) spent and the hypervisor stole from this machine meanwhile.
   Offline is measured again right before and after each row, and the row's `ratio` taken against
   their mean: this machine's speed drifts within minutes;
3. overload: `--overload-clients` clients against `--max-queue 32` for `--overload-windows` windows
   of `--overload-seconds` in a row on one server: only 200 and 429 answers, the server's RSS before
   and after each window and its peak (VmHWM): flat memory is an RSS that stops rising;
4. fuzz (`--fuzz N`): schemathesis against /openapi.json, N examples per operation: no 5xx, and
   every status, content type, header and body as the schema declares.

    python benchmarks/serve_load.py --run runs/multi30k_en_de \
        --sentences ../shared/data/translation/multi30k/test2016.en [--fuzz 50]

Not part of the test run. Measure alone: the clients share the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402

FUZZ_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
               "response_schema_conformance")


LOADS = {  # name: (beam size, server flags)
    "greedy": (1, []),
    "beam4": (4, []),
    "greedy-by-request": (1, ["--batching", "request"]),
    "beam4-by-request": (4, ["--batching", "request"]),
    "beam4-8k": (4, ["--max-batch-tokens", "8192"]),  # room for all 64 one-sentence requests in one beam call
    "greedy-alone": (1, ["--max-batch-tokens", "1"]),
    # one worker thread of all the cores, as before `--workers` (default: a worker per core, one thread each)
    "greedy-1-worker": (1, ["--workers", "1"]),
    "beam4-1-worker": (4, ["--workers", "1"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live child processes (a server's `--processes`),
    all their threads (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(int(c)) for c in children)


def stolen_seconds() -> float:
    """CPU time the hypervisor gave other guests so far, all cores (/proc/stat's steal): a row during
    which it rose was measured on less machine than the rows without."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MB, summed over the process and its live child
    processes (a server's `--processes`: their shared pages count once per process, so this is an upper
    bound, and VmHWM's sum bounds the peak of the sum)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    own = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(field + ":")), float("nan"))
    return own + sum(rss_mb(int(child), field) for child in children)


class Server:
    def __init__(self, run: str, threads: int, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "detr", "serve", run, "--port", str(self.port),
                                      "--threads", str(threads), *flags], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def batch_mean(self) -> float:
        values = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith("detr_batch_requests_"):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0]] = float(value)
        return values.get("detr_batch_requests_sum", 0) / max(values.get("detr_batch_requests_count", 1), 1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class HttpxClient:
    """One request at a time per caller, over httpx's pooled keep-alive connections."""

    def __init__(self, url: str, clients: int) -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(base_url=url, timeout=120, limits=limits)

    async def post(self, path: str, body: dict) -> int | str:
        try:
            return (await self.client.post(path, json=body)).status_code
        except httpx.HTTPError as err:
            return type(err).__name__

    async def close(self) -> None:
        await self.client.aclose()


class AiohttpClient:
    """The same over aiohttp, whose client costs less CPU per request than httpx's (the clients share
    the 2 cores with the server: 1.18x the served requests, measured)."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                             timeout=aiohttp.ClientTimeout(total=120))

    async def post(self, path: str, body: dict) -> int | str:
        try:
            async with self.session.post(self.url + path, json=body) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            return type(err).__name__

    async def close(self) -> None:
        await self.session.close()


CLIENTS = {"aiohttp": AiohttpClient, "httpx": HttpxClient}


async def load(url: str, sentences: list[str], clients: int, seconds: float, decode: dict,
               library: str = "aiohttp", server: int | None = None) -> dict:
    """`clients` loops, each posting one sentence at a time until `seconds` pass; with the server's
    process id, the CPU-seconds the clients (this process) and the server spent meanwhile."""
    latencies, statuses = [], {}
    stop_at = time.perf_counter() + seconds
    client = CLIENTS[library](url, clients)
    try:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                code = await client.post("/v1/translate", {"text": sentences[i % len(sentences)], "decode": decode})
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(time.perf_counter() - start)
                i += clients

        began = time.perf_counter()
        cpu = (time.process_time(), cpu_seconds(server) if server else 0.0, stolen_seconds())
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - began
        cpu = (time.process_time() - cpu[0], cpu_seconds(server) - cpu[1] if server else float("nan"),
               stolen_seconds() - cpu[2])
    finally:
        await client.close()
    ok = statuses.get(200, 0)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"ok": ok, "failed": sum(v for k, v in statuses.items() if k not in (200, 429)),
            "statuses": statuses, "seconds": elapsed, "sentences_per_s": ok / elapsed,
            "p50": q[49], "p95": q[94], "p99": q[98],
            "cpu_seconds": {"clients": round(cpu[0], 1), "server": round(cpu[1], 1), "stolen": round(cpu[2], 1)}}


def offline(run: str, sentences: list[str], beam: int, threads: int) -> float:
    torch.set_num_threads(threads)
    translator = detr.load(run)
    options = translator.options(beam_size=beam)
    translator.translate(sentences[:16], options)  # warm-up
    start = time.perf_counter()
    translator.translate(sentences, options)
    return len(sentences) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--sentences", required=True, help="one source sentence per line")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=2, help="offline translation's threads")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the server's model threads (on 2 cores, 1 leaves a core to the event loop and clients)")
    parser.add_argument("--server-processes", type=int, default=1,
                        help="the server's processes (--processes), the cores shared among them")
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--overload-seconds", type=float, default=30, help="each overload window's length")
    parser.add_argument("--overload-windows", type=int, default=4, help="overload windows in a row on one server")
    parser.add_argument("--fuzz", type=int, default=0, help="schemathesis examples per operation (0: no fuzzing)")
    parser.add_argument("--skip", default="", help="comma-separated: offline, load, overload")
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated load rows to run (default: all)")
    parser.add_argument("--client", choices=list(CLIENTS), default="aiohttp", help="the load clients' HTTP library")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    sentences = [line.strip() for line in Path(args.sentences).read_text(encoding="utf-8").splitlines() if line.strip()]
    report: dict = {"sentences": len(sentences), "clients": args.clients, "seconds": args.seconds}
    if "offline" not in skip:
        report["offline"] = {f"beam {b}": offline(args.run, sentences, b, args.threads) for b in (1, 4)}
        print("offline sentences/s:", report["offline"], flush=True)
    if "load" not in skip:
        for label, (beam, flags) in LOADS.items():
            if label not in args.loads.split(","):
                continue
            before = offline(args.run, sentences, beam, args.threads) if "offline" not in skip else None
            server = Server(args.run, args.server_threads, "--processes", str(args.server_processes), *flags)
            try:
                result = asyncio.run(load(server.url, sentences, args.clients, args.seconds, {"beam_size": beam},
                                          args.client, server.proc.pid))
                result["requests_per_model_call"] = server.batch_mean()
            finally:
                server.stop()
            if before is not None:  # offline right before and after the load, against this machine's drift
                around = (before, offline(args.run, sentences, beam, args.threads))
                result.update(offline_around=around, ratio=result["sentences_per_s"] / statistics.mean(around))
            report[label] = result
            print(label, json.dumps(result), flush=True)
    if "overload" not in skip:
        server = Server(args.run, args.server_threads, "--processes", str(args.server_processes), "--max-queue", "32")
        try:
            result = {"rss_before_mb": rss_mb(server.proc.pid, "VmRSS"), "windows": []}
            for _ in range(args.overload_windows):
                window = asyncio.run(load(server.url, sentences, args.overload_clients, args.overload_seconds,
                                          {"beam_size": 1}, args.client, server.proc.pid))
                window["rss_after_mb"] = rss_mb(server.proc.pid, "VmRSS")
                result["windows"].append(window)
            result.update(statuses=dict(sum((Counter(w["statuses"]) for w in result["windows"]), Counter())),
                          failed=sum(w["failed"] for w in result["windows"]),
                          rss_after_mb=[w["rss_after_mb"] for w in result["windows"]],
                          peak_rss_mb=rss_mb(server.proc.pid, "VmHWM"))
        finally:
            server.stop()
        report["overload"] = result
        print("overload", json.dumps(result), flush=True)
    if args.fuzz:
        server = Server(args.run, args.server_threads, "--processes", str(args.server_processes))
        try:
            out = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run",
                                  server.url + "/openapi.json", "--checks", FUZZ_CHECKS, "--max-examples",
                                  str(args.fuzz), "--no-color", "--workers", "1", "--request-timeout", "120"],
                                 capture_output=True, text=True, cwd=ROOT)
        finally:
            server.stop()
        report["fuzz"] = {"exit": out.returncode, "summary": out.stdout.strip().splitlines()[-12:]}
        print(out.stdout[-4000:], flush=True)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

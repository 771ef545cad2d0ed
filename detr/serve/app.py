"""The HTTP service: FastAPI routes over the predictors, each model behind its own `Batcher`.

    POST /v1/translate   {model?, text | texts, decode?, alignment?, constraints?}  → translations, n-best, alignments
    POST /v1/score       {model?, sources, targets}  → log-probability of each target (forced decoding)
    POST /v1/generate    {model?, text | texts, decode?, stream?}     → samples (server-sent events with stream)
    POST /v1/classify    {model?, text | texts | pairs, probs?}       → labels (and probabilities)
    POST /v1/tag         {model?, text | texts}                       → (word, tag) pairs
    POST /v1/inspect     {model?, text, reference?, decode?}          → attention of every layer/head, saliency
    POST /v1/monitor/items {items}  GET /v1/monitor/alerts?after=ID     → the sentiment monitor (detr.apps.monitor)
    POST /v1/assist {question, session?}  POST /v1/assist/feedback {id, feedback} → the assistant (detr.apps.assistant)
    GET  /v1/models  /health  /ready  /metrics  /  (the page)

Errors are JSON `{"error": {"type", "message"}}`: 401 no or wrong API key, 404 unknown model,
409 an endpoint that does not fit the model's task, 413 a request over a size limit, 422 a
malformed request or decoding option, 429 a full queue (with Retry-After), 503 shutting down.
The server reads no file a client names: model names resolve only to the runs it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from detr.analysis import alignment_of, attention_maps, label_maps
from detr.apps.assistant import Assistant
from detr.apps.monitor import Monitor, MonitorStore
from detr.checkpoint import Run
from detr.config import DecodeConfig, MonitorConfig, ServeConfig
from detr.constraints import Constraints
from detr.errors import ConfigError, DataError, DetrError
from detr.export import use_engine
from detr.labeller import Classifier, Labeller, Tagger
from detr.serve.batcher import Batcher, BatchRecord, Job, QueueFull
from detr.serve.page import PAGE
from detr.translator import Translator

log = logging.getLogger(__name__)

DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)}
MAX_DECODINGS = 1024  # distinct validated `decode` settings a server keeps (then it starts again)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ----------------------------------------------------------------------------- request bodies


class Texts(BaseModel):
    """One `text` or a list of `texts` for a `model` (default: the first model served)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a served model's name (GET /v1/models); default: the first")
    text: str | None = Field(None, description="one input")
    texts: list[str] | None = Field(None, description="several inputs; results come back in the same order")


class ConstraintsBody(BaseModel):
    """What one output must and must not contain, and how it starts (target text)."""

    model_config = ConfigDict(extra="forbid")
    include: list[str] = Field([], description="phrases every output must contain (constrained beam search)")
    exclude: list[str] = Field([], description="phrases no output may contain")
    prefix: str = Field("", description="the output starts with this text; the model continues it")


class TranslateBody(Texts):
    decode: dict[str, Any] | None = Field(None, description="DecodeConfig fields: beam_size, nbest, length_penalty, "
                                                            "max_len_a, max_len_b, min_len, no_repeat_ngram, mbr, ...")
    alignment: bool = Field(False, description="also return source-target word alignments from cross-attention")
    constraints: list[ConstraintsBody] | None = Field(
        None, description="one per input (in the order of the texts): terminology, excluded words, a prefix")


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a served model's name (GET /v1/models); default: the first")
    sources: list[str] = Field(description="source sentences")
    targets: list[str] = Field(description="target sentences, one per source")


class GenerateBody(Texts):
    decode: dict[str, Any] | None = Field(None, description="DecodeConfig fields: num_samples, seed, temperature, "
                                                            "top_k, top_p, max_len_a, max_len_b, ...")
    stream: bool = Field(False, description="send tokens as server-sent events as they are drawn (one text only)")


class ClassifyBody(Texts):
    probs: bool = Field(False, description="also return every label's probability")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="sentence-pair runs: [[text, text], ...] instead of text/texts")


class MonitorItems(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = Field(description="items {id, time (ISO 8601), text, source?, topic?}; an id "
                                                    "stored before is skipped, a malformed item reported")


class AssistBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(description="the customer's question")
    session: str | None = Field(None, description="conversation id: the session's last questions join the query")


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(description="the exchange id a /v1/assist reply carried")
    feedback: Literal["good", "bad"]


class ErrorDetail(BaseModel):
    type: str = Field(description="unauthorized, not_found, wrong_task, length_required, too_large, invalid, "
                                  "overloaded, unavailable")
    message: str = Field(description="one line saying what is wrong, naming the field")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (401, "missing or wrong API key"), (404, "no such model"), (409, "the model's task does not fit the endpoint"),
    (411, "a chunked body"), (413, "a request over a size limit"), (422, "a malformed request or option"),
    (429, "the model's queue is full (see Retry-After)"), (503, "shutting down"))}


# One server-sent event of a streamed generation, as OpenAPI before 3.2 describes an event stream.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "enum": ["message", "done", "error"],
              "description": "message: {sample, delta}; done: {samples}; error: {error: {status, message}}"},
    "data": {"type": "string", "description": "the event's JSON"}}}


class InspectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text: str = Field(description="the input to look inside")
    reference: str | None = Field(None, description="translation runs: an output to inspect instead of the model's")
    decode: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- models and metrics


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps never collide); those of every
    process of the server when prometheus_client's multiprocess folder is set (`detr serve --processes`)."""

    def __init__(self) -> None:
        self.shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = CollectorRegistry()
        self.requests = Counter("detr_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("detr_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.queue = Gauge("detr_queue_depth", "requests waiting for a batch", ["model"], registry=self.registry,
                           multiprocess_mode="livesum")
        self.batch_requests = Histogram("detr_batch_requests", "requests sharing one model call (with continuous "
                                        "batching: one decoding step)", ["model"],
                                        registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_inputs = Histogram("detr_batch_inputs", "texts in one model call", ["model"],
                                      registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("detr_source_tokens", "source tokens served", ["model"], registry=self.registry)
        self.busy = Counter("detr_model_seconds", "seconds the model computed", ["model"], registry=self.registry)

    def exposition(self) -> bytes:
        """The text format of every metric (summed over the server's processes when there are several)."""
        if self.shared is None:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        MultiProcessCollector(every, path=self.shared)
        return generate_latest(every)

    def on_batch(self, model: str) -> Callable[[BatchRecord], None]:
        def record(batch: BatchRecord) -> None:
            self.batch_requests.labels(model).observe(batch.requests)
            self.batch_inputs.labels(model).observe(batch.inputs)
            self.tokens.labels(model).inc(batch.tokens)
            self.busy.labels(model).inc(batch.seconds)
            self.queue.labels(model).set(batch.waiting)  # (with several processes: this one's, until its next)

        return record


@dataclasses.dataclass
class Served:
    """One model the server answers for."""

    name: str
    run: Run
    parameters: int  # counted as loaded: an int8 engine keeps its weights as buffers, not parameters
    predictor: Translator | Classifier | Tagger
    batcher: Batcher

    def describe(self) -> dict[str, Any]:
        config = self.run.config
        info: dict[str, Any] = {
            "name": self.name, "task": config.task,
            "parameters": self.parameters,
            "decode": dataclasses.asdict(config.decode)}
        if isinstance(self.predictor, Translator):
            info["languages"] = {"src": config.data.src_lang, "tgt": config.data.tgt_lang}
        else:
            info["labels"] = self.predictor.labels
        return info


def _predictor(name: str, run: Run, config: ServeConfig) -> Translator | Classifier | Tagger:
    """The run's predictor; a translator on the engine `config` names, its own decode settings checked
    against it now rather than refused on every request.

    Raises:
        ConfigError: the engine cannot serve the run as it is set up (one line naming the model).
    """
    predictor = run.predictor()
    if isinstance(predictor, Translator):
        try:
            use_engine(predictor, run.run_dir, config.engine, config.quantize,
                       threads=config.threads or torch.get_num_threads())
            predictor.checked(predictor.decode)
        except ConfigError as err:
            raise ConfigError(f"serve: model {name} ({run.run_dir}) with --engine {config.engine}: {err}") from None
    return predictor


def intra_op(threads: int) -> Callable[[], None] | None:
    """What a model's worker thread runs first: set its intra-op threads (0: leave PyTorch's default).

    Each thread that runs parallel PyTorch work gets an OpenMP team of its own, and OpenMP's threads
    wait for work by spinning only while the process holds no more of them than there are cores;
    beyond that every parallel operation ends in a sleep and a wake-up. `serve` therefore keeps the
    main thread at one thread (it starts no team) and shares the cores among the worker threads:
    a worker beside a team the main thread had started ran a decoding step 2x slower
    (benchmarks/RESULTS.md, "detr serve under load: the model's thread")."""
    return (lambda: torch.set_num_threads(threads)) if threads else None


class Gate:
    """ASGI middleware: refuses a body over `max_body_bytes` (413) or a chunked one (411) before it is
    read, and counts each request by route and status, with its latency (to its last byte).

    Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which starts a task group and a memory
    stream per request: on a 2-core server that Python competes with the model for the
    interpreter."""

    def __init__(self, app: Callable, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        headers = Headers(scope=scope)
        length = headers.get("content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await error_response(ApiError(413, f"request body larger than {self.max_body_bytes} bytes "
                                                   f"(--max-body-bytes)"))(scope, receive, sending)
            elif length is None and scope["method"] == "POST" and "chunked" in headers.get("transfer-encoding", ""):
                await error_response(ApiError(411, "send a Content-Length header (chunked bodies are not read)"))(
                    scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:  # the router has put the matched route into the scope
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ----------------------------------------------------------------------------- the app


def create_app(runs: dict[str, Run], config: ServeConfig, api_keys: list[str] | None = None,
               monitoring: MonitorConfig | None = None, assistant: Assistant | None = None) -> FastAPI:
    """The ASGI app serving `runs` (name → loaded run) as `config` says; `api_keys`: required bearer keys;
    `monitoring`: windows and alert rules of /v1/monitor (when `config.monitor_db` is set);
    `assistant`: the assistant behind /v1/assist.

    Raises:
        ConfigError: a monitor model that is not served, or not a single-text classifier.
    """
    metrics = Metrics()
    # Arguments run left to right: the parameters are counted before `_predictor` may quantize the model.
    models = {name: Served(name, run, sum(p.numel() for p in run.model.parameters()), _predictor(name, run, config),
                           Batcher(name, config.max_batch_tokens, config.max_wait_ms / 1000, config.max_queue,
                                   metrics.on_batch(name), intra_op(config.threads), workers=config.workers or 1))
              for name, run in runs.items()}
    monitor = open_monitor(models, config, monitoring or MonitorConfig())
    monitor_batcher = models[config.monitor_sentiment or config.monitor_topic].batcher if monitor else None
    # The assistant's models get a worker thread of their own, as a served model does (see `intra_op`).
    assistant_batcher = (Batcher("assistant", 1, 0.0, config.max_queue, on_start=intra_op(config.threads))
                         if assistant is not None else None)
    ingesting = threading.Lock()
    state = {"ready": True}
    keys = [k.encode() for k in api_keys or []]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state["ready"] = False
        for batcher in [served.batcher for served in models.values()] + [assistant_batcher]:
            if batcher is not None:  # uvicorn has let the in-flight requests finish
                await asyncio.to_thread(batcher.stop, config.grace_seconds)
        if monitor is not None:
            monitor.store.close()
        if assistant is not None:
            assistant.close()

    app = FastAPI(title="detr", version="1", lifespan=lifespan, responses=ERRORS,
                  description="Translate, generate, classify, tag and look inside trained detr runs.")

    async def authorized(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header.lower().startswith("bearer ") else b""
        # compare_digest against every key, always: the time taken says nothing about the keys
        if not any([hmac.compare_digest(given, key) for key in keys]) or not given:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    app.add_middleware(Gate, metrics=metrics, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # a body FastAPI cannot even decode (not UTF-8): malformed, like bad JSON
            return error_response(ApiError(422, f"body: not valid JSON ({err.detail})"))
        return error_response(ApiError(err.status_code, str(err.detail), dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "parse error")
            return error_response(ApiError(422, f"body: not valid JSON ({reason})"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(ApiError(422, f"{where}: {first.get('msg', 'invalid request')}"))

    # -- helpers that turn a request into work

    def model_for(name: str | None, kind: type | tuple[type, ...], endpoint: str) -> Served:
        if name is None:
            name = next(iter(models))
        served = models.get(name)
        if served is None:
            raise ApiError(404, f"model: no model named {name!r} (served: {', '.join(models)})")
        if not isinstance(served.predictor, kind):
            raise ApiError(409, f"model: {name!r} is a {served.run.config.task} model; {endpoint} does not apply")
        return served

    def inputs_of(body: Texts) -> list[str]:
        if (body.text is None) == (body.texts is None):
            raise ApiError(422, "give exactly one of 'text' and 'texts'")
        if body.text is not None:
            return checked([body.text], "text")
        return checked(body.texts, "texts")

    def checked(texts: list[str], name: str) -> list[str]:
        """`texts` (the request's field `name`) within the size limits."""
        if not texts:
            raise ApiError(422, f"{name}: the list is empty")
        if len(texts) > config.max_texts:
            raise ApiError(413, f"{name}: {len(texts)} texts, more than the {config.max_texts} allowed (--max-texts)")
        for i, t in enumerate(texts):
            if len(t) > config.max_chars:
                raise ApiError(413, f"{name if name == 'text' else f'{name}[{i}]'}: {len(t)} characters, "
                                    f"more than the {config.max_chars} allowed (--max-chars)")
        return texts

    # Validated decoding options by (model, the request's `decode`), with their fields as a tuple (a batching
    # key): most requests repeat a few settings, and validating and tupling them took about 0.5 ms of the
    # event loop per request (cProfile, one process under load). The options are shared, never changed.
    decodings: dict[tuple, tuple[DecodeConfig, tuple]] = {}

    def decode_of(translator: Translator, changes: dict[str, Any] | None) -> tuple[DecodeConfig, tuple]:
        """The request's decoding options, validated, and their fields as a tuple."""
        changes = changes or {}
        try:
            memo = (id(translator), *sorted((k, type(v).__name__, v) for k, v in changes.items()))  # 1 ≠ 1.0 ≠ true
            hash(memo)
        except TypeError:  # a list or an object among the values: not kept
            memo = None
        if memo in decodings:
            return decodings[memo]
        unknown = sorted(set(changes) - DECODE_FIELDS)
        if unknown:
            raise ApiError(422, f"decode.{unknown[0]}: not a decoding option "
                                f"(options: {', '.join(sorted(DECODE_FIELDS))})")
        try:
            options = translator.options(**changes)
        except ConfigError as err:
            raise ApiError(422, str(err)) from None
        found = options, dataclasses.astuple(options)
        if memo is not None:
            if len(decodings) >= MAX_DECODINGS:
                decodings.clear()
            decodings[memo] = found
        return found

    def constraints_of(given: list[ConstraintsBody] | None, n: int) -> list[Constraints]:
        if given is None:
            return [Constraints()] * n
        if len(given) != n:
            raise ApiError(422, f"constraints: {len(given)} entries for {n} texts (one per text)")
        try:
            return [Constraints.from_dict(c.model_dump(), f"constraints[{i}]") for i, c in enumerate(given)]
        except DataError as err:
            raise ApiError(422, str(err)) from None

    def cost(served: Served, texts: list[str] | list[tuple[str, str]], rows: int = 1) -> int:
        predictor = served.predictor
        if isinstance(predictor, Translator):
            return sum(len(predictor.tokenizer.src.encode(t)) + 1 for t in texts) * rows
        return sum(len(predictor.text.sentence(t)[0] if isinstance(t, str) else predictor.text.pair(*t)[0])
                   for t in texts)

    async def submit(batcher: Batcher, job: Job) -> list[Any]:
        try:
            future = batcher.submit(job)
        except QueueFull:
            raise ApiError(429, f"model {batcher.name!r} has {config.max_queue} requests waiting (--max-queue); "
                                f"retry later", {"Retry-After": "1"}) from None
        except RuntimeError:
            raise ApiError(503, "the server is shutting down") from None
        finally:
            metrics.queue.labels(batcher.name).set(batcher.depth)
        try:
            return await asyncio.wrap_future(future)
        except DetrError as err:
            raise ApiError(422, str(err)) from None
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: the batch goes on without it
            raise

    async def alone(batcher: Batcher, work: Callable[[], Any]) -> Any:
        """`work()` on `batcher`'s worker thread, in a batch of its own (the model's math stays on the
        threads that own it)."""
        (result,) = await submit(batcher, Job(("alone", object()), [None], 1, lambda _: [work()]))
        return result

    # -- routes

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health", summary="liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="readiness: every model is loaded", dependencies=guarded)
    async def ready() -> JSONResponse:
        ok = state["ready"]
        return JSONResponse({"ready": ok, "models": list(models)}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (text format)", dependencies=guarded,
             response_class=PlainTextResponse)
    async def prometheus() -> Response:
        for name, served in models.items():
            metrics.queue.labels(name).set(served.batcher.depth)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="the served models", dependencies=guarded)
    async def list_models() -> dict[str, Any]:
        return {"models": [served.describe() for served in models.values()],
                "assistant": None if assistant is None else {"pairs": len(assistant.index.pairs),
                                                             "encoder": assistant.config.encoder,
                                                             "generator": assistant.config.generator}}

    @app.post("/v1/translate", summary="translate (beam search or greedy; n-best; alignments)", dependencies=guarded)
    async def translate(body: TranslateBody) -> dict[str, Any]:
        served = model_for(body.model, Translator, "/v1/translate")
        texts, (options, settings) = inputs_of(body), decode_of(served.predictor, body.decode)
        translator, align = served.predictor, body.alignment
        wishes = constraints_of(body.constraints, len(texts))

        def run(batch: list[tuple[str, Constraints]]) -> list[Any]:
            sources = [src for src, _ in batch]
            results = translator.translate_nbest(sources, options, [wish for _, wish in batch])
            if align:
                return [(nbest, alignment_of(translator, src, nbest[0][0], options))
                        for src, nbest in zip(sources, results)]
            return [(nbest, None) for nbest in results]

        key = ("translate", settings, align)
        # Greedy and beam search run as a stream (requests leave it as their lines end; beam search takes
        # joiners only in its first steps, see `Translator.stream`); what needs whole batches does not.
        continuous = (config.batching == "continuous" and translator.engine is None and not options.mbr
                      and not options.reranks and not align and not any(wish.include for wish in wishes))
        job = Job(key + (continuous,), list(zip(texts, wishes)), cost(served, texts, options.beam_size), run,
                  stream=(lambda: translator.stream(options)) if continuous else None)
        results = await submit(served.batcher, job)
        if continuous:  # a stream gives the n-best lists alone
            results = [(nbest, None) for nbest in results]
        out: dict[str, Any] = {"model": served.name, "translations": [nbest[0][0] for nbest, _ in results],
                               "nbest": [[{"text": t, "score": s} for t, s in nbest] for nbest, _ in results]}
        if align:
            out["alignments"] = [a for _, a in results]
        return out

    @app.post("/v1/score", summary="log-probability of each target given its source (forced decoding)",
              dependencies=guarded)
    async def score(body: ScoreBody) -> dict[str, Any]:
        served = model_for(body.model, Translator, "/v1/score")
        if len(body.sources) != len(body.targets):
            raise ApiError(422, f"targets: {len(body.targets)} targets for {len(body.sources)} sources")
        checked(body.sources, "sources")
        checked(body.targets, "targets")
        translator = served.predictor

        def run(batch: list[tuple[str, str]]) -> list[Any]:
            return translator.score([s for s, _ in batch], [t for _, t in batch])

        job = Job(("score",), list(zip(body.sources, body.targets)), cost(served, body.sources + body.targets), run)
        scores = await submit(served.batcher, job)
        return {"model": served.name, "scores": [{"logprob": s.total, "tokens": s.tokens,
                                                  "per_token": s.per_token} for s in scores]}

    @app.post("/v1/generate", summary="sample outputs (temperature, top-k, top-p); streams with stream: true",
              dependencies=guarded, response_model=None, responses={200: {
                  "description": "the samples; with stream: true, server-sent events ({sample, delta} ..., then "
                                 "event: done)",
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": SSE_EVENT}}}})
    async def generate(body: GenerateBody) -> dict[str, Any] | StreamingResponse:
        served = model_for(body.model, Translator, "/v1/generate")
        texts, (options, _) = inputs_of(body), decode_of(served.predictor, body.decode)
        translator = served.predictor
        if body.stream:
            if len(texts) != 1:
                raise ApiError(422, "stream: give one 'text' to stream")
            return StreamingResponse(stream_samples(served, texts[0], options), media_type="text/event-stream")

        def run(batch: list[str]) -> list[Any]:
            return translator.generate(batch, options)

        # own key: a request's samples depend on its seed and its own lines only
        job = Job(("generate", id(body)), texts, cost(served, texts, options.num_samples), run)
        samples = await submit(served.batcher, job)
        return {"model": served.name, "samples": [[{"text": t, "score": s} for t, s in one] for one in samples]}

    async def stream_samples(served: Served, text: str, options: DecodeConfig) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | None] = asyncio.Queue()
        translator = served.predictor
        ids: list[list[int]] = [[] for _ in range(options.num_samples)]
        sent = [""] * options.num_samples

        def on_step(rows: list[int], tokens: list[int]) -> None:
            for row, token in zip(rows, tokens):
                if token == translator.tokenizer.tgt.eos:
                    continue
                ids[row].append(token)
                text_now = translator.tokenizer.tgt.decode(ids[row])
                if text_now.startswith(sent[row]) and not text_now.endswith("\ufffd"):  # whole characters only
                    delta, sent[row] = text_now[len(sent[row]):], text_now
                    if delta:
                        loop.call_soon_threadsafe(events.put_nowait, sse({"sample": row, "delta": delta}))

        def run(batch: list[str]) -> list[Any]:
            return [translator.sample_streaming(batch[0], on_step, options)]

        async def finish() -> None:
            try:
                job = Job(("stream", id(events)), [text], cost(served, [text]), run)
                (samples,) = await submit(served.batcher, job)
                await events.put(sse({"samples": [{"text": t, "score": s} for t, s in samples]}, "done"))
            except ApiError as err:
                await events.put(sse({"error": {"status": err.status, "message": err.message}}, "error"))
            await events.put(None)

        task = asyncio.create_task(finish())
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            task.cancel()

    def labelling_route(path: str, kind: type[Labeller], summary: str) -> None:
        @app.post(path, summary=summary, dependencies=guarded, name=path.rsplit("/", 1)[1])
        async def label(body: ClassifyBody) -> dict[str, Any]:
            served = model_for(body.model, kind, path)
            predictor = served.predictor
            if isinstance(predictor, Classifier) and predictor.pairs:
                if body.pairs is None or body.text is not None or body.texts is not None:
                    raise ApiError(422, f"pairs: {served.name!r} classifies sentence pairs: give 'pairs'")
                checked([a + b for a, b in body.pairs], "pairs")
                pairs = body.pairs
                job = Job(("classify",), pairs, cost(served, pairs), predictor.classify)
                results = await submit(served.batcher, job)
                return {"model": served.name, "labels": [label for label, _ in results]} | (
                    {"probabilities": [probs for _, probs in results]} if body.probs else {})
            if body.pairs is not None:
                raise ApiError(422, f"pairs: {served.name!r} classifies single texts: give 'text' or 'texts'")
            texts = inputs_of(body)
            if isinstance(predictor, Classifier):
                job = Job(("classify",), texts, cost(served, texts), predictor.classify)
                results = await submit(served.batcher, job)
                out: dict[str, Any] = {"model": served.name, "labels": [label for label, _ in results]}
                if body.probs:
                    out["probabilities"] = [probs for _, probs in results]
                return out
            results = await submit(served.batcher, Job(("tag",), texts, cost(served, texts), predictor.tag))
            return {"model": served.name, "tags": [[{"word": w, "tag": t} for w, t in pairs] for pairs in results]}

    labelling_route("/v1/classify", Classifier, "label each text (classify runs)")
    labelling_route("/v1/tag", Tagger, "tag the words of each text (tag runs)")

    @app.post("/v1/inspect", summary="attention of every layer and head, and saliency, of one input",
              dependencies=guarded)
    async def inspect(body: InspectBody) -> dict[str, Any]:
        served = model_for(body.model, (Translator, Classifier, Tagger), "/v1/inspect")
        inputs_of(Texts(text=body.text))
        if not body.text.strip():
            raise ApiError(422, "text: empty")
        predictor = served.predictor
        if isinstance(predictor, Translator):
            options, _ = decode_of(predictor, body.decode)
            reference = body.reference if body.reference and body.reference.strip() else None

            def run(batch: list[str]) -> list[Any]:
                return [attention_maps(predictor, batch[0], reference, options=options)]
        else:
            def run(batch: list[str]) -> list[Any]:
                return [label_maps(predictor, batch[0])]

        (maps,) = await submit(served.batcher, Job(("inspect", id(body)), [body.text], cost(served, [body.text]), run))
        return {"model": served.name, "outputs": [m.to_dict() for m in maps]}

    def monitor_on() -> Monitor:
        if monitor is None:
            raise ApiError(404, "monitoring is off: start detr serve with --monitor-db and --monitor-sentiment")
        return monitor

    @app.post("/v1/monitor/items", summary="classify and store stream items; new alerts come back",
              dependencies=guarded)
    async def monitor_items(body: MonitorItems) -> dict[str, Any]:
        running = monitor_on()
        if len(body.items) > config.max_texts:
            raise ApiError(413, f"items: {len(body.items)} items, more than the {config.max_texts} allowed "
                                f"(--max-texts)")
        for i, item in enumerate(body.items):
            if isinstance(item.get("text"), str) and len(item["text"]) > config.max_chars:
                raise ApiError(413, f"items[{i}].text: {len(item['text'])} characters, more than the "
                                    f"{config.max_chars} allowed (--max-chars)")
        alerts: list[Any] = []

        def ingest() -> Any:
            # On a worker thread of the model, one ingestion at a time (a model may have several workers):
            # ingestions never overlap, so each window's alert is decided once.
            with ingesting:
                return running.ingest([(f"items[{i}]", item) for i, item in enumerate(body.items)], alerts.append)

        report = await alone(monitor_batcher, ingest)
        return {"stored": report.stored, "duplicates": report.duplicates,
                "bad": [{"item": where, "reason": reason} for where, reason in report.bad],
                "alerts": [a.to_dict() for a in alerts]}

    @app.get("/v1/monitor/alerts", summary="the monitor's alerts (after an alert id, when given)",
             dependencies=guarded)
    async def monitor_alerts(after: int = 0) -> dict[str, Any]:
        stored = await asyncio.to_thread(monitor_on().store.alerts)
        return {"alerts": [a.to_dict() for a in stored if a.id > after]}

    def assistant_on() -> Assistant:
        if assistant is None:
            raise ApiError(404, "no assistant: start detr serve with --assistant DIR")
        return assistant

    @app.post("/v1/assist", summary="answer a customer's question: retrieved, generated or handed off",
              dependencies=guarded)
    async def assist(body: AssistBody) -> dict[str, Any]:
        helper = assistant_on()
        checked([body.question], "question")
        if not body.question.strip():
            raise ApiError(422, "question: empty")
        reply = await alone(assistant_batcher, lambda: helper.ask(body.question, body.session))
        return reply.to_dict()

    @app.post("/v1/assist/feedback", summary="mark an exchange good or bad", dependencies=guarded)
    async def assist_feedback(body: FeedbackBody) -> dict[str, Any]:
        helper = assistant_on()
        try:
            await asyncio.to_thread(helper.log.set_feedback, body.id, body.feedback)
        except DataError as err:
            raise ApiError(404, str(err)) from None
        return {"id": body.id, "feedback": body.feedback}

    return app


def open_monitor(models: dict[str, Served], config: ServeConfig, monitoring: MonitorConfig) -> Monitor | None:
    """The monitor behind /v1/monitor, classifying with served models; None when not asked for."""
    if config.monitor_db is None:
        return None
    chosen = {}
    for role in ("sentiment", "topic"):
        name = getattr(config, f"monitor_{role}")
        if name is not None and name not in models:
            raise ConfigError(f"serve.monitor_{role}: no served model is named {name!r} (served: {', '.join(models)})")
        chosen[role] = models[name].predictor if name is not None else None
    return Monitor(MonitorStore(config.monitor_db), chosen["sentiment"], monitoring, chosen["topic"])


def error_response(err: ApiError) -> JSONResponse:
    kinds = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "wrong_task",
             411: "length_required", 413: "too_large", 422: "invalid", 429: "overloaded", 503: "unavailable"}
    return JSONResponse({"error": {"type": kinds.get(err.status, "error"), "message": err.message}},
                        status_code=err.status, headers=err.headers)


def sse(data: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def read_api_keys(path: str | Path) -> list[str]:
    """The keys of an API key file, one per line (blank lines and # comments skipped).

    Raises:
        ConfigError: the file is missing, unreadable or holds no key.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"serve.api_key_file: cannot read {path}: {getattr(err, 'strerror', err)}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"serve.api_key_file: {path} holds no key")
    return keys

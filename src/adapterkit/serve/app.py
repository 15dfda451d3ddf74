"""The HTTP server: a FastAPI app over the adapter store, the runners and the batcher; uvicorn serves it.

Endpoints (JSON in and out; every error is ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status):

* ``POST /v1/completions`` -- OpenAI-style completions for a causal LM; ``model`` names the adapter ("base": none)
* ``POST /v1/classify``    -- ``{"model": adapter, "input": str | [str]}`` -> label and probabilities per input
* ``GET /v1/adapters``     -- loaded adapters (and the folders that could be loaded); ``GET /v1/models`` too
* ``POST /v1/adapters``    -- ``{"name": N}`` loads ``<adapters dir>/N``; ``DELETE /v1/adapters/N`` unloads it
* ``GET /health``, ``GET /metrics`` (Prometheus text)

Status codes: 400 malformed JSON, wrong fields or an invalid adapter name; 404 unknown adapter; 413 a body over
``max_body_bytes``, an input over ``max_input_tokens`` tokens, or more than ``max_batch`` inputs in one request;
503 the queue is full; 504 the request's rows did not finish within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.batcher import Batcher, QueueFullError
from adapterkit.serve.metrics import Metrics
from adapterkit.serve.runners import Row
from adapterkit.serve.store import BASE_NAME, AdapterStore, UnknownAdapterError, check_name


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching options of one server."""

    max_batch: int = 16  # rows per model call
    max_wait_ms: float = 5.0  # how long the oldest row waits for others to join its batch
    max_queue: int = 256  # rows waiting; more answers 503
    timeout_s: float = 60.0  # per request; later answers 504
    max_input_tokens: int = 512  # per prompt / input text; more answers 413
    max_tokens: int = 256  # largest ``max_tokens`` a completion may ask for
    max_body_bytes: int = 1 << 20  # request body; more answers 413


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, OpenAI-style type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class CompletionRequest(BaseModel):
    """The OpenAI completions fields this server honours; others are refused, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, description="default: 16, or the server's limit if lower")
    temperature: float | None = Field(default=None, description="only 0 (greedy) is served")
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    user: str | None = None


class ClassifyRequest(BaseModel):
    """One text or a list of texts, classified with adapter ``model`` and its head."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str]


class LoadRequest(BaseModel):
    """Load ``<adapters dir>/<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: str


def create_app(runner: Any, store: AdapterStore, config: ServeConfig = ServeConfig(),
               max_positions: int | None = None) -> FastAPI:
    """The app serving ``runner`` (a CompletionRunner or ClassifyRunner) over ``store``."""
    metrics = Metrics({
        "adapterkit_queue_depth": ("Rows waiting for a batch.", lambda: batcher.depth),
        "adapterkit_adapters_loaded": ("Adapters held in host memory.", lambda: len(store.entries)),
        "adapterkit_adapters_resident": ("Adapters attached to the model.", lambda: len(store.resident)),
    })
    batcher = Batcher(runner, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                      max_queue=config.max_queue, max_adapters=store.max_resident, on_batch=metrics.batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="adapterkit serve", lifespan=lifespan)
    app.state.batcher, app.state.store, app.state.runner, app.state.metrics = batcher, store, runner, metrics

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")  # the route's pattern: bounded label values
        metrics.request(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(AdapterKitError)
    async def library_error(request: Request, exc: AdapterKitError) -> JSONResponse:
        return _error(*_status_of(exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        first = (str(exc).splitlines() or [""])[0]
        return _error(500, f"internal error: {type(exc).__name__}: {first}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": runner.kind, "adapters_loaded": len(store.entries),
                "adapters_resident": len(store.resident), "queue_depth": batcher.depth}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/adapters")
    @app.get("/v1/models")
    async def list_adapters() -> dict[str, Any]:
        loaded = store.describe()
        rows = [{"id": BASE_NAME, "object": "model", "method": None, "resident": True}, *loaded]
        return {"object": "list", "data": rows,
                "available": [n for n in store.available() if n not in store.entries]}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = await _parse(request, LoadRequest, config)
        # reading and attaching touch the model: done on the batch thread's lock, off the event loop
        entry = await asyncio.to_thread(store.add, check_name(body.name))
        return {"loaded": entry.name, "adapters": len(store.entries)}

    @app.delete("/v1/adapters/{name:path}")  # any path, so "../x" reaches the name check (400), not a 404
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.to_thread(store.remove, check_name(name))
        return {"unloaded": name, "adapters": len(store.entries)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        if runner.kind != "completions":
            raise ApiError(400, "this server runs a classification model: use POST /v1/classify")
        body = await _parse(request, CompletionRequest, config)
        if body.stream:
            raise ApiError(400, "stream: streaming is not supported; send stream=false")
        if body.temperature not in (None, 0, 0.0):
            raise ApiError(400, f"temperature: only greedy decoding (0) is served, got {body.temperature}")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(16, config.max_tokens)
        if max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens: at most {config.max_tokens}, got {max_tokens}")
        adapter = _adapter(body.model, store)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rows = []
        for index, prompt in enumerate(_bounded(prompts, "prompt", config)):
            ids = runner.encode(prompt)
            _check_length(ids, f"prompt[{index}]" if len(prompts) > 1 else "prompt", config)
            if max_positions is not None and len(ids) + max_tokens > max_positions:
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                    f"model's context of {max_positions} tokens")
            rows.append((adapter, Row(adapter, ids, max_tokens)))
        results = await _run(batcher, rows, config)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                            for i, r in enumerate(results)],
                "usage": _usage(sum(r["prompt_tokens"] for r in results),
                                sum(r["completion_tokens"] for r in results))}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        if runner.kind != "classify":
            raise ApiError(400, "this server runs a causal LM: use POST /v1/completions")
        body = await _parse(request, ClassifyRequest, config)
        adapter = _adapter(body.model, store)
        texts = [body.input] if isinstance(body.input, str) else body.input
        rows = []
        for index, text in enumerate(_bounded(texts, "input", config)):
            ids = runner.encode(text)
            _check_length(ids, f"input[{index}]" if len(texts) > 1 else "input", config, max_positions)
            rows.append((adapter, Row(adapter, ids)))
        results = await _run(batcher, rows, config)
        return {"object": "list", "model": body.model,
                "data": [{"index": i, "label": r["label"], "probabilities": r["probabilities"]}
                         for i, r in enumerate(results)],
                "usage": _usage(sum(r["prompt_tokens"] for r in results), 0)}

    return app


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _status_of(exc: AdapterKitError) -> tuple[int, str, str]:
    if isinstance(exc, UnknownAdapterError):
        return 404, str(exc), "not_found_error"
    if isinstance(exc, QueueFullError):
        return 503, str(exc), "server_busy"
    return 400, str(exc), "invalid_request_error"  # bad names, unreadable adapter folders, bad options


async def _parse(request: Request, model: type[BaseModel], config: ServeConfig) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {config.max_body_bytes}")
    raw = await request.body()
    if len(raw) > config.max_body_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {config.max_body_bytes}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ApiError(400, f"malformed JSON body: {reason}{where}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{field}: {first['msg']} ({exc.error_count()} error(s) in the body)") from None


def _adapter(name: str, store: AdapterStore) -> str | None:
    if name == BASE_NAME:
        return None
    store.get(check_name(name))  # 400 for a bad name, 404 for an unknown one
    return name


def _bounded(items: list[str], what: str, config: ServeConfig) -> list[str]:
    if not items:
        raise ApiError(400, f"{what}: empty list")
    if len(items) > config.max_batch:
        raise ApiError(413, f"{what}: {len(items)} items in one request; at most {config.max_batch}")
    return items


def _check_length(ids: tuple[int, ...], what: str, config: ServeConfig, positions: int | None = None) -> None:
    if not ids:
        raise ApiError(400, f"{what}: empty (no tokens)")
    limit = min(config.max_input_tokens, positions or config.max_input_tokens)  # a classifier sees no more
    if len(ids) > limit:
        raise ApiError(413, f"{what}: {len(ids)} tokens; this server takes at most {limit}")


async def _run(batcher: Batcher, rows: list[tuple[str | None, Row]], config: ServeConfig) -> list[Any]:
    futures = batcher.submit(rows)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), config.timeout_s))
    except TimeoutError:
        for future in futures:
            future.cancel()  # rows not started yet are skipped by the batcher
        raise ApiError(504, f"request timed out after {config.timeout_s:g} s", "timeout") from None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

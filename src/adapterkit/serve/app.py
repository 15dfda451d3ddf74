"""The HTTP server: a FastAPI app over the adapter store, the runners and the batcher; uvicorn serves it.

Endpoints (JSON in and out; every error is ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` -- OpenAI's completions and chat completions for a
  causal LM (serve/generate_api.py): ``model`` names the adapter ("base": none); temperature (0: greedy), top_p,
  seed, stop, max_tokens, usage; ``stream: true`` answers server-sent events. Rows are batched continuously (they
  join and leave the running batch at every decode step: serve/scheduler.py) or per request (``batching``)
* ``POST /v1/classify``    -- ``{"model": adapter, "input": str | [str]}`` -> label and probabilities per input
* ``GET /v1/models``       -- OpenAI's model list: "base" and every loaded adapter (``GET /v1/adapters`` too,
  with the folders that could be loaded)
* ``POST /v1/adapters``    -- ``{"name": N}`` loads ``<adapters dir>/N``; ``DELETE /v1/adapters/N`` unloads it;
  ``{"name": N, "combine": {"sources", "weights", "how", ...}}`` builds N from loaded adapters (serve/recipes.py)
* ``GET /health``, ``GET /metrics`` (Prometheus text)

Status codes: 400 malformed JSON, a field of the wrong type or value, an invalid adapter name or a bad adapter
folder, a chat message with a wrong role or no string content, a conversation the chat template refuses or a model
without one, a prompt longer than the model's context or prompt + max_tokens past it, max_tokens over the limit;
404 an unknown adapter or a missing adapter folder; 409 an adapter name that is loaded already; 413 a body over
``max_body_bytes``, an input over ``max_input_tokens`` tokens, or more inputs in one request than ``max_batch`` or
``max_queue`` allow (it could never run); 503 the queue is full for now (with ``Retry-After``); 504 the request's
rows did not finish within ``timeout_s`` (a stream that has begun ends with one ``{"error": ...}`` event instead);
500 only for a fault of the server's own, logged with its traceback.
Every answer, errors included, is counted in /metrics and keeps the connection open (but a 413 cut short while the
body streams: the rest of it is never read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.batcher import Batcher, QueueFullError, TooManyRowsError
from adapterkit.serve.decode import Decoder
from adapterkit.serve.generate_api import add_generation_routes
from adapterkit.serve.guard import Guard, error_body
from adapterkit.serve.limits import ServeConfig, adapter_of, bounded, check_length, usage
from adapterkit.serve.metrics import Metrics
from adapterkit.serve.recipes import add_combined, parse_recipe
from adapterkit.serve.requests import ApiError, ClassifyRequest, LoadRequest, parse
from adapterkit.serve.rows import Row
from adapterkit.serve.scheduler import RequestLevel, Scheduler
from adapterkit.serve.store import BASE_NAME, AdapterStore, AlreadyLoadedError, NotFoundError, check_name

__all__ = ["RETRY_AFTER_S", "ServeConfig", "create_app"]

RETRY_AFTER_S = 1  # what a 503 asks the client to wait: a batch takes milliseconds to a few seconds


def create_app(runner: Any, store: AdapterStore, config: ServeConfig | None = None,
               max_positions: int | None = None) -> FastAPI:
    """The app serving ``runner`` (a CompletionRunner or ClassifyRunner) over ``store``.

    ``app.state.batcher`` runs the rows: a Scheduler (continuous batching of a causal LM), else a Batcher.
    """
    config = config or ServeConfig()
    metrics = Metrics({
        "adapterkit_queue_depth": ("Rows waiting for a batch.", lambda: batcher.depth),
        "adapterkit_adapters_loaded": ("Adapters held in host memory.", lambda: len(store.entries)),
        "adapterkit_adapters_resident": ("Adapters attached to the model.", lambda: len(store.resident)),
    })
    limits: dict[str, Any] = {"max_batch": config.max_batch, "max_wait_s": config.max_wait_ms / 1000,
                              "max_queue": config.max_queue, "max_adapters": store.max_resident,
                              "on_batch": metrics.batch}
    batcher: Any
    if runner.kind == "completions" and config.batching == "continuous":
        batcher = Scheduler(Decoder(runner.model, runner.tokenizer, store), **limits)
        generation: Any = batcher
    else:
        batcher = Batcher(runner, **limits)
        generation = RequestLevel(batcher)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await generation.start()
        yield
        await generation.stop()

    app = FastAPI(title="adapterkit serve", lifespan=lifespan)
    app.state.batcher, app.state.store, app.state.runner, app.state.metrics = batcher, store, runner, metrics
    app.add_middleware(Guard, metrics=metrics)  # counts every answer; unexpected exceptions become a logged 500

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):  # a route this server does not have (chat, say): name it
            where = f"{request.method} {request.url.path}"
            return _error(exc.status_code, f"{where}: {'no such endpoint' if exc.status_code == 404 else exc.detail}",
                          "not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(AdapterKitError)
    async def library_error(request: Request, exc: AdapterKitError) -> Response:
        return _error(*_status_of(exc))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": runner.kind, "adapters_loaded": len(store.entries),
                "adapters_resident": len(store.resident), "queue_depth": batcher.depth,
                "threads": torch.get_num_threads()}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/adapters")
    @app.get("/v1/models")
    async def list_adapters() -> dict[str, Any]:
        rows = [{"id": BASE_NAME, "method": None, "resident": True}, *store.describe()]
        rows = [{**row, "object": "model", "created": started, "owned_by": "adapterkit"} for row in rows]
        return {"object": "list", "data": rows,
                "available": [n for n in store.available() if n not in store.entries]}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = await parse(request, LoadRequest, config.max_body_bytes)
        name = check_name(body.name)
        # reading, combining and attaching touch the model: done on the batch thread's lock, off the event loop
        if body.combine is not None:
            entry = await asyncio.to_thread(add_combined, store, name, parse_recipe(body.combine))
        else:
            entry = await asyncio.to_thread(store.add, name)
        return {"loaded": entry.name, "adapters": len(store.entries)}

    @app.delete("/v1/adapters/{name:path}")  # any path, so "../x" reaches the name check (400), not a 404
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.to_thread(store.remove, check_name(name))
        return {"unloaded": name, "adapters": len(store.entries)}

    add_generation_routes(app, runner, store, generation, config, max_positions, _status_of)

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        if runner.kind != "classify":
            raise ApiError(400, "this server runs a causal LM: use POST /v1/completions")
        body = await parse(request, ClassifyRequest, config.max_body_bytes)
        adapter = adapter_of(body.model, store)
        texts = [body.input] if isinstance(body.input, str) else body.input
        rows = []
        for index, text in enumerate(bounded(texts, "input", config)):
            ids = runner.encode(text)
            check_length(ids, f"input[{index}]" if len(texts) > 1 else "input", config, max_positions)
            rows.append((adapter, Row(adapter, ids)))
        results = await _run(batcher, rows, config)
        return {"object": "list", "model": body.model,
                "data": [{"index": i, "label": r["label"], "probabilities": r["probabilities"]}
                         for i, r in enumerate(results)],
                "usage": usage(sum(r["prompt_tokens"] for r in results), 0)}

    return app


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    if status == 503:  # busy for now: when to come back (the OpenAI client waits that long before it retries)
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    if status == 409:  # the OpenAI client retries a 409 (a lock timeout, to it) unless told not to
        headers = {"x-should-retry": "false", **(headers or {})}
    return Response(error_body(status, message, kind), status_code=status, media_type="application/json",
                    headers=headers)


def _status_of(exc: AdapterKitError) -> tuple[int, str, str]:
    if isinstance(exc, NotFoundError):
        return 404, str(exc), "not_found_error"
    if isinstance(exc, AlreadyLoadedError):
        return 409, str(exc), "conflict_error"
    if isinstance(exc, TooManyRowsError):
        return 413, str(exc), "invalid_request_error"
    if isinstance(exc, QueueFullError):
        return 503, str(exc), "server_busy"
    return 400, str(exc), "invalid_request_error"  # bad names, unreadable adapter folders, bad options


async def _run(batcher: Batcher, rows: list[tuple[str | None, Row]], config: ServeConfig) -> list[Any]:
    futures = batcher.submit(rows)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), config.timeout_s))
    except TimeoutError:
        for future in futures:
            future.cancel()  # rows not started yet are skipped by the batcher
        raise ApiError(504, f"request timed out after {config.timeout_s:g} s", "timeout") from None

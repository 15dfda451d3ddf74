"""The OpenAI generation endpoints of a causal LM: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Both take the sampling fields of serve/requests.py (temperature 0 = greedy, top_p, seed, stop, max_tokens,
stream, stream_options) and answer in OpenAI's shapes: a ``text_completion`` / ``chat.completion`` object, or with
``stream: true`` server-sent events of ``text_completion`` / ``chat.completion.chunk`` chunks (a chat stream's first
chunk carries the role, each row's last its finish_reason; ``stream_options.include_usage`` adds a chunk with the
usage and no choices), ended by ``data: [DONE]``. Everything about the request is checked before an answer starts:
a stream only ever fails midway for a timeout or an adapter unloaded under it, as one ``{"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.chat import chat_prompt, check_messages
from adapterkit.serve.limits import ServeConfig, adapter_of, bounded, check_length, usage
from adapterkit.serve.requests import ApiError, ChatRequest, CompletionRequest, parse
from adapterkit.serve.rows import Row, Sampling
from adapterkit.serve.scheduler import Ticket
from adapterkit.serve.store import AdapterStore

MAX_STOPS = 4  # as OpenAI's API
Event = tuple[int, str, Any]


def add_generation_routes(app: FastAPI, runner: Any, store: AdapterStore, scheduler: Any, config: ServeConfig,
                          max_positions: int | None, status_of: Callable[[AdapterKitError], tuple[int, str, str]],
                          ) -> None:
    """Register the completions and chat endpoints on ``app``; ``scheduler`` runs their rows."""

    def rows_for(prompts: list[tuple[int, ...]], names: list[str], adapter: str | None, max_tokens: int,
                 sampling: Sampling) -> list[tuple[str | None, Row]]:
        rows = []
        for ids, what in zip(prompts, names):
            if max_positions is not None and len(ids) >= max_positions:
                raise ApiError(400, f"{what}: {len(ids)} tokens, longer than the model's context of "
                                    f"{max_positions} tokens")
            check_length(ids, what, config)
            if max_positions is not None and len(ids) + max_tokens > max_positions:
                raise ApiError(400, f"{what} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                    f"model's context of {max_positions} tokens")
            rows.append((adapter, Row(adapter, ids, max_tokens, sampling)))
        return rows

    def require_lm() -> None:
        if runner.kind != "completions":
            raise ApiError(400, "this server runs a classification model: use POST /v1/classify")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        require_lm()
        body = await parse(request, CompletionRequest, config.max_body_bytes)
        max_tokens, sampling = _options(body, body.max_tokens, config)
        adapter = adapter_of(body.model, store)
        texts = bounded([body.prompt] if isinstance(body.prompt, str) else body.prompt, "prompt", config)
        names = ["prompt"] if len(texts) == 1 else [f"prompt[{i}]" for i in range(len(texts))]
        rows = rows_for([runner.encode(t) for t in texts], names, adapter, max_tokens, sampling)
        return await _answer(_Completion(body.model), body, rows, scheduler, config, status_of)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        require_lm()
        body = await parse(request, ChatRequest, config.max_body_bytes)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "max_tokens and max_completion_tokens: give one of them (they are one setting)")
        max_tokens, sampling = _options(body, body.max_completion_tokens or body.max_tokens, config)
        adapter = adapter_of(body.model, store)
        ids = chat_prompt(runner.tokenizer, check_messages(body.messages))
        rows = rows_for([ids], ["messages"], adapter, max_tokens, sampling)
        return await _answer(_Chat(body.model), body, rows, scheduler, config, status_of)


def _options(body: Any, max_tokens: int | None, config: ServeConfig) -> tuple[int, Sampling]:
    """(max_tokens, sampling) of a request, each field checked against the server's limits."""
    max_tokens = max_tokens if max_tokens is not None else min(16, config.max_tokens)
    if max_tokens > config.max_tokens:
        raise ApiError(400, f"max_tokens: at most {config.max_tokens}, got {max_tokens}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise ApiError(400, "stop: an empty string would stop before the first token; drop it")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed with stream=true")
    return max_tokens, Sampling(temperature=body.temperature or 0.0,
                                top_p=body.top_p if body.top_p is not None else 1.0,
                                seed=body.seed, stop=tuple(stops))


async def _answer(shape: _Completion | _Chat, body: Any, rows: list[tuple[str | None, Row]], scheduler: Any,
                  config: ServeConfig, status_of: Callable[[AdapterKitError], tuple[int, str, str]]) -> Any:
    events: asyncio.Queue[Event] = asyncio.Queue()
    ticket: Ticket = scheduler.submit(rows, events)  # 503 / 413 before anything is answered
    deadline = asyncio.get_running_loop().time() + config.timeout_s
    if not body.stream:
        try:
            results = await _collect(events, len(rows), deadline, config)
        finally:
            ticket.cancel()  # rows still running when this request failed are dropped (no-op once all are done)
        prompt = sum(r["prompt_tokens"] for r in results)
        return {**shape.head(), "choices": [shape.choice(i, r) for i, r in enumerate(results)],
                "usage": usage(prompt, sum(r["completion_tokens"] for r in results))}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    stream = _stream(shape, events, ticket, len(rows), deadline, include_usage, config, status_of)
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _next(events: asyncio.Queue[Event], deadline: float, config: ServeConfig) -> Event:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(events.get(), max(remaining, 0.0))
    except TimeoutError:
        raise ApiError(504, f"request timed out after {config.timeout_s:g} s", "timeout") from None


async def _collect(events: asyncio.Queue[Event], count: int, deadline: float, config: ServeConfig) -> list[Any]:
    results: list[Any] = [None] * count
    left = count
    while left:
        index, kind, value = await _next(events, deadline, config)
        if kind == "error":
            raise value
        if kind == "done":
            results[index], left = value, left - 1
    return results


async def _stream(shape: _Completion | _Chat, events: asyncio.Queue[Event], ticket: Ticket, count: int,
                  deadline: float, include_usage: bool, config: ServeConfig,
                  status_of: Callable[[AdapterKitError], tuple[int, str, str]]) -> AsyncIterator[str]:
    prompt = completion = 0
    try:
        for chunk in shape.opening(count):
            yield _sse(chunk)
        left = count
        while left:
            try:
                index, kind, value = await _next(events, deadline, config)
                if kind == "error":
                    raise value
            except (ApiError, AdapterKitError) as exc:  # the answer has begun: the error is the last event
                status, message, kind_name = ((exc.status, exc.message, exc.kind) if isinstance(exc, ApiError)
                                              else status_of(exc))
                yield _sse({"error": {"message": message, "type": kind_name, "code": status}})
                return
            if kind == "text":
                yield _sse(shape.piece(index, value))
            elif kind == "done":
                yield _sse(shape.finish(index, value["finish_reason"]))
                prompt, completion, left = prompt + value["prompt_tokens"], \
                    completion + value["completion_tokens"], left - 1
        if include_usage:
            yield _sse({**shape.head(chunk=True), "choices": [], "usage": usage(prompt, completion)})
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # the client went away (or the stream ended): its rows leave the batch


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Completion:
    """OpenAI's completion shapes."""

    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", model, int(time.time())

    def head(self, chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def choice(self, index: int, result: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "text": result["text"], "logprobs": None, "finish_reason": result["finish_reason"]}

    def opening(self, count: int) -> list[dict[str, Any]]:
        return []

    def piece(self, index: int, text: str) -> dict[str, Any]:
        return {**self.head(True), "choices": [{"index": index, "text": text, "logprobs": None,
                                                "finish_reason": None}]}

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return {**self.head(True), "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": reason}]}


class _Chat(_Completion):
    """OpenAI's chat-completion shapes: a message in the answer, deltas in the chunks."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def head(self, chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.model}

    def choice(self, index: int, result: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": result["text"]}, "logprobs": None,
                "finish_reason": result["finish_reason"]}

    def _chunk(self, index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {**self.head(True), "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                "finish_reason": reason}]}

    def opening(self, count: int) -> list[dict[str, Any]]:
        return [self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(count)]

    def piece(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk(index, {"content": text}, None)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk(index, {}, reason)

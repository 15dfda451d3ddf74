"""The outermost layer of the app: counts every answer in the metrics and turns any unexpected exception into a
logged 500 JSON error.

A plain ASGI middleware, placed inside Starlette's ServerErrorMiddleware. That one answers an unhandled exception
with a 500 and then re-raises it, so uvicorn drops the client's keep-alive connection, and a middleware written with
``call_next`` never sees the answer to count it. Here the exception stops: the client gets ``{"error": ...}`` on a
connection that stays open, the traceback goes to the log, and the request is counted like any other.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adapterkit.serve.metrics import Metrics

LOG = logging.getLogger("adapterkit.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_body(status: int, message: str, kind: str) -> bytes:
    """The JSON error document, ASCII-safe whatever the message holds (it may quote the client's input)."""
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps({"error": {"message": safe, "type": kind, "code": status}}).encode()


class Guard:
    """Wraps an ASGI app: metrics per (route pattern, status) and latency; unexpected exceptions answered 500."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on one request (other ASGI events pass straight through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            LOG.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if status:  # the answer had begun: it cannot be replaced, only cut short
                raise
            first = (str(exc).splitlines() or [""])[0]
            body = error_body(500, f"internal error: {type(exc).__name__}: {first}", "server_error")
            await sending({"type": "http.response.start", "status": 500,
                           "headers": [(b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode()),
                                       # the same input would fail the same way: the OpenAI client must not resend
                                       (b"x-should-retry", b"false")]})
            await send({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")  # set by the router on this same scope: the pattern, a bounded label value
            self.metrics.request(getattr(route, "path", "other"), status[0] if status else 500,
                                 time.perf_counter() - start)

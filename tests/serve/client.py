"""Helpers of the HTTP tests: a real uvicorn server on 127.0.0.1 in a thread, error and metrics checks, and a raw
keep-alive connection (``http.client``) that shows whether the server kept it open."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapterkit.serve.app import ServeConfig
from adapterkit.serve.server import Running, build_app, start_in_thread

LIMIT = 30.0  # seconds per HTTP call: generous, the CPU may be shared with other work


@contextlib.contextmanager
def server(model: Path, adapters: Path | None, max_resident: int = 8, **options: Any) -> Iterator[Running]:
    """A server for ``model`` and the adapter folders under ``adapters``, with ServeConfig ``options``."""
    app = build_app(model, adapters, max_resident=max_resident, config=ServeConfig(**options))
    running = start_in_thread(app)
    try:
        yield running
    finally:
        running.stop()


def expect_error(response: httpx.Response, status: int, *words: str) -> str:
    """The one-line message of an error answer with ``status`` that contains every one of ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == status
    message = error["message"]
    assert "\n" not in message and all(w in message for w in words), message
    return message


def counted(url: str, endpoint: str, status: int) -> int:
    """How many answers /metrics has counted for ``endpoint`` (the route pattern) with ``status``."""
    text = httpx.get(f"{url}/metrics", timeout=LIMIT).text
    key = f'adapterkit_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    return next((int(line.split()[-1]) for line in text.splitlines() if line.startswith(key + " ")), 0)


class Connection:
    """One keep-alive HTTP/1.1 connection; ``request`` fails if the server closed it since the last answer."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.http = http.client.HTTPConnection(host, int(port), timeout=LIMIT)
        self.http.connect()
        self.sock = self.http.sock

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) of one request on this same socket."""
        headers = {"content-type": "application/json"} if body is not None else {}
        self.http.request(method, path, body=body, headers=headers)
        response = self.http.getresponse()
        data = json.loads(response.read())
        assert not response.will_close, f"the server closed the connection after {response.status}"
        assert self.http.sock is self.sock, "the connection was replaced"
        return response.status, data

    def close(self) -> None:
        """Close the connection."""
        self.http.close()

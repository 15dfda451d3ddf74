"""Hand-made bad requests against a real uvicorn server at 127.0.0.1: each is a 4xx with a one-line JSON error naming
what is wrong, counted in /metrics, on a keep-alive connection the server leaves open; an unexpected fault is a logged
500 that is counted and leaves the connection open too; a body over the limit is refused while it streams.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from adapterkit.serve.server import Running  # noqa: E402
from tests.serve.client import LIMIT, Connection, counted, expect_error, server  # noqa: E402

BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def lm(folders) -> Iterator[Running]:
    with server(folders["lm"], folders["lm_adapters"], max_batch=8, max_queue=4, max_wait_ms=5, max_tokens=8,
                max_body_bytes=BODY_LIMIT) as running:
        yield running


@pytest.fixture(scope="module")
def cls(folders) -> Iterator[Running]:
    with server(folders["cls"], folders["cls_runs"], max_batch=8, max_wait_ms=5) as running:
        yield running


def _deep(depth: int) -> bytes:
    return b'{"model": "ad0", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body,words", [
    (b'{"model": "ad0", "prompt": "\\ud800 the cat"}', ["prompt: not valid Unicode text", "lone surrogate"]),
    (b'{"model": "ad0", "prompt": ["the cat", "a \\udfff"]}', ["prompt[1]: not valid Unicode text"]),
    (b'{"model": "\\ud800"}', ["model: not valid Unicode text"]),
    (b'{"\\ud800": 1}', ["a key in the body: not valid Unicode text"]),
    (_deep(100_000)[:BODY_LIMIT - 10], ["malformed JSON"]),  # cut to fit the limit: still far past any parser depth
    (b'{"model": "ad0", "prompt": "a", "temperature": NaN}', ["NaN is not a JSON number"]),
    (b'{"model": "ad0", "prompt": "a", "temperature": 1e999}', ["temperature", "finite"]),
])
def test_bad_bodies_are_400_counted_and_keep_the_connection(lm, body, words) -> None:
    before = counted(lm.url, "/v1/completions", 400)
    connection = Connection(lm.url)
    status, answer = connection.request("POST", "/v1/completions", body)
    assert status == 400 and answer["error"]["code"] == 400, answer
    assert all(w in answer["error"]["message"] for w in words), answer
    status, again = connection.request("POST", "/v1/completions", b'{"model": "ad0", "prompt": "the cat"}')
    assert status == 200 and again["choices"][0]["finish_reason"] in ("stop", "length")  # same connection
    connection.close()
    assert counted(lm.url, "/v1/completions", 400) == before + 1


def test_json_nested_past_any_parser_depth_is_a_400(folders) -> None:
    """100k levels, as the reviewer sent it (the body limit raised to let it in)."""
    with server(folders["lm"], folders["lm_adapters"], max_body_bytes=1 << 20) as running:
        connection = Connection(running.url)
        status, answer = connection.request("POST", "/v1/completions", _deep(100_000))
        assert status == 400 and "nested too deeply" in answer["error"]["message"]
        assert connection.request("GET", "/health")[0] == 200
        assert counted(running.url, "/v1/completions", 400) == 1


def test_an_adapter_json_that_is_not_an_object(lm, folders, capsys) -> None:
    """POSTed to /v1/adapters it is a 400 naming the file; at start-up it is one error line, not a traceback."""
    listy = folders["lm_adapters"] / "listy"
    shutil.copytree(folders["lm_adapters"] / "ad0", listy)
    (listy / "adapter.json").write_text("[1, 2, 3]")
    try:
        connection = Connection(lm.url)
        status, answer = connection.request("POST", "/v1/adapters", b'{"name": "listy"}')
        assert status == 400 and "listy/adapter.json" in answer["error"]["message"], answer
        assert connection.request("GET", "/health")[0] == 200
        assert counted(lm.url, "/v1/adapters", 400) >= 1
        from adapterkit.cli.main import main

        assert main(["serve", "--model", str(folders["lm"]), "--adapters", str(folders["lm_adapters"])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "listy/adapter.json" in err[0], err
    finally:
        shutil.rmtree(listy)


def test_an_unexpected_fault_is_a_logged_500_counted_on_a_kept_connection(lm, caplog) -> None:
    runner = lm.server.config.app.state.runner

    def broken(text: str) -> tuple[int, ...]:
        raise RuntimeError("tokenizer fell over\nsecond line")

    before = counted(lm.url, "/v1/completions", 500)
    runner.encode = broken  # an instance attribute: deleted below, the class's method serves again
    try:
        connection = Connection(lm.url)
        status, answer = connection.request("POST", "/v1/completions", b'{"model": "ad0", "prompt": "the cat"}')
    finally:
        del runner.encode
    assert status == 500 and answer["error"] == {"message": "internal error: RuntimeError: tokenizer fell over",
                                                 "type": "server_error", "code": 500}
    assert connection.request("GET", "/health")[0] == 200  # the same connection still works
    assert counted(lm.url, "/v1/completions", 500) == before + 1
    assert any("tokenizer fell over" in r.getMessage() or (r.exc_info and "tokenizer fell over" in str(r.exc_info[1]))
               for r in caplog.records)


def _chunked_head(path: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _answer(sock: socket.socket) -> bytes:
    """Bytes received until the server closes or a full answer's head and some body arrived (bounded)."""
    data, deadline = b"", time.monotonic() + LIMIT
    while time.monotonic() < deadline and b"}}" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def test_a_chunked_body_is_refused_once_past_the_limit_not_after_it_ends(lm) -> None:
    """The client sends more than the limit in chunks and then nothing (no final chunk): the 413 must come without
    the rest of the body, which a server that reads the whole body first would wait for until the client gives up."""
    host, port = lm.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=LIMIT) as sock:
        sock.sendall(_chunked_head("/v1/completions") + b"".join(_chunk(b" " * 1024) for _ in range(5)))
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"exceeds the limit of 4096 bytes" in answer
    with socket.create_connection((host, int(port)), timeout=LIMIT) as sock:  # under the limit, chunked works
        body = json.dumps({"model": "ad1", "prompt": "the cat", "max_tokens": 2}).encode()
        sock.sendall(_chunked_head("/v1/completions") + _chunk(body[:10]) + _chunk(body[10:]) + b"0\r\n\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_more_rows_than_the_queue_holds_is_413_not_503(lm) -> None:
    response = httpx.post(f"{lm.url}/v1/completions", json={"model": "ad0", "prompt": ["the cat"] * 5},
                          timeout=LIMIT)
    expect_error(response, 413, "5 items", "the queue holds at most 4 rows")
    assert "retry-after" not in response.headers  # retrying can never help
    ok = httpx.post(f"{lm.url}/v1/completions", json={"model": "ad0", "prompt": ["the cat"] * 4}, timeout=LIMIT)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_a_missing_adapter_folder_is_404_and_a_second_load_409(lm, folders) -> None:
    expect_error(httpx.post(f"{lm.url}/v1/adapters", json={"name": "nowhere"}, timeout=LIMIT), 404,
                 "nowhere: no such adapter folder")
    expect_error(httpx.post(f"{lm.url}/v1/adapters", json={"name": "ad3"}, timeout=LIMIT), 409,
                 "'ad3' is already loaded")
    assert counted(lm.url, "/v1/adapters", 404) == 1 and counted(lm.url, "/v1/adapters", 409) == 1

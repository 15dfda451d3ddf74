"""The HTTP server on a real uvicorn stack at 127.0.0.1 (ephemeral ports, background threads), bounded in time.

The load test sends 32 concurrent clients over 8 adapters and checks every answer against the same request served
alone; the error tests cover malformed JSON, oversized inputs, unknown and invalid adapter names, a full queue and
a timeout (both made deterministic by blocking the batch worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from adapterkit.serve.runners import Row  # noqa: E402
from adapterkit.serve.server import Running  # noqa: E402
from tests.serve.client import LIMIT, server  # noqa: E402
from tests.serve.client import expect_error as _error  # noqa: E402
from tests.serve.fixtures import ADAPTERS, WORDS  # noqa: E402


def _post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=LIMIT, **kwargs)


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=LIMIT)


def _delete(url: str) -> httpx.Response:
    return httpx.delete(url, timeout=LIMIT)


@pytest.fixture(scope="module")
def lm(folders) -> Iterator[Running]:
    with server(folders["lm"], folders["lm_adapters"], max_resident=ADAPTERS, max_batch=16, max_wait_ms=20,
                max_input_tokens=40, max_tokens=12, max_body_bytes=4096) as running:
        yield running


def _prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(2 + i % 6))


async def _load(url: str, clients: int, requests_each: int) -> tuple[list[tuple[dict, int, dict]], float]:
    async def client(c: int, http: httpx.AsyncClient) -> list[tuple[dict, int, dict]]:
        out = []
        for k in range(requests_each):
            i = c * requests_each + k
            body = {"model": f"ad{i % ADAPTERS}" if i % 9 else "base", "prompt": _prompt(i), "max_tokens": 3 + i % 6}
            response = await http.post(f"{url}/v1/completions", json=body)
            out.append((body, response.status_code, response.json()))
        return out

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as http:
        done = await asyncio.gather(*(client(c, http) for c in range(clients)))
    return [r for each in done for r in each], time.perf_counter() - start


def test_load_32_clients_8_adapters_equal_to_each_request_alone(lm) -> None:
    app = lm.server.config.app
    runner, metrics = app.state.runner, app.state.metrics
    batches_before, rows_before = metrics.batch_size.count, metrics.batch_size.total
    results, batched_s = asyncio.run(_load(lm.url, clients=32, requests_each=2))
    assert [status for _, status, _ in results] == [200] * 64, [r for r in results if r[1] != 200][:2]
    batches = metrics.batch_size.count - batches_before  # model calls: decode steps of the running batch
    assert (metrics.batch_size.total - rows_before) / batches > 2, "requests hardly ever shared a decode step"
    start = time.perf_counter()
    for body, _, answer in results:  # the reference: the same request run alone, through the same code
        adapter = None if body["model"] == "base" else body["model"]
        alone = runner([Row(adapter, runner.encode(body["prompt"]), body["max_tokens"])])[0]
        choice = answer["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (alone["text"], alone["finish_reason"]), body
        assert answer["usage"]["completion_tokens"] == alone["completion_tokens"]
        assert answer["object"] == "text_completion" and answer["model"] == body["model"]
    alone_s = time.perf_counter() - start
    texts = {answer["choices"][0]["text"] for _, _, answer in results}
    assert len(texts) > 8  # adapters and prompts really change the answers
    print(f"\n64 requests: {64 / batched_s:.1f} req/s batched over HTTP ({batches} batches), "
          f"{64 / alone_s:.1f} req/s one at a time in-process (no HTTP)")


def test_classify_mixed_heads_over_http(folders) -> None:
    with server(folders["cls"], folders["cls_runs"], max_resident=ADAPTERS, max_batch=8, max_wait_ms=20) as running:
        runner = running.server.config.app.state.runner
        texts = ["the cat sat", "a very good film", "hello world", "bad bad bad", "one two", "yes no yes"]

        async def go() -> list[dict]:
            async with httpx.AsyncClient(timeout=30) as http:
                calls = [http.post(f"{running.url}/v1/classify", json={"model": f"cls{i % 3}", "input": text})
                         for i, text in enumerate(texts)]
                calls.append(http.post(f"{running.url}/v1/classify", json={"model": "cls1", "input": texts}))
                return [r.json() for r in await asyncio.gather(*calls)]

        answers = asyncio.run(go())
        for i, text in enumerate(texts):
            alone = runner([Row(f"cls{i % 3}", runner.encode(text))])[0]
            got = answers[i]["data"][0]
            assert got["label"] == alone["label"]
            assert got["probabilities"].keys() == alone["probabilities"].keys()
            for key, p in alone["probabilities"].items():
                assert abs(got["probabilities"][key] - p) < 1e-5
            listed = answers[-1]["data"][i]["probabilities"]
            assert len(listed) == 4 and all(k.startswith("cls1_label") for k in listed)
        assert len(answers[0]["data"][0]["probabilities"]) == 2
        response = _post(f"{running.url}/v1/completions", json={"model": "cls0", "prompt": "a"})
        assert response.status_code == 400 and "/v1/classify" in response.json()["error"]["message"]
        # the tiny BERT has 64 positions: a longer input is refused (413), not truncated or crashed on
        _error(_post(f"{running.url}/v1/classify", json={"model": "cls0", "input": ["a", "cat " * 64]}), 413,
               "input[1]: 65 tokens", "at most 64")
        _error(_post(f"{running.url}/v1/classify", json={"model": "cls0", "input": []}), 400, "empty")


def test_bad_requests_get_4xx_with_json_errors(lm) -> None:
    url = f"{lm.url}/v1/completions"
    headers = {"content-type": "application/json"}
    _error(_post(url, content=b'{"model": "ad0", "prompt": ', headers=headers), 400, "malformed JSON", "line 1")
    _error(_post(url, content=b"\xff\xfe", headers=headers), 400, "malformed JSON")
    _error(_post(url, json=["ad0"]), 400, "JSON object")
    _error(_post(url, json={"model": "ad0"}), 400, "prompt")
    _error(_post(url, json={"model": "ad0", "prompt": "a", "max_tokens": "many"}), 400, "max_tokens")
    _error(_post(url, json={"model": "ad0", "prompt": "a", "top_k": 5}), 400, "top_k")
    _error(_post(url, json={"model": "ad0", "prompt": "a", "max_tokens": 13}), 400, "at most 12")
    _error(_post(url, json={"model": "ad0", "prompt": "a", "temperature": -0.5}), 400, "temperature")
    _error(_post(url, json={"model": "ad0", "prompt": "a", "stream_options": {"include_usage": True}}), 400,
           "stream_options", "stream=true")
    # oversized: too many tokens, too large a body, too many prompts in one request (413, as documented)
    _error(_post(url, json={"model": "ad0", "prompt": "cat " * 41}), 413, "41 tokens", "at most 40")
    _error(_post(url, json={"model": "ad0", "prompt": "x" * 5000}), 413, "exceeds the limit of 4096")
    _error(_post(url, json={"model": "ad0", "prompt": ["a"] * 17}), 413, "17 items")
    # adapters: unknown 404, invalid names (path traversal included) 400
    _error(_post(url, json={"model": "nope", "prompt": "a"}), 404, "'nope' is not loaded")
    for bad in ("../ad0", "ad0/../../etc", "..", "a.b", "/etc/passwd"):
        _error(_post(url, json={"model": bad, "prompt": "a"}), 400, "invalid")
        _error(_post(f"{lm.url}/v1/adapters", json={"name": bad}), 400, "invalid")
    _error(_delete(f"{lm.url}/v1/adapters/..%2Fad0"), 400, "invalid")
    _error(_get(f"{lm.url}/v1/nothing"), 404)
    _error(_post(f"{lm.url}/v1/classify", json={"model": "ad0", "input": "a"}), 400, "/v1/completions")
    ok = _post(url, json={"model": "ad3", "prompt": ["the cat", "a dog ran"], "max_tokens": 2})
    assert ok.status_code == 200 and [c["index"] for c in ok.json()["choices"]] == [0, 1]


def test_list_load_unload_health_metrics(lm, folders) -> None:
    shutil.copytree(folders["lm_adapters"] / "ad5", folders["lm_adapters"] / "late")
    listed = _get(f"{lm.url}/v1/adapters").json()
    assert [row["id"] for row in listed["data"]] == ["base", *[f"ad{i}" for i in range(ADAPTERS)]]
    assert listed["available"] == ["late"]
    body = {"model": "late", "prompt": "the red cat", "max_tokens": 4}
    _error(_post(f"{lm.url}/v1/completions", json=body), 404)
    assert _post(f"{lm.url}/v1/adapters", json={"name": "late"}).json()["loaded"] == "late"
    _error(_post(f"{lm.url}/v1/adapters", json={"name": "late"}), 409, "already loaded")
    late = _post(f"{lm.url}/v1/completions", json=body).json()["choices"][0]["text"]
    same = _post(f"{lm.url}/v1/completions", json={**body, "model": "ad5"}).json()["choices"][0]["text"]
    assert late == same  # a copy of ad5's folder answers as ad5 does
    assert _delete(f"{lm.url}/v1/adapters/late").json()["unloaded"] == "late"
    _error(_post(f"{lm.url}/v1/completions", json=body), 404)
    _error(_delete(f"{lm.url}/v1/adapters/late"), 404)
    _error(_post(f"{lm.url}/v1/adapters", json={"name": "missing"}), 404, "missing: no such adapter folder")
    (folders["lm_adapters"] / "junk").mkdir()  # a folder, but no adapter in it: a bad request, not a missing one
    _error(_post(f"{lm.url}/v1/adapters", json={"name": "junk"}), 400, "not an adapter folder")
    (folders["lm_adapters"] / "junk").rmdir()
    assert (folders["lm_adapters"] / "late" / "adapter.json").is_file()
    health = _get(f"{lm.url}/health").json()
    assert health["status"] == "ok" and health["task"] == "completions" and health["adapters_loaded"] == ADAPTERS
    text = _get(f"{lm.url}/metrics").text
    assert 'adapterkit_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'adapterkit_requests_total{endpoint="/v1/completions",status="404"}' in text
    assert f"adapterkit_adapters_loaded {ADAPTERS}" in text and "adapterkit_queue_depth 0" in text
    assert 'adapterkit_request_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    count = int(next(line.split()[-1] for line in text.splitlines() if line.startswith("adapterkit_batch_size_count")))
    assert count >= 1


def _blocked(running: Running) -> tuple[threading.Event, threading.Event]:
    """Make the batch worker wait on ``release`` (``entered`` is set once a batch is held)."""
    batcher = running.server.config.app.state.batcher
    entered, release = threading.Event(), threading.Event()
    run = batcher.run

    def held(rows):
        entered.set()
        release.wait(30)
        return run(rows)

    batcher.run = held
    return entered, release


def test_full_queue_answers_503_and_timeouts_504(folders) -> None:
    with server(folders["lm"], folders["lm_adapters"], max_resident=ADAPTERS, max_batch=1, max_queue=1,
                max_wait_ms=0, timeout_s=2.0) as running:
        entered, release = _blocked(running)
        batcher = running.server.config.app.state.batcher
        body = {"model": "ad1", "prompt": "the cat", "max_tokens": 2}

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as http:
                held = asyncio.create_task(http.post(f"{running.url}/v1/completions", json=body))
                while not entered.is_set():  # the first request is running (blocked): the queue is empty
                    await asyncio.sleep(0.01)
                queued = asyncio.create_task(http.post(f"{running.url}/v1/completions", json=body))
                while batcher.depth < 1:  # the second waits in the queue, which is now full
                    await asyncio.sleep(0.01)
                full = await http.post(f"{running.url}/v1/completions", json=body)
                timed_out = await queued  # stuck behind the blocked batch past timeout_s
                release.set()
                return [await held, full, timed_out]

        first, full, timed_out = asyncio.run(go())
        _error(full, 503, "queue")
        assert full.headers["retry-after"] == "1"  # busy for now: when to try again
        _error(timed_out, 504, "timed out after 2 s")
        assert first.status_code == 504  # it too waited past the timeout
        assert _post(f"{running.url}/v1/completions", json=body).status_code == 200  # the server recovered
        text = _get(f"{running.url}/metrics").text
        assert 'status="503"' in text and 'status="504"' in text


def test_cli_serve_starts_and_answers(folders) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    process = subprocess.Popen([sys.executable, "-m", "adapterkit.cli.main", "serve", "--model", str(folders["lm"]),
                                "--adapters", str(folders["lm_adapters"]), "--port", str(port), "--max-batch", "4",
                                "--threads", "1"],
                               env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120  # a fresh interpreter imports torch and transformers first
        health = None
        while health is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                health = _get(f"http://127.0.0.1:{port}/health").json()
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            time.sleep(0.1)
        assert health is not None and health["threads"] == 1  # --threads set torch's intra-op thread count
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                            json={"model": "ad2", "prompt": "the cat", "max_tokens": 3}).json()
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        process.terminate()
        process.wait(timeout=20)

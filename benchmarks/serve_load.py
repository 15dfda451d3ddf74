"""`adapterkit serve` under load: requests/s with dynamic batching vs one request at a time (max batch 1).

Starts the server in-process on 127.0.0.1 (uvicorn in a thread) with a random Llama (word-level tokenizer) and K
LoRA adapters of mixed ranks and targets, then runs N concurrent HTTP clients, each sending R completion requests
for adapters chosen round-robin. The same load runs against a server with ``--max-batch`` and against one with max
batch 1, alternating, ``--repeats`` times each; the answers of both must agree exactly. Prints requests/s of both
and their ratio.

    PYTHONPATH=src python benchmarks/serve_load.py --clients 32 --adapters 8 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test fixtures build the model folders

os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def _load(url: str, clients: int, requests: int, adapters: int, max_tokens: int) -> tuple[float, list[str]]:
    import httpx
    from tests.serve.fixtures import WORDS

    async def client(c: int, http: httpx.AsyncClient) -> list[str]:
        texts = []
        for k in range(requests):
            i = c * requests + k
            prompt = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 8))
            body = {"model": f"ad{i % adapters}", "prompt": prompt, "max_tokens": max_tokens}
            response = await http.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            texts.append(response.json()["choices"][0]["text"])
        return texts

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        done = await asyncio.gather(*(client(c, http) for c in range(clients)))
    return time.perf_counter() - start, [t for each in done for t in each]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from tests.serve.fixtures import causal_adapters, causal_dir

    from adapterkit.serve.app import ServeConfig
    from adapterkit.serve.server import build_app, start_in_thread

    root = Path(tempfile.mkdtemp(prefix="serve_load_"))
    causal_dir(root / "model", hidden=args.hidden, layers=args.layers)
    causal_adapters(root / "model", root / "adapters", args.adapters)
    total = args.clients * args.requests
    servers = {}
    for label, batch in (("batched", args.max_batch), ("one at a time", 1)):
        config = ServeConfig(max_batch=batch, max_wait_ms=args.max_wait_ms, max_queue=4 * total, timeout_s=600)
        app = build_app(root / "model", root / "adapters", max_resident=args.adapters, config=config)
        servers[label] = start_in_thread(app)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama hidden {args.hidden} x "
          f"{args.layers} layers; {args.adapters} LoRA adapters; {args.clients} clients x {args.requests} requests, "
          f"max_tokens {args.max_tokens}, max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms")
    rates: dict[str, list[float]] = {label: [] for label in servers}
    answers: dict[str, list[str]] = {}
    try:
        for running in servers.values():  # warm-up: first calls pay one-off costs
            asyncio.run(_load(running.url, 2, 1, args.adapters, args.max_tokens))
        for _ in range(args.repeats):
            for label, running in servers.items():
                seconds, texts = asyncio.run(_load(running.url, args.clients, args.requests, args.adapters,
                                                   args.max_tokens))
                rates[label].append(total / seconds)
                answers.setdefault(label, texts)
                batches = running.server.config.app.state.metrics.batch_size
                print(f"  {label:<14} {total / seconds:7.1f} req/s  ({seconds:.2f} s; mean batch so far "
                      f"{batches.total / max(batches.count, 1):.1f})")
    finally:
        for running in servers.values():
            running.stop()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    assert answers["batched"] == answers["one at a time"], "batched answers differ from one-at-a-time answers"
    batched, single = statistics.median(rates["batched"]), statistics.median(rates["one at a time"])
    print(f"median: batched {batched:.1f} req/s, one at a time {single:.1f} req/s, ratio {batched / single:.2f}x "
          f"(all {total} answers identical in both modes)")


if __name__ == "__main__":
    main()

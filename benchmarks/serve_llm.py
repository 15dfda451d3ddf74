"""Serving SmolLM2-135M-Instruct with many LoRA adapters: continuous batching vs request-level batching vs peft.

K LoRA adapters (rank r on the 7 projections q/k/v/o/gate/up/down, random non-zero weights) on SmolLM2; N
concurrent clients each send R chat requests (adapter round-robin, max_tokens drawn from a range with a fixed
seed, greedy), all at once. Three ways to serve the same requests:

(a) adapterkit's server, continuous batching (rows join and leave the running batch at every decode step);
(b) adapterkit's server, request-level batching (a batch runs to its longest row before the next one forms);
(c) peft in a loop: batches of up to --max-batch requests in arrival order, each one
    ``model.generate(..., adapter_names=[...])`` (peft's mixed-adapter batch) to the batch's longest max_tokens.

For each: completion tokens/s (wall clock, all requests), p50 / p99 latency from the moment all requests were
sent, overall and for the short requests (max_tokens <= --short); and wrong answers: every greedy answer must equal
that request generated alone (transformers' generate, one adapter, no padding). (a) and (b) go through HTTP with
the official ``openai`` client; (c) has no HTTP at all.

    PYTHONPATH=src:. python benchmarks/serve_llm.py --clients 32 --adapters 8 --max-tokens-range 4 64 --json out.json
    OMP_NUM_THREADS=1 PYTHONPATH=src:. python benchmarks/serve_llm.py --clients 4 --max-tokens-range 2 6  # check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a CPU does.",
             "Name three fruits.", "How do plants make food?", "Tell me a short joke.", "What is 12 times 7?",
             "Describe the sea in one sentence.", "Why is the sky blue?", "Give a tip for learning to code."]
END = 2  # SmolLM2's <|im_end|>: end of text and padding


@dataclass
class Ask:
    """One request: its adapter, chat question, token ids (chat template applied) and max_tokens."""

    adapter: str
    question: str
    ids: list[int]
    max_tokens: int


def _adapters(root: Path, count: int, rank: int, seed: int) -> None:
    """``count`` LoRA adapters on every projection, random non-zero A and B, saved with ak.save and in peft's
    format (``root/ak/NAME``, ``root/peft/NAME``)."""
    import torch

    import adapterkit as ak
    from adapterkit.inject.engine import placements
    from adapterkit.interop.peft_format import export_peft
    from adapterkit.models import load_pretrained

    model, _ = load_pretrained("smollm2")
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        name = f"lora{i}"
        ak.attach(model, name, ak.LoRA(r=rank, alpha=2 * rank), PROJECTIONS)
        with torch.no_grad():
            for _, _, host in placements(model, name):
                for param in host.adapter(name).parameters():  # B starts at zero: both factors get weights
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        ak.save(model, root / "ak" / name, name)
        export_peft(model, name, root / "peft" / name)
        ak.detach(model, name)


def _asks(tokenizer: Any, args: argparse.Namespace) -> list[Ask]:
    rng = random.Random(args.seed)
    low, high = args.max_tokens_range
    asks = []
    for i in range(args.clients * args.requests):
        question = QUESTIONS[i % len(QUESTIONS)]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        asks.append(Ask(f"lora{i % args.adapters}", question, list(ids), rng.randint(low, high)))
    return asks


def _cut(tokens: list[int], limit: int) -> list[int]:
    tokens = tokens[:limit]
    return tokens[:tokens.index(END)] if END in tokens else tokens


def _alone(root: Path, asks: list[Ask]) -> list[list[int]]:
    """The reference: each request generated alone through its adapter (transformers' generate, no padding)."""
    import torch

    import adapterkit as ak
    from adapterkit.models import load_pretrained

    model, _ = load_pretrained("smollm2")
    for name in sorted({a.adapter for a in asks}):
        ak.load(model, root / "ak" / name)
    out = []
    with torch.no_grad():
        for ask in asks:
            with ak.use(model, ask.adapter):
                ids = torch.tensor([ask.ids])
                tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=ask.max_tokens, do_sample=False, pad_token_id=END,
                                        eos_token_id=END)
            out.append(_cut(tokens[0, len(ask.ids):].tolist(), ask.max_tokens))
    return out


async def _clients(url: str, asks: list[Ask], clients: int) -> tuple[float, list[float], list[tuple[str, int]]]:
    """(wall seconds, per-request latency, (text, completion tokens)) of ``clients`` concurrent openai clients
    sending their share of ``asks`` in turn, all starting at once."""
    import openai

    latency: list[float] = [0.0] * len(asks)
    answers: list[tuple[str, int]] = [("", 0)] * len(asks)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0)
    start = time.perf_counter()

    async def one(c: int) -> None:
        for i in range(c, len(asks), clients):
            ask = asks[i]
            reply = await client.chat.completions.create(model=ask.adapter, max_tokens=ask.max_tokens,
                                                         messages=[{"role": "user", "content": ask.question}])
            latency[i] = time.perf_counter() - start
            answers[i] = (reply.choices[0].message.content or "", reply.usage.completion_tokens)

    async with client:
        await asyncio.gather(*(one(c) for c in range(clients)))
    return time.perf_counter() - start, latency, answers


def _server_run(root: Path, asks: list[Ask], args: argparse.Namespace, batching: str) -> dict[str, Any]:
    from adapterkit.serve.app import ServeConfig
    from adapterkit.serve.server import build_app, start_in_thread

    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * len(asks),
                         timeout_s=3600, max_tokens=args.max_tokens_range[1], batching=batching)
    app = build_app("smollm2", root / "ak", max_resident=args.adapters, config=config)
    running = start_in_thread(app)
    try:
        asyncio.run(_clients(running.url, asks[:2], 2))  # warm-up: one-off costs of the first calls
        seconds, latency, answers = asyncio.run(_clients(running.url, asks, args.clients))
        steps = app.state.metrics.batch_size
        mean_batch = steps.total / max(steps.count, 1)
    finally:
        running.stop()
    return {"seconds": seconds, "latency": latency, "texts": [a[0] for a in answers],
            "tokens": [a[1] for a in answers], "mean_rows_per_model_call": mean_batch}


def _peft_run(root: Path, asks: list[Ask], args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from adapterkit.models import load_pretrained

    base, _ = load_pretrained("smollm2")
    names = sorted({a.adapter for a in asks})
    model = PeftModel.from_pretrained(base, str(root / "peft" / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(root / "peft" / name), adapter_name=name)
    model.eval()

    def batch_generate(batch: list[Ask]) -> list[list[int]]:
        width = max(len(a.ids) for a in batch)
        ids = torch.tensor([[END] * (width - len(a.ids)) + a.ids for a in batch])
        mask = torch.tensor([[0] * (width - len(a.ids)) + [1] * len(a.ids) for a in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=[a.adapter for a in batch],
                                 max_new_tokens=max(a.max_tokens for a in batch), do_sample=False,
                                 pad_token_id=END, eos_token_id=END)
        return [_cut(out[b, width:].tolist(), a.max_tokens) for b, a in enumerate(batch)]

    batch_generate(asks[:2])  # warm-up
    latency: list[float] = [0.0] * len(asks)
    tokens: list[list[int]] = [[] for _ in asks]
    start = time.perf_counter()
    for first in range(0, len(asks), args.max_batch):
        chunk = list(range(first, min(first + args.max_batch, len(asks))))
        for i, got in zip(chunk, batch_generate([asks[i] for i in chunk])):
            tokens[i], latency[i] = got, time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "latency": latency, "tokens": [len(t) for t in tokens],
            "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in tokens], "token_ids": tokens}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _summary(run: dict[str, Any], asks: list[Ask], reference: list[str], short: int) -> dict[str, Any]:
    shorts = [run["latency"][i] for i, a in enumerate(asks) if a.max_tokens <= short] or [float("nan")]
    wrong = [i for i, text in enumerate(run["texts"]) if text != reference[i]]
    return {"tokens_per_s": sum(run["tokens"]) / run["seconds"], "seconds": run["seconds"],
            "completion_tokens": sum(run["tokens"]),
            "p50_s": _percentile(run["latency"], 50), "p99_s": _percentile(run["latency"], 99),
            "short_p50_s": _percentile(shorts, 50), "short_p99_s": _percentile(shorts, 99),
            "short_requests": len(shorts) if shorts[0] == shorts[0] else 0, "wrong_answers": len(wrong),
            "wrong_examples": wrong[:5],
            **({"mean_rows_per_model_call": run["mean_rows_per_model_call"]}
               if "mean_rows_per_model_call" in run else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=1, help="requests per client, in turn (default 1)")
    parser.add_argument("--adapters", type=int, default=8, help="LoRA adapters, round-robin (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--max-tokens-range", type=int, nargs=2, default=(4, 64), metavar=("LOW", "HIGH"),
                        help="max_tokens of each request, uniform in [LOW, HIGH] (default 4 64)")
    parser.add_argument("--short", type=int, default=16, help="requests with max_tokens <= this are short")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per model call, all modes (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapters' weights and the max_tokens")
    parser.add_argument("--modes", default="continuous,request,peft", help="comma-separated subset to run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    low, high = args.max_tokens_range
    if not 1 <= low <= high:
        parser.error(f"--max-tokens-range: need 1 <= LOW <= HIGH, got {low} {high}")
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - {"continuous", "request", "peft"}:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}")

    import torch

    from adapterkit.core.files import atomic_write
    from adapterkit.models import load_pretrained

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="serve_llm_"))
    _adapters(root, args.adapters, args.rank, args.seed)
    _, tokenizer = load_pretrained("smollm2")
    asks = _asks(tokenizer, args)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M-Instruct, {args.adapters} LoRA r={args.rank} on "
          f"{len(PROJECTIONS)} projections; {args.clients} clients x {args.requests}, max_tokens {low}-{high}, "
          f"max batch {args.max_batch}", flush=True)
    reference = [tokenizer.decode(t, skip_special_tokens=True) for t in _alone(root, asks)]
    results: dict[str, Any] = {}
    for mode in modes:
        run = _peft_run(root, asks, args, tokenizer) if mode == "peft" else _server_run(root, asks, args, mode)
        results[mode] = _summary(run, asks, reference, args.short)
        r = results[mode]
        print(f"  {mode:<10} {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:.2f} s  p99 {r['p99_s']:.2f} s  "
              f"short p50 {r['short_p50_s']:.2f} s  p99 {r['short_p99_s']:.2f} s  wrong {r['wrong_answers']}"
              f"/{len(asks)}", flush=True)
    if "continuous" in results:
        for other in ("request", "peft"):
            if other in results:
                print(f"continuous / {other}: throughput {results['continuous']['tokens_per_s'] / results[other]['tokens_per_s']:.2f}x, "  # noqa: E501
                      f"short p50 latency {results['continuous']['short_p50_s'] / results[other]['short_p50_s']:.2f}x")  # noqa: E501
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json is not None:
        record = {"args": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
                  "requests": [{"adapter": a.adapter, "max_tokens": a.max_tokens, "prompt_tokens": len(a.ids)}
                               for a in asks], "results": results, "torch_threads": torch.get_num_threads()}
        atomic_write(args.json, json.dumps(record, indent=2).encode())
    if any(r["wrong_answers"] for r in results.values()):
        sys.exit("some answers differ from the same request run alone")


if __name__ == "__main__":
    main()

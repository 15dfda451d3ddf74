"""The options of `adapterkit serve` (parsed without importing torch or the server)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``serve`` sub-command's options."""
    serve = sub.add_parser("serve", help="HTTP server: many adapters on one model, requests batched together",
                           description="Serve a model and every adapter folder under --adapters over HTTP "
                                       "(needs the serve extra: pip install 'adapterkit[serve]'). Causal LMs get "
                                       "OpenAI's POST /v1/completions and POST /v1/chat/completions (the request's "
                                       "model field names the adapter, 'base' for none; temperature, top_p, seed, "
                                       "stop, stream), batched continuously; classifiers POST /v1/classify; also "
                                       "GET /v1/models, GET/POST /v1/adapters, DELETE /v1/adapters/NAME, /health, "
                                       "/metrics.")
    serve.add_argument("--model", required=True, metavar="MODEL",
                       help="a known model name (e.g. smollm2), a Hugging Face model folder (with tokenizer) or a "
                            ".gguf file")
    serve.add_argument("--adapters", default=None, metavar="DIR",
                       help="folder of adapter folders (ak.save) or run folders (adapterkit train); the folder "
                            "name is the adapter's name")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, metavar="N", help="port (default 8000)")
    serve.add_argument("--task", choices=["auto", "completions", "classify"], default="auto",
                       help="what the model serves (default: completions for a causal LM, else classify)")
    serve.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    serve.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch intra-op threads (default: torch's, one per core); on cores that other processes "
                            "share, fewer threads answer faster")
    group = serve.add_argument_group("batching and limits")
    group.add_argument("--batching", choices=["continuous", "request"], default="continuous",
                       help="causal LMs: continuous (requests join and leave the running batch at every decode "
                            "step; the default) or request (a batch runs to its longest request before the next "
                            "forms)")
    group.add_argument("--max-batch", type=int, default=16, metavar="N",
                       help="rows per model call (the running batch, for continuous batching; default 16)")
    group.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                       help="how long a row waits for others to join its batch while none runs (default 5)")
    group.add_argument("--max-queue", type=int, default=256, metavar="N",
                       help="rows waiting at most; beyond it requests get 503 (default 256)")
    group.add_argument("--timeout-s", type=float, default=60.0, metavar="S",
                       help="per-request limit; beyond it the answer is 504 (default 60)")
    group.add_argument("--max-resident", type=int, default=8, metavar="N",
                       help="adapters attached to the model at once; the others wait in host memory (default 8)")
    group.add_argument("--max-input-tokens", type=int, default=512, metavar="N",
                       help="tokens per prompt or input text; longer ones get 413 (default 512)")
    group.add_argument("--max-tokens", type=int, default=256, metavar="N",
                       help="largest max_tokens a completion may ask for (default 256)")

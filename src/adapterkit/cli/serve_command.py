"""``adapterkit serve``: check the options, then run the HTTP server (the serve extra: FastAPI + uvicorn)."""

from __future__ import annotations

import argparse

from adapterkit.core.errors import AdapterKitError


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; every bad option is one error line before anything loads."""
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-resident", args.max_resident), ("--max-input-tokens", args.max_input_tokens),
                        ("--max-tokens", args.max_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise AdapterKitError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise AdapterKitError(f"--port must be in 0..65535, got {args.port}")
    if args.max_wait_ms < 0:
        raise AdapterKitError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms:g}")
    if not args.timeout_s > 0:
        raise AdapterKitError(f"--timeout-s must be > 0, got {args.timeout_s:g}")
    try:
        from adapterkit.serve.app import ServeConfig
        from adapterkit.serve.server import serve
    except ImportError as exc:
        raise AdapterKitError(f"serve needs fastapi and uvicorn ({exc.name} is missing): "
                              "pip install 'adapterkit[serve]'") from None
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         timeout_s=args.timeout_s, max_input_tokens=args.max_input_tokens, max_tokens=args.max_tokens,
                         batching=args.batching)
    serve(args.model, args.adapters, host=args.host, port=args.port, task=args.task, device=args.device,
          max_resident=args.max_resident, config=config, threads=args.threads)
    return 0

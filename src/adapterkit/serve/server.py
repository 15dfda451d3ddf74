"""Build a server from folders (model, adapters) and run it with uvicorn: what ``adapterkit serve`` calls."""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.store import AdapterStore

TASKS = ("auto", "completions", "classify")


def load_model(model: str | Path, task: str = "auto", device: str = "cpu") -> tuple[str, Any, Any]:
    """(task, model in eval mode on ``device``, tokenizer) for a known model name (``smollm2``), a Hugging Face
    model folder or a ``.gguf`` file, through ``adapterkit.models.load_pretrained``. The task follows the model
    ("completions" for a causal LM, else "classify") unless given."""
    from adapterkit.models import is_causal_lm, load_pretrained, resolve

    if task not in TASKS:
        raise AdapterKitError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        folder = resolve(model)
    except AdapterKitError as exc:
        raise type(exc)(f"--model {exc}") from None
    if task == "auto":
        task = "completions" if is_causal_lm(folder) else "classify"
    # a classifier keeps the head its config describes; a base folder without one gets a fresh head (each adapter
    # brings its own), which load_pretrained keeps quiet about
    # the resolved folder, not the name: a GGUF's cache was checked (sha256 of every file) by ``resolve`` already
    loaded, tokenizer = load_pretrained(folder, task="causal-lm" if task == "completions" else "classify",
                                        num_labels=_labels_of(folder), where=f"--model {model}:")
    try:
        loaded = loaded.to(device).eval()
    except (RuntimeError, ValueError) as exc:
        raise AdapterKitError(f"--device {device}: cannot move the model there ({str(exc).splitlines()[0]})") \
            from None
    return task, loaded, tokenizer


def _labels_of(folder: Path) -> int:
    try:
        config = json.loads(Path(folder, "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterKitError(f"--model {folder}/config.json: unreadable ({exc})") from None
    labels = config.get("id2label") if isinstance(config, dict) else None
    return len(labels) if isinstance(labels, dict) and labels else 2


def build_app(model_dir: str | Path, adapters_dir: str | Path | None, task: str = "auto", device: str = "cpu",
              max_resident: int = 8, config: Any = None) -> Any:
    """The FastAPI app for a model (a known name, a folder or a .gguf) and an adapters folder (every adapter in it
    is loaded at start)."""
    from adapterkit.serve.app import ServeConfig, create_app
    from adapterkit.serve.runners import ClassifyRunner, CompletionRunner

    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise AdapterKitError(f"--adapters {adapters_dir}: no such folder")
    task, model, tokenizer = load_model(model_dir, task, device)
    store = AdapterStore(model, adapters_dir, max_resident=max_resident)
    store.load_all()
    runner = (CompletionRunner if task == "completions" else ClassifyRunner)(model, tokenizer, store)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return create_app(runner, store, config or ServeConfig(), max_positions=positions)


@dataclass
class Running:
    """A server started in a background thread (tests, benchmarks); ``stop()`` shuts it down."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(app: Any, host: str = "127.0.0.1") -> Running:
    """Serve ``app`` on an ephemeral port of ``host`` in a daemon thread; returns once it accepts connections."""
    import uvicorn

    # proto given: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it every answer
    # (headers, then body: two writes) waits ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="adapterkit-serve")
    thread.start()
    for _ in range(2000):
        if server.started:
            break
        if not thread.is_alive():
            raise AdapterKitError("the server thread exited during start-up")
        threading.Event().wait(0.01)
    else:
        raise AdapterKitError("the server did not start within 20 s")
    return Running(server, thread, f"http://{host}:{port}")


def serve(model_dir: str, adapters_dir: str | None, host: str = "127.0.0.1", port: int = 8000,
          task: str = "auto", device: str = "cpu", max_resident: int = 8, config: Any = None,
          threads: int | None = None) -> None:
    """Build the app and serve it in the foreground until interrupted.

    ``threads`` sets torch's intra-op thread count (None: torch's default, one per core). On cores that other
    processes also use, fewer threads can be much faster: the threads of a parallel region spin-wait for each other
    (OpenMP's default policy), so while another process holds a core every region waits on a descheduled thread.
    Measured on 2 shared cores, a tiny Llama's 4-token greedy generation: 4.3 ms with 1 thread, 48 ms with 2 while
    another process used about one core, 4.0 ms with 2 once OMP_WAIT_POLICY=PASSIVE was set (quiet: 3.9 / 4.0 ms).
    """
    import uvicorn

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterKitError(f"--device {device}: CUDA is not available on this machine")
    if threads is not None:
        if threads < 1:
            raise AdapterKitError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = build_app(model_dir, adapters_dir, task, device, max_resident, config)
    store = app.state.store
    print(f"serving {app.state.runner.kind} with {len(store.entries)} adapters "
          f"({len(store.resident)} resident) on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

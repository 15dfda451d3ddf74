"""The online test-time loop: every batch of the stream goes to the method, which adapts and predicts; the loop
keeps the predictions, scores each domain from labels held apart (never shown to the method), and saves a resumable
state after each domain.

Reset modes: ``"never"`` (continual TTA: the method carries its state across domains and rounds) and
``"per_domain"`` (the method returns to its starting state, exactly, at the start of every domain: the domain
boundaries are known). Each domain starts from its own seed (``seed * 1009 + step``), so a stream resumed after
domain t continues exactly as the uninterrupted run would.

The state after domain t is one safetensors file (tensors plus a JSON header), as the continual runner writes it:
the method's state (adapter weights, optimizer moments, ...), the result so far, and what it belongs to (the
model's base weights, the stream, the method and its settings, the reset mode, the seed, the starting state).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from tqdm.auto import tqdm

from adapterkit.core.files import atomic_write
from adapterkit.core.host import HOST_ATTR
from adapterkit.inject.fingerprint import tensor_digest
from adapterkit.train.continual.stream import StreamError
from adapterkit.train.tta.method import TTAMethod
from adapterkit.train.tta.stream import TestStream, check_labels

RESETS = ("never", "per_domain")
STATE_FILE = "tta_state.safetensors"


@dataclass
class TTAResult:
    """One record per domain as it arrived: round, domain, accuracy (percent; None without labels), seconds,
    batches and examples."""

    method: str
    order: str
    reset: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self) -> dict[str, list[float | None]]:
        """Domain -> accuracy in each round, in stream order."""
        found: dict[str, list[float | None]] = {}
        for record in self.steps:
            found.setdefault(record["domain"], []).append(record["accuracy"])
        return found

    def mean_accuracy(self, round: int | None = None) -> float:
        """Mean accuracy over the domains of one round (None: over every domain of every round)."""
        values = [r["accuracy"] for r in self.steps if round is None or r["round"] == round]
        if not values or any(v is None for v in values):
            raise StreamError("mean_accuracy: this run was not scored (run_tta was given no labels)")
        return sum(values) / len(values)

    def seconds_per_batch(self) -> float:
        return sum(r["seconds"] for r in self.steps) / max(1, sum(r["batches"] for r in self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy()}


def run_tta(method: TTAMethod, model: nn.Module, stream: TestStream, labels: Mapping[str, Tensor] | None = None,
            reset: str = "never", out: str | Path | None = None, resume: bool = False, seed: int = 0) -> TTAResult:
    """Run ``method`` on ``model`` over ``stream``, batch by batch; score each domain from ``labels`` (domain name
    -> labels, one per input, kept apart from the stream) when given. With ``out``, save the state after every
    domain and ``result.json`` at the end; with ``resume``, continue from the saved state."""
    if reset not in RESETS:
        raise StreamError(f"reset={reset!r}: use 'never' (carry the state across domains) or 'per_domain'")
    if labels is not None:
        check_labels(stream, labels)
    fingerprint = model_fingerprint(model)  # before the method attaches or changes anything
    torch.manual_seed(seed)
    method.setup(model)
    start = method.state()  # what a reset returns to (copies)
    identity = {"model": fingerprint, "stream": stream.digest(), "method": method.name, "config": method.config(),
                "reset": reset, "seed": seed, "start": state_digest(start[0])}
    identity = json.loads(json.dumps(identity))  # as JSON keeps it (tuples -> lists)
    result = TTAResult(method.name, method.order, reset)
    folder = Path(out) if out is not None else None
    first = 0
    if resume and folder is not None and (folder / STATE_FILE).exists():
        first = _restore(folder / STATE_FILE, method, identity, result)
    done = sum(r["batches"] for r in result.steps)
    bar = tqdm(total=stream.num_batches(), initial=done, desc=f"tta {method.name}", leave=False,
               disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    for index in range(first, len(stream)):
        step = stream.steps[index]
        if reset == "per_domain" and index > 0:
            method.load_state(*start)
        torch.manual_seed(seed * 1009 + index)
        predicted = []
        began = time.perf_counter()
        for x in stream.batches(step.name):
            predicted.append(method.step(x).detach().argmax(-1).cpu())
            bar.update(1)
        seconds = time.perf_counter() - began
        accuracy = None
        if labels is not None:  # read once the domain's predictions are all made
            truth = labels[step.name].to(torch.long).cpu()
            accuracy = 100.0 * float((torch.cat(predicted) == truth).float().mean())
            bar.set_postfix(domain=step.name, acc=f"{accuracy:.1f}")
        result.steps.append({"round": step.round, "domain": step.name, "accuracy": accuracy, "seconds": seconds,
                             "batches": len(predicted), "examples": int(sum(len(p) for p in predicted))})
        if folder is not None:
            _save(folder / STATE_FILE, method, identity, result, index)
    bar.close()
    if folder is not None:
        atomic_write(folder / "result.json", json.dumps(result.to_dict(), indent=1).encode())
    return result


def model_fingerprint(model: nn.Module) -> str:
    """The base model's parameter and buffer names, shapes and a sample of their values (adapters excluded)."""
    h = hashlib.sha256()
    items = list(model.named_parameters()) + list(model.named_buffers())
    for name, value in items:
        if HOST_ATTR not in name.split("."):
            h.update(f"{name}:{tuple(value.shape)}:{tensor_digest(value)}".encode())
    return h.hexdigest()[:16]


def state_digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(f"{key}:{tuple(tensors[key].shape)}:{tensor_digest(tensors[key])}".encode())
    return h.hexdigest()[:16]


def _save(path: Path, method: TTAMethod, identity: dict[str, Any], result: TTAResult, index: int) -> None:
    tensors, meta = method.state()
    header = {"done": index + 1, "identity": identity, "method": meta, "result": asdict(result)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save_tensors({k: v.contiguous() for k, v in tensors.items()},
                                    metadata={"state": json.dumps(header)}))


def _restore(path: Path, method: TTAMethod, identity: dict[str, Any], result: TTAResult) -> int:
    try:
        tensors = load_tensors(path.read_bytes())
        from safetensors import safe_open  # the header's metadata is only reachable through safe_open

        with safe_open(str(path), "pt") as handle:
            header = json.loads((handle.metadata() or {})["state"])
    except Exception as exc:  # noqa: BLE001 - any damage reads as one line
        raise StreamError(f"cannot resume from {path}: the file is damaged ({type(exc).__name__})") from None
    words = {"model": "a different model (other base weights)", "stream": "a different stream",
             "method": "a different method", "config": "the method with other settings",
             "reset": "another reset mode", "seed": "a different seed", "start": "another starting state"}
    theirs = header["identity"]
    for key, what in words.items():
        if theirs.get(key) != identity[key]:
            raise StreamError(f"cannot resume from {path}: it was saved with {key} {theirs.get(key)!r}, this run "
                              f"uses {what} ({identity[key]!r})")
    method.load_state(tensors, header["method"])
    result.steps = header["result"]["steps"]
    return int(header["done"])

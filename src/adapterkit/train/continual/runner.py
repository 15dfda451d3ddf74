"""Running a stream: learn each task, evaluate on every task seen so far, save a resumable state after each task.

The state after task t is one safetensors file (tensors plus a JSON header): the adapters (specs, placements,
weights), the method's bookkeeping, the accuracy matrices, and what it was trained on (backbone fingerprint,
stream digest, method and its settings). Every task starts from its own seed, so a stream resumed after task t
continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adapterkit.core.files import atomic_write
from adapterkit.train.continual.learner import ContinualMethod, Learner
from adapterkit.train.continual.metrics import Matrix, plot_matrix, summary
from adapterkit.train.continual.stream import Stream, StreamError

STATE_FILE = "stream_state.safetensors"


@dataclass
class StreamResult:
    """Accuracy matrices per prediction variant, their metrics, and the costs."""

    method: str
    task_names: list[str]
    matrices: dict[str, Matrix]
    seconds_per_task: list[float] = field(default_factory=list)
    trainable_params: int = 0
    memory_bytes: int = 0
    exemplars: int = 0  # rehearsal-free: no method here stores training examples
    events: list[dict[str, Any]] = field(default_factory=list)  # what a method decided per task (e.g. EAR's growth)

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {variant: summary(m) for variant, m in self.matrices.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": self.metrics}


def task_seed(seed: int, t: int) -> int:
    return seed * 1009 + t


@torch.no_grad()
def evaluate(method: ContinualMethod, learner: Learner, stream: Stream, t: int) -> dict[str, list[float]]:
    """Accuracy (percent) on each task 0..t's test set, one list per variant; predictions range over every class
    seen so far (no task id is given)."""
    columns = stream.classes_up_to(t) if stream.setting == "class" else stream.classes_up_to(len(stream) - 1)
    learner.backbone.model.eval()
    rows: dict[str, list[float]] = {v: [] for v in method.variants}
    for j in range(t + 1):
        test = stream[j].test
        correct = dict.fromkeys(method.variants, 0)
        for batch, labels in learner.batches(test, learner.config.eval_batch_size, False):
            for variant in method.variants:
                scores = method.predict(learner, batch, columns, variant)
                predicted = torch.tensor(columns)[scores.argmax(-1)]
                correct[variant] += int((predicted == labels).sum())
        for variant in method.variants:
            rows[variant].append(100.0 * correct[variant] / len(test))
    return rows


def run_stream(method: ContinualMethod, learner: Learner, stream: Stream, out: str | Path | None = None,
               resume: bool = False) -> StreamResult:
    """Learn ``stream`` task by task with ``method`` on ``learner``; with ``out``, save the state after every
    task (and the result and accuracy-matrix plot at the end); with ``resume``, continue from the saved state."""
    if stream.setting not in method.settings:
        raise StreamError(f"{method.name} needs a {' or '.join(method.settings)}-incremental stream; this one is "
                          f"{stream.setting}-incremental")
    folder = Path(out) if out is not None else None
    result = StreamResult(method.name, [task.name for task in stream.tasks], {v: [] for v in method.variants})
    start = 0
    if resume and folder is not None and (folder / STATE_FILE).exists():
        start = _restore(folder / STATE_FILE, method, learner, stream, result)
    for t in range(start, len(stream)):
        torch.manual_seed(task_seed(learner.config.seed, t))
        began = time.perf_counter()
        method.learn(learner, stream, t)
        result.seconds_per_task.append(time.perf_counter() - began)
        for variant, row in evaluate(method, learner, stream, t).items():
            result.matrices[variant].append(row)
        result.events = list(getattr(method, "events", []))
        if folder is not None:
            _save(folder / STATE_FILE, method, learner, stream, result, t)
    result.trainable_params = method.trainable_params(learner)
    result.memory_bytes = method.memory_bytes()
    if folder is not None:
        atomic_write(folder / "result.json", json.dumps(result.to_dict(), indent=1).encode())
        main = method.variants[0]
        plot_matrix(result.matrices[main], result.task_names, folder / "accuracy_matrix.png",
                    f"{method.name} ({main}): accuracy after each task")
    return result


def _identity(method: ContinualMethod, learner: Learner, stream: Stream) -> dict[str, Any]:
    return {"backbone": learner.backbone.fingerprint(), "stream": stream.digest(), "method": method.name,
            "method_config": method.config(), "spec": learner.spec.to_dict(), "seed": learner.config.seed}


def _save(path: Path, method: ContinualMethod, learner: Learner, stream: Stream, result: StreamResult,
          t: int) -> None:
    adapters, placed = learner.adapter_state()
    own, meta = method.state()
    tensors = {**adapters, **{f"method.{k}": v.contiguous() for k, v in own.items()}}
    header = {"done": t + 1, "identity": _identity(method, learner, stream), "adapters": placed, "method": meta,
              "result": asdict(result)}
    atomic_write(path, save_tensors(tensors, metadata={"state": json.dumps(header)}))


def _restore(path: Path, method: ContinualMethod, learner: Learner, stream: Stream, result: StreamResult) -> int:
    data = path.read_bytes()
    try:
        tensors = load_tensors(data)
        from safetensors import safe_open  # the header's metadata is only reachable through safe_open

        with safe_open(str(path), "pt") as handle:
            header = json.loads((handle.metadata() or {})["state"])
    except Exception as exc:  # noqa: BLE001 - any damage reads as one line
        raise StreamError(f"cannot resume from {path}: the file is damaged ({type(exc).__name__})") from None
    theirs = header["identity"]
    ours = json.loads(json.dumps(_identity(method, learner, stream)))  # as JSON keeps it (tuples -> lists)
    what = {"backbone": "a different backbone (another model or other weights)", "stream": "a different stream",
            "method": "a different method", "method_config": "the method with other settings",
            "spec": "a different adapter spec", "seed": "a different seed"}
    for key, words in what.items():
        if theirs.get(key) != ours[key]:
            raise StreamError(f"cannot resume from {path}: it was saved with {key} {theirs.get(key)!r}, this run "
                              f"uses {words} ({ours[key]!r})")
    learner.load_adapter_state({k: v for k, v in tensors.items() if k.startswith("adapter.")}, header["adapters"])
    method.load_state(learner, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                      header["method"])
    saved = header["result"]
    result.matrices = saved["matrices"]
    result.seconds_per_task = saved["seconds_per_task"]
    result.events = saved["events"]
    return int(header["done"])

"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position in ONE safetensors file.

One file, written atomically, so a run killed at any moment (even mid-write) resumes from the last complete
checkpoint. Tensors are stored as tensors and everything else as JSON in the file's header: nothing is pickled.
The header also holds a sha256 over that JSON and every tensor (name, dtype, shape, bytes), so a flipped byte
anywhere is found. On a machine with CUDA the generators of every visible device are saved and restored too
(dropout on the GPU draws from them). A checkpoint is checked completely against this run (parameter names and
shapes, optimizer groups and states, scheduler keys, RNG states) before anything is restored: a bad one is a
one-line ``StateError`` naming the file, and the run is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import StateError
from adapterkit.core.files import atomic_write
from adapterkit.inject.record import tensors_sha256

FORMAT_VERSION = 2  # 2: the header holds a sha256 (DIGEST), which version 1 files lack
KEY = "adapterkit_checkpoint"
DIGEST = f"{KEY}_sha256"
# The progress record run_training keeps (train/loop.py): what it reads back after a resume.
_PROGRESS: dict[str, type] = {"step": int, "epoch": int, "batch": int, "seconds": float, "history": dict}
_HISTORY = ("step", "loss", "epoch", "epoch_step", "dev_accuracy")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: dict[str, Any],
                    data_rng: torch.Tensor) -> None:
    """Write everything needed to continue training exactly where it stands."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensors[f"param.{name}"] = param.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_rng.clone()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for device, state in enumerate(cuda_states):
        tensors[f"rng.cuda.{device}"] = state.cpu()
    meta = json.dumps({
        "format_version": FORMAT_VERSION,
        "progress": progress,
        "param_groups": opt_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "cuda_rng_devices": len(cuda_states),
    })
    atomic_write(path, save_bytes(tensors, metadata={KEY: meta, DIGEST: header_digest(meta, tensors)}))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict[str, Any], torch.Tensor]:
    """Restore a checkpoint in place; returns (progress, data RNG state). Nothing changes if it is refused."""
    meta, tensors = _read(path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(trainable):
        missing = sorted(set(trainable) ^ set(saved))[:3]
        raise StateError(f"{path}: checkpoint does not match this run's trainable parameters (e.g. {missing})")
    for name, param in trainable.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise StateError(f"{path}: parameter {name} has shape {tuple(saved[name].shape)} in the checkpoint, "
                             f"{tuple(param.shape)} in this run")
    opt_state = _optimizer_state(path, meta, tensors, optimizer)
    _check_like(path, "scheduler", meta["scheduler"], scheduler.state_dict())
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(meta.get("cuda_rng_devices", 0))]
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as exc:  # checked above; torch's own checks, in case
        raise StateError(f"{path}: optimizer state does not fit this run ({exc})") from None
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    _restore_cuda_rng(path, cuda)
    return meta["progress"], tensors["rng.data"]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's JSON and tensors, their digest verified and every key checked."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot read the checkpoint ({exc.strerror or type(exc).__name__})") from None
    try:
        tensors = load_bytes(blob)
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines()
        raise StateError(f"{path}: not a readable adapterkit checkpoint (truncated or corrupted: "
                         f"{lines[0] if lines else type(exc).__name__})") from None
    # load_bytes has parsed the header, so it is well formed: 8 bytes of length, then a JSON object
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    metadata = header.get("__metadata__") or {}
    if KEY not in metadata:
        raise StateError(f"{path}: not an adapterkit checkpoint (no {KEY!r} entry in its header)")
    if DIGEST in metadata and metadata[DIGEST] != header_digest(metadata[KEY], tensors):
        raise StateError(f"{path}: contents do not match the sha256 in its header (truncated or corrupted file)")
    try:
        meta = json.loads(metadata[KEY])
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: checkpoint header holds invalid JSON ({exc})") from None
    _check_meta(path, meta)
    if DIGEST not in metadata and meta["format_version"] >= 2:
        raise StateError(f"{path}: no {DIGEST!r} entry in its header (corrupted, or not written by adapterkit)")
    for key in ("rng.torch", "rng.data", *(f"rng.cuda.{i}" for i in range(meta.get("cuda_rng_devices", 0)))):
        state = tensors.get(key)
        size = state.numel() if key.startswith("rng.cuda.") and state is not None else torch.get_rng_state().numel()
        if state is None or state.dtype != torch.uint8 or state.dim() != 1 or state.numel() != size or size == 0:
            shown = "missing" if state is None else f"{state.dtype} of shape {tuple(state.shape)}"
            raise StateError(f"{path}: random generator state {key} is {shown}, expected {size} bytes (uint8)")
    return meta, tensors


def _check_meta(path: Path, meta: Any) -> None:
    def expect(key: str, value: Any, ok: bool, wanted: str) -> None:
        if not ok:
            shown = json.dumps(value)
            raise StateError(f"{path}: checkpoint {key} must be {wanted}, got "
                             f"{shown if len(shown) <= 60 else shown[:57] + '...'}")

    expect("header", meta, isinstance(meta, dict), "a JSON object")
    version = meta.get("format_version")
    expect("format_version", version, _is_int(version), "an integer")
    if version > FORMAT_VERSION:
        raise StateError(f"{path}: checkpoint format {version} is newer than this adapterkit reads ({FORMAT_VERSION})")
    expect("format_version", version, version >= 1, "at least 1")
    for key in ("progress", "optimizer_scalars", "scheduler"):
        expect(key, meta.get(key), isinstance(meta.get(key), dict), "a JSON object")
    expect("param_groups", meta.get("param_groups"), isinstance(meta.get("param_groups"), list), "a JSON array")
    expect("cuda_rng_devices", meta.get("cuda_rng_devices", 0), _is_int(meta.get("cuda_rng_devices", 0))
           and meta.get("cuda_rng_devices", 0) >= 0, "a count")
    progress = meta["progress"]
    for key, kind in _PROGRESS.items():
        value = progress.get(key)
        if kind is int:
            expect(f"progress.{key}", value, _is_int(value) and value >= 0, "a count")
        elif kind is float:
            expect(f"progress.{key}", value, _is_number(value), "a number")
        else:
            expect(f"progress.{key}", value, isinstance(value, kind), "a JSON object")
    for key in _HISTORY:
        values = progress["history"].get(key)
        expect(f"progress.history.{key}", values, isinstance(values, list) and all(map(_is_number, values)),
               "a list of numbers")
    for group in meta["param_groups"]:
        expect("param_groups", group, isinstance(group, dict) and isinstance(group.get("params"), list)
               and all(map(_is_int, group["params"])), "a list of objects with integer 'params'")
    for index, values in meta["optimizer_scalars"].items():
        expect(f"optimizer_scalars.{index}", values, index.isdigit() and isinstance(values, dict)
               and all(_is_number(v) or isinstance(v, str | bool) or v is None for v in values.values()),
               "an object of scalars under a parameter index")


def _optimizer_state(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict the checkpoint holds, checked against ``optimizer``'s groups and parameters."""
    ours = optimizer.state_dict()["param_groups"]
    saved = meta["param_groups"]
    if len(saved) != len(ours) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, ours)):
        raise StateError(f"{path}: optimizer groups {[len(g['params']) for g in saved]} in the checkpoint, "
                         f"{[len(g['params']) for g in ours]} in this run")
    for number, (theirs, here) in enumerate(zip(saved, ours)):
        _check_like(path, f"param_groups[{number}]", {k: v for k, v in theirs.items() if k != "params"},
                    {k: v for k, v in here.items() if k != "params"})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index_of = {index: params[i] for i, index in enumerate(i for g in saved for i in g["params"])}
    if len(index_of) != len(params):
        raise StateError(f"{path}: checkpoint param_groups repeat a parameter index")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            param = index_of.get(int(index)) if index.isdigit() else None
            # Adam(W), SGD, RMSprop, Adagrad: a state is a scalar (the step) or has its parameter's shape
            if param is None or value.dim() and tuple(value.shape) != tuple(param.shape):
                raise StateError(f"{path}: optimizer state {key} {tuple(value.shape)} fits no parameter of this run")
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_scalars"].items():
        if int(index) not in index_of:
            raise StateError(f"{path}: optimizer_scalars name parameter {index}, which the checkpoint does not have")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": saved}


def _check_like(path: Path, where: str, theirs: Any, ours: Any) -> None:
    """``theirs`` (from the checkpoint) has the structure of ``ours`` (this run's): same keys, lengths and kinds."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict) or set(theirs) != set(ours):
            keys = sorted(set(theirs) ^ set(ours))[:3] if isinstance(theirs, dict) else type(theirs).__name__
            raise StateError(f"{path}: checkpoint {where} does not fit this run ({keys})")
        for key, value in ours.items():
            _check_like(path, f"{where}.{key}", theirs[key], value)
    elif isinstance(ours, list | tuple):
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            raise StateError(f"{path}: checkpoint {where} must be a list of {len(ours)}, got {json.dumps(theirs)[:60]}")
        for number, (a, b) in enumerate(zip(theirs, ours)):
            _check_like(path, f"{where}[{number}]", a, b)
    elif _is_number(ours) != _is_number(theirs) or not _is_number(ours) and type(ours) is not type(theirs):
        raise StateError(f"{path}: checkpoint {where} must be like {ours!r}, got {json.dumps(theirs)[:60]}")


def _restore_cuda_rng(path: Path, states: list[torch.Tensor]) -> None:
    if not states:
        return
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here != len(states):
        warnings.warn(f"{path}: the checkpoint holds CUDA random states for {len(states)} devices, this machine has "
                      f"{here}: dropout after the resume will not repeat the interrupted run exactly", stacklevel=3)
    if here:
        torch.cuda.set_rng_state_all(states[:here])


def header_digest(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 a checkpoint's header holds: over its JSON and every tensor (name, dtype, shape, bytes)."""
    return hashlib.sha256(f"{meta}\n{tensors_sha256(tensors)}".encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position in ONE safetensors file.

One file, written atomically, so a run killed at any moment (even mid-write) resumes from the last complete
checkpoint. Tensors are stored as tensors and everything else as JSON in the file's header: nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import StateError
from adapterkit.core.files import atomic_write

FORMAT_VERSION = 1
KEY = "adapterkit_checkpoint"


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
    meta = {
        "format_version": FORMAT_VERSION,
        "progress": progress,
        "param_groups": opt_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
    }
    atomic_write(path, save_bytes(tensors, metadata={KEY: json.dumps(meta)}))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict[str, Any], torch.Tensor]:
    """Restore a checkpoint in place; returns (progress, data RNG state)."""
    try:
        blob = path.read_bytes()
        tensors = load_bytes(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + header_len])["__metadata__"][KEY])
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        raise StateError(f"{path}: not a readable adapterkit checkpoint ({exc})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StateError(f"{path}: checkpoint format {meta['format_version']} is newer than this adapterkit reads")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(trainable):
        missing = sorted(set(trainable) ^ set(saved))[:3]
        raise StateError(f"{path}: checkpoint does not match this run's trainable parameters (e.g. {missing})")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["progress"], tensors["rng.data"]

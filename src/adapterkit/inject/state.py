"""Save and load adapters: safetensors weights plus a JSON record, never pickle, always atomic.

A saved adapter is a directory holding ``adapter.json`` (format version, method, spec, the module paths it
adapts, the base model's fingerprint, the sha256 of the weights file) and the weights file it names,
``adapter-<hash>.safetensors``. A save writes the new weights under a new name, then atomically replaces
``adapter.json``, then deletes the old weights: a save killed at any point leaves a loadable adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import StateError
from adapterkit.core.files import atomic_write
from adapterkit.core.host import HOST_ATTR, host_of
from adapterkit.core.protocol import Packed, Resizable
from adapterkit.core.registry import spec_from_dict
from adapterkit.inject.engine import adapter_names, attach, detach, hosts, placements, set_active
from adapterkit.inject.fingerprint import module_fingerprint
from adapterkit.inject.record import FORMAT_VERSION, RECORD, read
from adapterkit.inject.select import select


def module_tensors(model: nn.Module, suffixes: tuple[str, ...],
                   prefix: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Paths of the modules whose names end with ``suffixes`` and their own tensors (no adapters), keyed
    ``<prefix><path>.<param>``: what is saved beside an adapter, e.g. a classification head."""
    paths: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for suffix in suffixes:
        for mpath, module in select(model, [suffix]):
            paths.append(mpath)
            for pname, tensor in module.state_dict().items():
                if HOST_ATTR not in pname.split("."):
                    tensors[f"{prefix}{mpath}.{pname}"] = tensor.detach().to("cpu").contiguous()
    return paths, tensors


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None, modules: tuple[str, ...] = ()) -> Path:
    """Save adapter ``name`` (the only one, if omitted) and the named extra ``modules`` (e.g. a head)."""
    name = _resolve_name(model, name)
    out = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    fingerprint: dict[str, Any] = {}
    targets = []
    spec_dict: dict[str, Any] | None = None
    for mpath, _, host in placements(model, name):
        adapter = host.adapter(name)
        spec_dict = spec_dict or adapter.spec.to_dict()
        targets.append(mpath)
        fingerprint[mpath] = host.fingerprint
        state = adapter.packed_state() if isinstance(adapter, Packed) else adapter.state_dict()
        for pname, tensor in state.items():
            tensors[f"adapter.{mpath}.{pname}"] = tensor.detach().to("cpu").contiguous()
    extra, head_tensors = module_tensors(model, modules, "module.")
    tensors.update(head_tensors)
    blob = save_bytes(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"adapter-{digest[:12]}.safetensors"
    record = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "spec": spec_dict,
        "targets": targets,
        "modules": extra,
        "fingerprint": fingerprint,
        "weights": weights_name,
        "weights_sha256": digest,
    }
    try:
        atomic_write(out / weights_name, blob)
        atomic_write(out / RECORD, (json.dumps(record, indent=2) + "\n").encode())
    except OSError as exc:
        raise StateError(f"cannot write adapter to {out}: {exc.strerror or exc}") from None
    # Only now is the previous weights file unreferenced; this also removes files orphaned by a killed save.
    for stale in out.glob("adapter-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return out


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, strict_base: bool = True) -> str:
    """Attach the adapter saved at ``path`` as ``name`` (default: its saved name) and load its weights.

    Checks that every saved target exists here with the same shapes and weights (fingerprint); set
    ``strict_base=False`` to skip the weight hash (e.g. a base re-quantised on purpose).
    """
    record, tensors = read(path)
    name = name or record["name"]
    spec = spec_from_dict(record["spec"], where=f"{Path(path) / RECORD}")
    modules = dict(model.named_modules())
    for mpath in record["targets"]:
        if mpath not in modules:
            raise StateError(f"{path}: adapter targets {mpath!r}, which this model does not have (another base model?)")
        saved = record["fingerprint"][mpath]
        host = host_of(modules[mpath])
        here = host.fingerprint if host is not None else module_fingerprint(modules[mpath])
        if saved["shapes"] != here["shapes"]:
            raise StateError(f"{path}: {mpath} has shapes {here['shapes']} here but {saved['shapes']} in the saved "
                             "base model (another base model?)")
        if strict_base and saved["hash"] != here["hash"]:
            raise StateError(f"{path}: {mpath} weights differ from the base model the adapter was trained on "
                             "(another checkpoint?); pass strict_base=False to load anyway")
    exact = [f"re:{re.escape(p)}" for p in record["targets"]]
    attach(model, name, spec, exact)
    try:
        _copy_tensors(model, name, record, tensors, path)
    except Exception:
        detach(model, name)
        raise
    if not spec.role:  # a combiner is never active on its own: it runs through its block
        set_active(model, _active_with(model, name))
    return name


def _copy_tensors(model: nn.Module, name: str, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                  path: str | os.PathLike) -> None:
    for mpath, _, host in placements(model, name):
        adapter = host.adapter(name)
        prefix = f"adapter.{mpath}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if isinstance(adapter, Resizable):  # sizes set by training (e.g. a sparse diff's K), not by the spec
            try:
                adapter.resize(own)
            except ValueError as exc:
                raise StateError(f"{path}: adapter at {mpath}: {exc}") from None
        if isinstance(adapter, Packed):  # compact stored form (core/protocol.py): the adapter rebuilds itself
            try:
                adapter.load_packed(own)
            except ValueError as exc:
                raise StateError(f"{Path(path) / record['weights']}: adapter at {mpath}: {exc}") from None
            continue
        _load_state(adapter, own, f"{path}: adapter at {mpath}")
    modules = dict(model.named_modules())
    for mpath in record.get("modules", []):
        if mpath not in modules:
            raise StateError(f"{path}: saved module {mpath!r} does not exist in this model")
        prefix = f"module.{mpath}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _load_state(modules[mpath], own, f"{path}: module {mpath}", skip_hosts=True)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], where: str, skip_hosts: bool = False) -> None:
    expected = {k: v for k, v in module.state_dict().items() if not (skip_hosts and HOST_ATTR in k.split("."))}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise StateError(f"{where}: missing tensors {missing[:3]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise StateError(f"{where}: tensor {key} has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


def _active_with(model: nn.Module, name: str) -> list[str]:
    active: list[str] = []
    for _, _, host in hosts(model):
        active += [n for n in host.active if n not in active]
    return active if name in active else [*active, name]


def _resolve_name(model: nn.Module, name: str | None) -> str:
    names = adapter_names(model)
    if name is not None:
        placements(model, name)
        return name
    if len(names) != 1:
        raise StateError(f"save: name which adapter to save (attached: {names or 'none'})")
    return names[0]

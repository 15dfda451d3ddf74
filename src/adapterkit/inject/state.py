"""Save and load adapters: safetensors weights plus a JSON record, never pickle, always atomic.

A saved adapter is a directory holding ``adapter.json`` (format version, method, spec, the module paths it
adapts, the base model's fingerprint, the sha256 of the weights file) and the weights file it names,
``adapter-<hash>.safetensors`` (inject/record.py reads and verifies both). A save writes the new weights under a
new name, then atomically replaces ``adapter.json``, then deletes every weights file the record does not name: a
save killed at any point leaves a loadable adapter. Saves into one folder hold a lock on it (``.adapter.lock``)
from the first write to the clean-up, so two of them (threads or processes) never delete each other's weights.

Loading rebuilds the adapter at the saved module paths directly (no target selection) without touching the
caller's random stream, and is the one load path every caller uses (``attach_saved``: the server's store too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import AdapterKitError, StateError, TargetError
from adapterkit.core.files import atomic_write
from adapterkit.core.host import HOST_ATTR, Host, host_of
from adapterkit.core.protocol import Packed, Resizable
from adapterkit.core.registry import spec_from_dict
from adapterkit.core.tree import adapter_names, placements
from adapterkit.inject.engine import attach_at, detach
from adapterkit.inject.fingerprint import module_fingerprint, same_weights
from adapterkit.inject.record import FORMAT_VERSION, RECORD, read
from adapterkit.inject.select import select

try:
    import fcntl
except ImportError:  # Windows: saves are serialised between threads only
    fcntl = None  # type: ignore[assignment]

LOCK = ".adapter.lock"


def module_tensors(model: nn.Module, suffixes: Sequence[str],
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


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None,
         modules: Sequence[str] | None = None) -> Path:
    """Save adapter ``name`` (the only one, if omitted) with the modules trained beside it.

    ``modules`` (path suffixes, e.g. ``("classifier",)``) names the extra modules to store with the adapter; by
    default they are the ones ``train_only(model, name, also=...)`` made trainable, so a trained head is kept.
    Pass ``modules=()`` to store the adapter alone.
    """
    name = _resolve_name(model, name)
    out = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    fingerprint: dict[str, Any] = {}
    targets = []
    spec_dict: dict[str, Any] | None = None
    found = placements(model, name)
    own_specs: dict[str, Any] = {}  # targets whose adapter has a spec of its own (e.g. peft's per-module ranks)
    for mpath, _, host in found:
        adapter = host.adapter(name)
        spec_dict = spec_dict or adapter.spec.to_dict()
        if adapter.spec.to_dict() != spec_dict:
            own_specs[mpath] = adapter.spec.to_dict()
        targets.append(mpath)
        fingerprint[mpath] = host.fingerprint
        state = adapter.packed_state() if isinstance(adapter, Packed) else adapter.state_dict()
        for pname, tensor in state.items():
            tensors[f"adapter.{mpath}.{pname}"] = tensor.detach().to("cpu").contiguous()
    if modules is None:
        modules = [f"re:{re.escape(p)}" for p in found[0][2].beside.get(name, [])]
    extra, head_tensors = module_tensors(model, modules, "module.")
    tensors.update(head_tensors)
    blob = save_bytes(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"adapter-{digest[:12]}.safetensors"
    record = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "spec": spec_dict,
        **({"specs": own_specs} if own_specs else {}),
        "targets": targets,
        "modules": extra,
        "fingerprint": fingerprint,
        "weights": weights_name,
        "weights_sha256": digest,
    }
    try:
        with _folder_lock(out):
            atomic_write(out / weights_name, blob)
            atomic_write(out / RECORD, (json.dumps(record, indent=2) + "\n").encode())
            # Only now is the previous weights file unreferenced; this also removes files orphaned by a killed save.
            for stale in out.glob("adapter-*.safetensors"):
                if stale.name != weights_name:
                    stale.unlink(missing_ok=True)
    except OSError as exc:
        raise StateError(f"cannot write adapter to {out}: {exc.strerror or exc}") from None
    return out


_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive use of ``folder`` for one save: a per-folder thread lock in this process, and an advisory file
    lock across processes (released by the OS if the process dies; where ``fcntl`` is missing, threads only)."""
    folder.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCKS_GUARD:
        local = _THREAD_LOCKS.setdefault(folder.resolve(), threading.Lock())
    with local, open(folder / LOCK, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, strict_base: bool = True,
         overwrite: bool = False) -> str:
    """Attach the adapter saved at ``path`` as ``name`` (default: its saved name) and load its weights.

    Checks that every saved target exists here with the same shapes and weights (the fingerprint, which allows a
    move to another float dtype or onto a 4-bit twin of the base); ``strict_base=False`` skips the weights check
    (shapes are always checked). With ``overwrite=True`` and ``name`` already attached with the same spec and
    targets, the saved weights are copied into it in place (an optimizer keeps its references: how a Trainer
    resumes). Loading leaves the caller's random stream as it was.
    """
    record, tensors = read(path)
    return attach_saved(model, record, tensors, name, strict_base, where=str(path), overwrite=overwrite)


def attach_saved(model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], name: str | None = None,
                 strict_base: bool = True, where: str = "", check_base: bool = True, overwrite: bool = False) -> str:
    """``load`` from a record and tensors already read (``inject.record.read``): the server's store keeps them in
    memory and attaches from there; ``check_base=False`` skips the fingerprint check done once before."""
    name = name or record["name"]
    spec = spec_from_dict(record["spec"], where=f"{Path(where) / RECORD}")
    specs = _own_specs(record, where)
    modules = dict(model.named_modules())
    if check_base:
        _check_base(record, modules, strict_base, where)
    if overwrite and name in adapter_names(model):
        _check_same_adapter(model, name, spec, specs, record, where)
        _copy_tensors(modules, name, record, tensors, where)
        return name
    try:
        attach_at(model, name, spec, record["targets"], fresh_init=False, modules=modules, specs=specs)
    except TargetError as exc:  # the saved spec cannot adapt a saved target (e.g. a rank the record misstates)
        raise StateError(f"{Path(where) / RECORD}: {exc}") from None
    try:
        _copy_tensors(modules, name, record, tensors, where)
    except BaseException:
        detach(model, name)
        raise
    for mpath in record["targets"]:
        _host(modules, mpath).beside[name] = list(record.get("modules", []))
    return name


def _host(modules: dict[str, nn.Module], path: str) -> Host:
    host = host_of(modules[path])
    assert host is not None, path  # attach_at placed one on every target
    return host


def _check_base(record: dict[str, Any], modules: dict[str, nn.Module], strict_base: bool, where: str) -> None:
    for mpath in record["targets"]:
        if mpath not in modules:
            raise StateError(f"{where}: adapter targets {mpath!r}, which this model does not have (another base "
                             "model?)")
        saved = record["fingerprint"][mpath]
        host = host_of(modules[mpath])
        here = host.fingerprint if host is not None else module_fingerprint(modules[mpath])
        if saved.get("shapes") != here["shapes"]:
            raise StateError(f"{where}: {mpath} has shapes {here['shapes']} here but {saved.get('shapes')} in the "
                             "saved base model (another base model?)")
        if not strict_base:
            continue
        try:
            same = same_weights(saved, here, modules[mpath])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"{where}: the fingerprint of {mpath} in {RECORD} is malformed ({exc})") from None
        if not same:
            raise StateError(f"{where}: {mpath} weights differ from the base model the adapter was trained on "
                             "(another checkpoint?); to load it anyway, ak.load(..., strict_base=False)")


def _own_specs(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The targets whose adapter has a spec of its own (``"specs"`` in the record), each read and checked."""
    own = record.get("specs", {})
    if not isinstance(own, dict) or any(p not in record["targets"] or not isinstance(d, dict) for p, d in own.items()):
        raise StateError(f"{Path(where) / RECORD}: 'specs' must map some of the targets to spec objects")
    return {path: spec_from_dict(data, where=f"{Path(where) / RECORD} (specs of {path})") for path, data in own.items()}


def _check_same_adapter(model: nn.Module, name: str, spec: Any, specs: dict[str, Any], record: dict[str, Any],
                        where: str) -> None:
    found = {path: host.adapter(name).spec for path, _, host in placements(model, name)}
    saved = {path: specs.get(path, spec) for path in record["targets"]}
    if found != saved:
        raise StateError(f"{where}: cannot overwrite adapter {name!r}: the saved one has another spec or targets "
                         f"({spec.to_dict()} at {len(saved)} modules, here {next(iter(found.values())).to_dict()} "
                         f"at {len(found)})")


def _copy_tensors(modules: dict[str, nn.Module], name: str, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                  where: str) -> None:
    """Copy the saved tensors into the adapter at each target and into the saved modules. Every plain tensor is
    checked (present, same shape) before any is copied, so a bad file leaves the saved modules (a head shared with
    the base model) as they were; packed and resizable adapters check their own stored forms as they rebuild."""
    weights_file = Path(where) / str(record.get("weights", ""))
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    rebuilt: list[tuple[str, Any, dict[str, torch.Tensor]]] = []
    for mpath in record["targets"]:
        adapter = _host(modules, mpath).adapter(name)
        prefix = f"adapter.{mpath}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if isinstance(adapter, (Resizable, Packed)):
            rebuilt.append((mpath, adapter, own))
        else:
            copies += _checked_pairs(adapter, own, f"{weights_file}: adapter at {mpath}")
    for mpath in record.get("modules", []):
        if mpath not in modules:
            raise StateError(f"{where}: saved module {mpath!r} does not exist in this model")
        prefix = f"module.{mpath}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        copies += _checked_pairs(modules[mpath], own, f"{weights_file}: module {mpath}", skip_hosts=True)
    for mpath, adapter, own in rebuilt:
        try:
            if isinstance(adapter, Resizable):  # sizes set by training (e.g. a sparse diff's K), not by the spec
                adapter.resize(own)
            if isinstance(adapter, Packed):  # compact stored form (core/protocol.py): the adapter rebuilds itself
                adapter.load_packed(own)
            else:
                copies += _checked_pairs(adapter, own, f"{weights_file}: adapter at {mpath}")
        except (ValueError, KeyError, AdapterKitError) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"{weights_file}: adapter at {mpath}: {exc}") from None
    with torch.no_grad():
        for tensor, value in copies:
            tensor.copy_(value)


def _checked_pairs(module: nn.Module, state: dict[str, torch.Tensor], where: str, skip_hosts: bool = False
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(module tensor, saved value) for every tensor of ``module``'s state, each present with the right shape."""
    expected = {k: v for k, v in module.state_dict().items() if not (skip_hosts and HOST_ATTR in k.split("."))}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise StateError(f"{where}: missing tensors {missing[:3]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise StateError(f"{where}: tensor {key} has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(tensor.shape)}")
    return [(tensor, state[key]) for key, tensor in expected.items()]


def _resolve_name(model: nn.Module, name: str | None) -> str:
    if name is not None:
        placements(model, name)
        return name
    names = adapter_names(model)
    if len(names) != 1:
        raise StateError(f"save: name which adapter to save (attached: {names or 'none'})")
    return names[0]

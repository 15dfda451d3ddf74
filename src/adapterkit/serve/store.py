"""The adapter store: every served adapter in host memory, an LRU set of them attached to the model.

An adapter enters the store from a folder (``adapter.json`` + weights, as ``ak.save`` writes, or a run folder of
``adapterkit train`` holding ``run.json`` and ``adapter/``). Its tensors stay in host memory for as long as it is
loaded; at most ``max_resident`` adapters are attached to the model (on its device) at once, and the least
recently used one is detached to make room. Detaching loses nothing: the host copy is what gets attached again.

Adding the N-th adapter costs the same whatever N is: the entry goes into a dict, the LRU order is an
OrderedDict (O(1) touch and pop), base-model fingerprints are computed once per module path and cached, and an
attach or detach only ever sees the bounded resident set. The stacked weights the batched path builds
(``Host.select_cache``) cover only the adapters of one batch, never the whole store.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError, StateError
from adapterkit.core.host import host_of
from adapterkit.core.registry import spec_from_dict
from adapterkit.inject.engine import attach, detach, set_active
from adapterkit.inject.fingerprint import module_fingerprint
from adapterkit.inject.record import RECORD, read

# Letters, digits, '_' and '-', not starting with a digit: the attach-name rule, and no '/', '.' or '\\', so a
# name can never leave the adapters folder.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
BASE_NAME = "base"  # the request name that runs the bare base model


class BadNameError(AdapterKitError, ValueError):
    """An adapter name that does not match NAME_PATTERN (answered with 400)."""


class UnknownAdapterError(AdapterKitError, KeyError):
    """A name that is not loaded in the store (answered with 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_name(name: object) -> str:
    """``name`` if it is a valid adapter name; BadNameError otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) < 80 else f"{str(name)[:80]}..."
        raise BadNameError(f"adapter name {shown!r} is invalid: use 1-64 letters, digits, '_' or '-', not starting "
                           "with a digit")
    return name


@dataclass
class Entry:
    """One loaded adapter: its record and tensors in host memory, and its saved modules (heads) per path."""

    name: str
    folder: Path
    record: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]  # target path -> adapter state dict
    modules: dict[str, dict[str, torch.Tensor]]  # saved module path (e.g. a head) -> its parameters, on device
    labels: list[str] | None = None  # class names from run.json, when the folder is a training run


class AdapterStore:
    """Adapters by name: all in host memory, up to ``max_resident`` attached (LRU).

    Thread-safe: ``lock`` is held by every change to the model and by whoever runs a batch on it (so no adapter
    is detached under a running forward).
    """

    def __init__(self, model: nn.Module, root: str | Path | None, max_resident: int = 8,
                 strict_base: bool = True) -> None:
        if max_resident < 1:
            raise AdapterKitError(f"max_resident must be at least 1, got {max_resident}")
        self.model = model
        self.root = Path(root) if root is not None else None
        self.max_resident = max_resident
        self.strict_base = strict_base
        self.lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # LRU order: oldest first
        self.stats = {"attached": 0, "detached": 0}
        self._modules = dict(model.named_modules())  # path -> module, taken once (the tree only gains hosts)
        self._fingerprints: dict[str, dict[str, Any]] = {}  # path -> fingerprint of the bare base module
        self._device = next(model.parameters()).device

    def module(self, path: str) -> nn.Module:
        """The model's module at ``path`` (from the table taken once at start)."""
        return self._modules[path]

    # -- loading -----------------------------------------------------------------------------------
    def folder_of(self, name: str) -> Path:
        """The folder ``name`` is loaded from: ``<root>/<name>`` (the name is validated first)."""
        check_name(name)
        if self.root is None:
            raise AdapterKitError("this store has no adapters folder to load from")
        return self.root / name

    def available(self) -> list[str]:
        """Valid names of the adapter folders in the adapters folder (loaded or not)."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME_PATTERN.fullmatch(p.name) and p.name != BASE_NAME and _adapter_dir(p) is not None)

    def load_all(self) -> list[str]:
        """Load every adapter folder under the root; returns their names."""
        names = self.available()
        for name in names:
            if name not in self.entries:
                self.add(name)
        return names

    def add(self, name: str, folder: str | Path | None = None) -> Entry:
        """Read adapter ``name`` (from ``folder``, default ``<root>/<name>``) into host memory and attach it.

        The record, the weights' sha256 and the base model's fingerprint are checked before the model is touched;
        tensors that do not fit the attached adapter undo the attach. A bad folder raises StateError, and nothing
        already loaded is lost (at most one adapter was detached to make room; it stays in host memory).
        """
        check_name(name)
        if name == BASE_NAME:
            raise BadNameError(f"adapter name {BASE_NAME!r} is reserved for the base model")
        if name in self.entries:
            raise AdapterKitError(f"adapter {name!r} is already loaded; unload it first")
        entry = self._read(name, Path(folder) if folder is not None else self.folder_of(name))
        with self.lock:
            if name in self.entries:
                raise AdapterKitError(f"adapter {name!r} is already loaded; unload it first")
            self.entries[name] = entry
            try:
                self._make_resident(name, pinned=())
            except Exception:
                del self.entries[name]
                raise
        return entry

    def remove(self, name: str) -> None:
        """Unload ``name``: detach it if attached and drop it from memory (its files are untouched)."""
        with self.lock:
            self.get(name)
            if name in self.resident:
                self._detach(name)
            del self.entries[name]

    def get(self, name: str) -> Entry:
        """The entry of a loaded adapter; UnknownAdapterError (404) otherwise."""
        check_name(name)
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded (GET /v1/adapters lists the loaded ones)")
        return entry

    # -- residency ---------------------------------------------------------------------------------
    def ensure_resident(self, names: Iterable[str]) -> None:
        """Attach every adapter of ``names`` (at most ``max_resident`` distinct), evicting the least recently
        used others; the caller holds ``lock`` until the batch that needs them has run."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.max_resident:
            raise AdapterKitError(f"a batch needs {len(wanted)} adapters but at most {self.max_resident} can be "
                                  "resident")
        with self.lock:
            for name in wanted:
                self.get(name)
            for name in wanted:
                self._make_resident(name, pinned=wanted)

    def _make_resident(self, name: str, pinned: Iterable[str]) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        keep = set(pinned)
        while len(self.resident) >= self.max_resident:
            victim = next((n for n in self.resident if n not in keep), None)  # oldest first; stops at the first
            if victim is None:
                raise AdapterKitError("no adapter can be evicted: every resident one is needed by this batch")
            self._detach(victim)
        entry = self.entries[name]
        spec = spec_from_dict(entry.record["spec"], where=str(entry.folder / RECORD))
        attach(self.model, name, spec, [f"re:{re.escape(p)}" for p in entry.weights])
        try:
            with torch.no_grad():
                for path, state in entry.weights.items():
                    host = host_of(self._modules[path])
                    assert host is not None  # attach placed one on every target
                    host.adapter(name).load_state_dict(state, strict=True)
        except Exception as exc:
            detach(self.model, name)
            raise StateError(f"{entry.folder}: cannot load its tensors ({str(exc).splitlines()[0]})") from None
        set_active(self.model, [])  # outside a use(...) block the server's model runs the bare base
        self.resident[name] = None
        self.stats["attached"] += 1

    def _detach(self, name: str) -> None:
        detach(self.model, name)
        del self.resident[name]
        self.stats["detached"] += 1

    # -- reading a folder --------------------------------------------------------------------------
    def _read(self, name: str, folder: Path) -> Entry:
        adapter_dir = _adapter_dir(folder)
        if adapter_dir is None:
            raise StateError(f"{folder}: no {RECORD} (nor run.json with adapter/{RECORD}); not an adapter folder")
        record, tensors = read(adapter_dir)
        spec_from_dict(record["spec"], where=str(adapter_dir / RECORD))  # unknown method: fail now, not at attach
        weights: dict[str, dict[str, torch.Tensor]] = {path: {} for path in record["targets"]}
        for path in record["targets"]:
            self._check_base(adapter_dir, path, record["fingerprint"].get(path))
        modules: dict[str, dict[str, torch.Tensor]] = {path: {} for path in record.get("modules", [])}
        for key, tensor in tensors.items():
            kind, _, rest = key.partition(".")
            owner = _owner(rest, weights if kind == "adapter" else modules)
            if kind not in ("adapter", "module") or owner is None:
                raise StateError(f"{adapter_dir}: tensor {key!r} belongs to no saved target or module")
            (weights if kind == "adapter" else modules)[owner][rest[len(owner) + 1:]] = tensor
        for path, state in modules.items():
            if path not in self._modules:
                raise StateError(f"{adapter_dir}: saved module {path!r} does not exist in this model")
            modules[path] = {k: v.to(self._device) for k, v in state.items()}
        labels = None
        run_file = folder / "run.json"
        if adapter_dir != folder and run_file.is_file():
            try:
                labels = [str(label) for label in json.loads(run_file.read_text()).get("labels") or []] or None
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise StateError(f"{run_file}: invalid JSON ({exc})") from None
        return Entry(name, adapter_dir, record, weights, modules, labels)

    def _check_base(self, where: Path, path: str, saved: dict[str, Any] | None) -> None:
        module = self._modules.get(path)
        if module is None:
            raise StateError(f"{where}: adapter targets {path!r}, which this model does not have (another base?)")
        here = self._fingerprints.get(path)
        if here is None:
            here = self._fingerprints[path] = module_fingerprint(module)  # skips adapters: the bare base's
        if saved is None or saved.get("shapes") != here["shapes"]:
            raise StateError(f"{where}: {path} has shapes {here['shapes']} here but "
                             f"{(saved or {}).get('shapes')} in the saved base model (another base model?)")
        if self.strict_base and saved.get("hash") != here["hash"]:
            raise StateError(f"{where}: {path} weights differ from the base model the adapter was trained on")

    # -- listing -----------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """One JSON-ready row per loaded adapter, in load order."""
        return [{"id": name, "object": "model", "method": entry.record["spec"].get("method"),
                 "resident": name in self.resident, "targets": len(entry.weights),
                 "modules": sorted(entry.modules), "labels": entry.labels}
                for name, entry in self.entries.items()]


def _adapter_dir(folder: Path) -> Path | None:
    if (folder / RECORD).is_file():
        return folder
    if (folder / "run.json").is_file() and (folder / "adapter" / RECORD).is_file():
        return folder / "adapter"
    return None


def _owner(rest: str, groups: dict[str, Any]) -> str | None:
    """The path in ``groups`` that prefixes ``rest`` (a tensor key after its kind), longest first."""
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in groups:
            return candidate
    return None

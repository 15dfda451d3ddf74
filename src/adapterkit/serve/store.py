"""The adapter store: every served adapter in host memory, an LRU set of them attached to the model.

An adapter enters the store from a folder (``adapter.json`` + weights, as ``ak.save`` writes, or a run folder of
``adapterkit train`` holding ``run.json`` and ``adapter/``). The folder is read once; its record and tensors stay in
host memory for as long as it is loaded. At most ``max_resident`` adapters are attached to the model (on its device)
at once, and the least recently used one is detached to make room. Attaching goes through the library's one load
path (``inject.state.attach_saved``, which rebuilds packed and resized forms exactly as ``ak.load`` does) from the
host copy, so detaching loses nothing and re-attaching reads nothing from disk. The base model's fingerprint is
checked once, when the adapter is added.

Modules saved beside an adapter (a classification head, an output layer) are not loaded into the shared model: the
store keeps their parameters on the device and the runners apply them to that adapter's rows only.

Adding the N-th adapter costs the same whatever N is: the entry goes into a dict, the LRU order is an OrderedDict
(O(1) touch and pop), and an attach or detach only ever sees the bounded resident set.
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
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.registry import spec_from_dict
from adapterkit.inject.engine import detach, set_active
from adapterkit.inject.record import RECORD, read
from adapterkit.inject.state import attach_saved

# Letters, digits, '_' and '-', not starting with a digit: the attach-name rule, and no '/', '.' or '\\', so a
# name can never leave the adapters folder.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
BASE_NAME = "base"  # the request name that runs the bare base model


class BadNameError(AdapterKitError, ValueError):
    """An adapter name that does not match NAME_PATTERN (answered with 400)."""


class NotFoundError(AdapterKitError):
    """Something a request names does not exist (answered with 404)."""


class UnknownAdapterError(NotFoundError, KeyError):
    """A name that is not loaded in the store (answered with 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingFolderError(NotFoundError):
    """No folder of that name under the adapters folder (answered with 404)."""


class AlreadyLoadedError(AdapterKitError):
    """A name that is loaded already (answered with 409)."""


def check_name(name: object) -> str:
    """``name`` if it is a valid adapter name; BadNameError otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) < 80 else f"{str(name)[:80]}..."
        raise BadNameError(f"adapter name {shown!r} is invalid: use 1-64 letters, digits, '_' or '-', not starting "
                           "with a digit")
    return name


@dataclass
class Entry:
    """One loaded adapter: its record and adapter tensors in host memory, its saved modules (heads) on the device."""

    name: str
    folder: Path  # the folder holding adapter.json
    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # the "adapter.*" tensors, as read: what every attach starts from
    modules: dict[str, dict[str, torch.Tensor]]  # saved module path (e.g. a head) -> its parameters, on device
    labels: list[str] | None = None  # class names from run.json, when the folder is a training run
    recipe: dict[str, Any] | None = None  # the combination it was built from (serve.recipes); folder: its 1st source's


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

        The record, the weights' sha256 and the base model's fingerprint are checked before the model keeps
        anything; tensors that do not fit undo the attach. A missing folder raises MissingFolderError, a bad one
        StateError, a name loaded already AlreadyLoadedError; nothing already loaded is lost (at most one adapter
        was detached to make room, and it stays in host memory).
        """
        check_name(name)
        if name == BASE_NAME:
            raise BadNameError(f"adapter name {BASE_NAME!r} is reserved for the base model")
        self.check_new(name)
        return self.insert(self._read(name, Path(folder) if folder is not None else self.folder_of(name)),
                           check_base=True)

    def insert(self, entry: Entry, check_base: bool = False) -> Entry:
        """Keep ``entry`` (read from a folder, or built by serve.recipes) and attach it; undone if that fails."""
        with self.lock:
            self.check_new(entry.name)
            self.entries[entry.name] = entry
            try:
                self._make_resident(entry.name, pinned=(), check_base=check_base)
            except Exception:
                del self.entries[entry.name]
                raise
        return entry

    def check_new(self, name: str) -> None:
        """AlreadyLoadedError if ``name`` is loaded."""
        if name in self.entries:
            raise AlreadyLoadedError(f"adapter {name!r} is already loaded; unload it first "
                                     f"(DELETE /v1/adapters/{name})")

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

    def _make_resident(self, name: str, pinned: Iterable[str], check_base: bool = False) -> None:
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
        # The saved modules are served per row (runners.py), never copied into the shared model: the record
        # handed to the load path lists none.
        attach_saved(self.model, {**entry.record, "modules": []}, entry.tensors, name=name,
                     strict_base=self.strict_base, where=str(entry.folder), check_base=check_base)
        set_active(self.model, [])  # outside a use(...) block the server's model runs the bare base
        self.resident[name] = None
        self.stats["attached"] += 1

    def _detach(self, name: str) -> None:
        detach(self.model, name)
        del self.resident[name]
        self.stats["detached"] += 1

    # -- reading a folder --------------------------------------------------------------------------
    def _read(self, name: str, folder: Path) -> Entry:
        if not folder.exists():
            raise MissingFolderError(f"{folder}: no such adapter folder")
        adapter_dir = _adapter_dir(folder)
        if adapter_dir is None:
            raise StateError(f"{folder}: no {RECORD} (nor run.json with adapter/{RECORD}); not an adapter folder")
        try:
            record, tensors = read(adapter_dir)
        except AdapterKitError:
            raise
        except Exception as exc:  # the folder came from a request: whatever it holds is bad input, not a crash
            raise StateError(f"{adapter_dir}: cannot read ({type(exc).__name__}: {_first_line(exc)})") from None
        spec = spec_from_dict(record["spec"], where=str(adapter_dir / RECORD))
        if spec.role:
            raise StateError(f"{adapter_dir}: holds a combiner for {spec.role!r} blocks, which runs only inside "
                             "its block; the server serves adapters that run on their own")
        if spec.rewrites_call:
            raise StateError(f"{adapter_dir}: {spec.method} rewrites a module's whole call (its inputs, KV cache or "
                             "output), the same for every row of a batch, so it cannot be chosen per request; serve "
                             "it with transformers' generate on its own model")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for path in record.get("modules", []):
            module = self._modules.get(path)
            if module is None:
                raise StateError(f"{adapter_dir}: saved module {path!r} does not exist in this model")
            prefix = f"module.{path}."
            state = {k[len(prefix):]: v.to(self._device) for k, v in tensors.items() if k.startswith(prefix)}
            own = sorted(k for k in module.state_dict() if HOST_ATTR not in k.split("."))
            if sorted(state) != own:  # widths may differ (a head of other labels), names may not
                raise StateError(f"{adapter_dir}: saved module {path!r} holds tensors {sorted(state)[:4]}, but this "
                                 f"model's {path} has {own[:4]}")
            modules[path] = state
        return Entry(name, adapter_dir, record, {k: v for k, v in tensors.items() if k.startswith("adapter.")},
                     modules, _labels(folder, adapter_dir))

    # -- listing -----------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """One JSON-ready row per loaded adapter, in load order."""
        return [{"id": name, "object": "model", "method": entry.record["spec"].get("method"),
                 "resident": name in self.resident, "targets": len(entry.record["targets"]),
                 "modules": sorted(entry.modules), "labels": entry.labels,
                 **({"recipe": entry.recipe} if entry.recipe is not None else {})}
                for name, entry in self.entries.items()]


def _adapter_dir(folder: Path) -> Path | None:
    if (folder / RECORD).is_file():
        return folder
    if (folder / "run.json").is_file() and (folder / "adapter" / RECORD).is_file():
        return folder / "adapter"
    return None


def _labels(folder: Path, adapter_dir: Path) -> list[str] | None:
    """Class names from a run folder's run.json (``labels``), if the folder is a training run."""
    run_file = folder / "run.json"
    if adapter_dir == folder or not run_file.is_file():
        return None
    try:
        labels = json.loads(run_file.read_bytes().decode("utf-8")).get("labels") or []
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError) as exc:
        raise StateError(f"{run_file}: invalid JSON or not an object ({_first_line(exc)})") from None
    if not isinstance(labels, list):
        raise StateError(f"{run_file}: labels must be a list of class names, got {type(labels).__name__}")
    return [str(label) for label in labels] or None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

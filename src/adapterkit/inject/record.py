"""The stored form of a saved adapter: ``adapter.json`` (the record) and the safetensors file it names, read and
verified. Anything missing, truncated, corrupt, of the wrong type or newer than this version is a ``StateError``
naming the file, so the loader can trust every key it reads:

    format_version  int, 1..FORMAT_VERSION          name     str, a valid adapter name
    spec            object with a registered "method"  targets  non-empty list of distinct module paths (str)
    modules         list of str (absent: [])        fingerprint  object with an entry per target ("shapes": ...)
    weights         a plain file name in the same folder (never a path: a record must not make us read elsewhere)
    weights_sha256  64 lowercase hex digits

Unknown extra keys are tolerated (a newer adapterkit may add some). The spec's own fields are checked when the loader
builds it (``spec_from_dict(..., where=<this file>)``), which names this file too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from adapterkit.core.errors import AdapterKitError, StateError
from adapterkit.core.registry import spec_class

FORMAT_VERSION = 1
RECORD = "adapter.json"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,127}")  # the adapter names engine.attach accepts
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record and tensors of a saved adapter, verified (missing, truncated, corrupt or newer -> StateError)."""
    folder = Path(path)
    record = read_record(folder)
    weights = folder / record["weights"]
    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise StateError(f"{folder}: weights file {weights.name!r} named in {RECORD} is missing") from None
    except OSError as exc:
        raise StateError(f"{weights}: cannot read the weights file named in {RECORD} "
                         f"({exc.strerror or type(exc).__name__})") from None
    if hashlib.sha256(blob).hexdigest() != record["weights_sha256"]:
        raise StateError(f"{weights}: contents do not match the sha256 in {RECORD} (truncated or corrupted file)")
    try:
        tensors = load_bytes(blob)
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateError(f"{weights}: not a valid safetensors file ({_first_line(exc)})") from None
    return record, tensors


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the same for the same tensors whatever
    file holds them, so a file format without a checksum of its own can carry one in its header."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_record(folder: Path) -> dict[str, Any]:
    """``adapter.json`` in ``folder``, parsed and checked key by key (see the module docstring)."""
    file = folder / RECORD
    if not file.exists():
        raise StateError(f"{folder}: no {RECORD} here; is this an adapterkit adapter directory?")
    try:
        record = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StateError(f"{file}: invalid JSON ({_first_line(exc)})") from None
    except OSError as exc:  # e.g. a directory where the file should be
        raise StateError(f"{file}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise StateError(f"{file}: must hold a JSON object, got a JSON {_json_type(record)}")
    for key in ("format_version", "name", "spec", "targets", "fingerprint", "weights", "weights_sha256"):
        if key not in record:
            raise StateError(f"{file}: missing key {key!r}")
    version = record["format_version"]
    _expect(file, "format_version", version, isinstance(version, int) and not isinstance(version, bool),
            "an integer")
    if version > FORMAT_VERSION:
        raise StateError(f"{file}: format_version {version!r} is newer than this adapterkit reads "
                         f"({FORMAT_VERSION}); upgrade adapterkit")
    _expect(file, "format_version", version, version >= 1, "at least 1")
    _expect(file, "name", record["name"], isinstance(record["name"], str) and bool(_NAME.fullmatch(record["name"])),
            "an adapter name (letters, digits, '_' or '-', not starting with a digit)")
    _check_spec(file, record["spec"])
    targets = record["targets"]
    _expect(file, "targets", targets, _str_list(targets, root=True) and len(targets) > 0,
            "a non-empty list of module paths")
    _expect(file, "targets", targets, len(set(targets)) == len(targets), "a list without repeats")
    record.setdefault("modules", [])  # records without extra modules may omit the key
    _expect(file, "modules", record["modules"], _str_list(record["modules"]), "a list of module paths")
    _check_fingerprint(file, record["fingerprint"], targets)
    weights = record["weights"]
    _expect(file, "weights", weights, isinstance(weights, str) and _plain_name(weights),
            "a plain file name in this folder (no path separators or '..')")
    _expect(file, "weights_sha256", record["weights_sha256"],
            isinstance(record["weights_sha256"], str) and bool(_SHA256.fullmatch(record["weights_sha256"])),
            "64 lowercase hex digits")
    return record


def _check_spec(file: Path, spec: Any) -> None:
    _expect(file, "spec", spec, isinstance(spec, dict), "a JSON object")
    method = spec.get("method")
    _expect(file, "spec.method", method, isinstance(method, str), "a method name")
    try:
        spec_class(method)
    except AdapterKitError as exc:  # unknown method: the registry's did-you-mean message, with the file
        raise StateError(f"{file}: {exc}") from None


def _check_fingerprint(file: Path, fingerprint: Any, targets: list[str]) -> None:
    _expect(file, "fingerprint", fingerprint, isinstance(fingerprint, dict), "a JSON object")
    for target in targets:
        if target not in fingerprint:
            raise StateError(f"{file}: fingerprint has no entry for target {target!r}")
        entry, where = fingerprint[target], f"fingerprint[{target!r}]"
        _expect(file, where, entry, isinstance(entry, dict), "a JSON object")
        shapes = entry.get("shapes")
        _expect(file, f"{where}.shapes", shapes, isinstance(shapes, dict) and all(
            isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes.values()), "an object of shapes (lists of sizes)")
        _expect(file, where, entry, "samples" in entry or "hash" in entry, "an entry with 'samples' or 'hash'")
        for key, kinds in (("hash", (str,)), ("samples", (str,)), ("dtypes", (str,)), ("scales", (int, float))):
            if key not in entry:
                continue
            value = entry[key]
            ok = isinstance(value, str) if key == "hash" else isinstance(value, dict) and all(
                isinstance(v, kinds) and not isinstance(v, bool) for v in value.values())
            _expect(file, f"{where}.{key}", value, ok, "a string" if key == "hash" else "an object of "
                    + ("numbers" if key == "scales" else "strings"))


def _expect(file: Path, key: str, value: Any, ok: bool, wanted: str) -> None:
    if not ok:
        shown = json.dumps(value) if _json_type(value) != "object" else "{...}"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise StateError(f"{file}: {key} must be {wanted}, got {_json_type(value)} {shown}")


def _str_list(value: Any, root: bool = False) -> bool:
    """A list of module paths; ``root``: "" (the model itself, where prompt / prefix methods sit) is one too."""
    return isinstance(value, list) and all(isinstance(item, str) and (item or root) for item in value)


def _plain_name(name: str) -> bool:
    return bool(name) and ".." not in name and not any(sep in name for sep in ("/", "\\", "\x00", os.sep)) \
        and name != "."


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""The stored form of a saved adapter: ``adapter.json`` (the record) and the safetensors file it names, read and
verified. Anything missing, truncated, corrupt, of the wrong type or newer than this version is a ``StateError``
naming the file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from adapterkit.core.errors import StateError

FORMAT_VERSION = 1
RECORD = "adapter.json"


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record and tensors of a saved adapter, verified (missing, truncated, corrupt or newer -> StateError)."""
    folder = Path(path)
    record = _read_record(folder)
    weights = folder / str(record.get("weights", ""))
    try:
        blob = weights.read_bytes()
    except OSError:
        raise StateError(f"{folder}: weights file {weights.name!r} named in {RECORD} is missing") from None
    if hashlib.sha256(blob).hexdigest() != record.get("weights_sha256"):
        raise StateError(f"{weights}: contents do not match the sha256 in {RECORD} (truncated or corrupted file)")
    try:
        tensors = load_bytes(blob)
    except (SafetensorError, ValueError) as exc:
        raise StateError(f"{weights}: not a valid safetensors file ({exc})") from None
    return record, tensors


def _read_record(folder: Path) -> dict[str, Any]:
    file = folder / RECORD
    if not file.is_file():
        raise StateError(f"{folder}: no {RECORD} here; is this an adapterkit adapter directory?")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{file}: invalid JSON ({exc})") from None
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateError(f"{file}: format_version {version!r} is newer than this adapterkit reads "
                         f"({FORMAT_VERSION}); upgrade adapterkit")
    for key in ("spec", "targets", "fingerprint", "weights"):
        if key not in record:
            raise StateError(f"{file}: missing key {key!r}")
    return record

"""The damage that tests/inject/test_corruption.py does to saved files, and the outcome each must have.

A case is ``apply(folder, pristine) -> outcome``: it damages the copy in ``folder`` and returns what loading it must
do: "error" (an AdapterKitError), "load" (and give the saved outputs), "load:new" (the newer of two saves),
"load:any" (load, outputs not compared) or "either" (the format cannot tell this damage from a real save). Byte-level
damage asks an oracle: a file whose parsed content did not change must load; a change the file guards (a checksum over
every byte, over its tensors, or over all its content) must be refused; anything else is "either". Seeded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st

Apply = Callable[[Path, Path], str]
WRONG: list[Any] = [None, True, 7, "x", [], {}]  # a value of every JSON type
# subject -> file role -> (file name, "json" or "st", what the format guards: "bytes", "all", "tensors" or "none")
FILES = {"ak": {"record": ("adapter.json", "json", "none"), "weights": ("", "st", "bytes")},
         "peft_ours": {"config": ("adapter_config.json", "json", "none"),
                       "weights": ("adapter_model.safetensors", "st", "tensors")},
         "peft_theirs": {"config": ("adapter_config.json", "json", "none"),
                         "weights": ("adapter_model.safetensors", "st", "none")},
         "ckpt": {"checkpoint": ("checkpoint.safetensors", "st", "all")}}


def file_of(folder: Path, subject: str, role: str) -> Path:
    """The file with ``role`` in ``folder`` (an ak adapter's weights: the one its record names)."""
    name = FILES[subject][role][0] or json.loads((folder / "adapter.json").read_text())["weights"]
    return folder / name


def jtype(value: Any) -> str:
    return "number" if type(value) in (int, float) else type(value).__name__


def st_header(blob: bytes) -> dict[str, Any]:
    return json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


def oracle(kind: str, guard: str, old: bytes, new: bytes) -> str:
    """What loading a file changed from ``old`` to ``new`` bytes must do."""
    if new == old:
        return "load"
    if guard == "bytes":
        return "error"
    try:
        if kind == "json":
            same, same_meta = json.loads(old) == json.loads(new), True
        else:
            same = same_tensors(load_st(old), load_st(new))
            same_meta = st_header(old).get("__metadata__") == st_header(new).get("__metadata__")
    except Exception:  # noqa: BLE001 - no longer parses: it must be refused
        return "error"
    if same and same_meta:
        return "load"
    return "error" if guard == "all" or (guard == "tensors" and not same) else "either"


def generic(subject: str, role: str) -> list[tuple[str, Apply]]:
    """Truncations, seeded byte flips (JSON; safetensors length prefix, header and data), the file missing or a
    folder in its place, and (JSON) a top level of another type."""
    _, kind, guard = FILES[subject][role]
    cuts: list[Any] = [0, 1, 0.5, -1] if kind == "json" else [0, 1, 7, 8, 9, "h-1", "h", "h+1", 0.25, 0.5, -1]
    flips = [("any", i) for i in range(10)] if kind == "json" else \
        [("len", i) for i in range(3)] + [(r, i) for r in ("header", "data") for i in range(10)]

    def bytewise(edit: Callable[[bytes], bytes]) -> Apply:
        def apply(folder: Path, _: Path) -> str:
            file = file_of(folder, subject, role)
            old = file.read_bytes()
            file.write_bytes(new := edit(old))
            return oracle(kind, guard, old, new)
        return apply

    def cut(at: Any) -> Callable[[bytes], bytes]:
        def edit(b: bytes) -> bytes:
            end = 8 + int.from_bytes(b[:8], "little") if kind == "st" else 0
            where = {"h-1": end - 1, "h": end, "h+1": end + 1}.get(str(at), at)
            return b[:-1] if where == -1 else b[:int(where * len(b)) if isinstance(where, float) else where]
        return edit

    def flip(region: str, seed: int) -> Callable[[bytes], bytes]:
        def edit(b: bytes) -> bytes:
            rng, end = random.Random(f"{subject}/{role}/{region}/{seed}"), 8 + int.from_bytes(b[:8], "little")
            low, high = {"any": (0, len(b)), "len": (0, 8), "header": (8, end), "data": (end, len(b))}[region]
            at = rng.randrange(low, high)
            return b[:at] + bytes([b[at] ^ rng.randrange(1, 256)]) + b[at + 1:]
        return edit

    def replace(by: str) -> Apply:
        def apply(folder: Path, _: Path) -> str:
            file = file_of(folder, subject, role)
            file.unlink()
            if by == "directory":
                file.mkdir()
            return "error"
        return apply

    cases = [(f"cut@{c}", bytewise(cut(c))) for c in cuts] + [(f"flip-{r}{i}", bytewise(flip(r, i))) for r, i in flips]
    cases += [(by, replace(by)) for by in ("missing", "directory")]
    if kind == "json":
        cases += [(f"top-{jtype(v)}", bytewise(lambda _, v=v: json.dumps(v).encode())) for v in ([1], "x", 3, None)]
    return [(f"{subject}-{role}-{name}", apply) for name, apply in cases]


def json_edit(subject: str, role: str, edit: Callable[[Any], Any], outcome: str) -> Apply:
    """Parse the file, ``edit`` it in place (or return a replacement), write it back."""
    def apply(folder: Path, _: Path) -> str:
        file = file_of(folder, subject, role)
        data = json.loads(file.read_text())
        result = edit(data)
        file.write_text(json.dumps(data if result is None else result))
        return outcome
    return apply


def setter(path: tuple, value: Any) -> Callable[[Any], None]:
    """Set (``value`` KeyError: delete) the key at ``path``; "other" is an entry's first key after "shapes"."""
    def edit(data: Any) -> None:
        for key in path[:-1]:
            data = data[key]
        last = sorted(k for k in data if k != "shapes")[0] if path[-1] == "other" else path[-1]
        if value is KeyError:
            del data[last]
        else:
            data[last] = value
    return edit


def wrong_types(label: str, make: Callable[[Callable[[Any], None], str], Apply], paths: dict[tuple, Any],
                missing: dict[tuple, str] | None = None, skip: tuple[tuple, ...] = ()) -> list[tuple[str, Apply]]:
    """Each key at ``paths`` (path -> a value of its type) set to every other JSON type (refused; a key in ``skip``
    may also be null) and removed (refused unless ``missing`` says otherwise). ``make(edit, outcome)`` makes a case
    of an edit of the parsed JSON."""
    cases = []
    for path, like in paths.items():
        name = f"{label}-" + ".".join(map(str, path))
        for value in WRONG:
            if jtype(value) != jtype(like) and not (value is None and path in skip):
                cases.append((f"{name}={jtype(value)}", make(setter(path, value), "error")))
        cases.append((f"{name}-missing", make(setter(path, KeyError), (missing or {}).get(path, "error"))))
    return cases


def st_edit(subject: str, role: str, edit: Callable[[dict[str, torch.Tensor]], Any], outcome: str,
            meta: Callable[[dict[str, str], dict[str, torch.Tensor]], dict[str, str] | None] = (
                lambda m, t: {"format": "pt"})) -> Apply:
    """Rewrite the tensors (``edit`` changes them in place or returns raw bytes) with the header ``meta`` makes of
    the old one and the new tensors, and re-sign an ak record, as a buggy writer would: only the structure checks
    can tell."""
    def apply(folder: Path, pristine: Path) -> str:
        file = file_of(folder, subject, role)
        blob = file.read_bytes()
        tensors = load_st(blob)
        result = edit(tensors)
        new = result if isinstance(result, bytes) else save_st(tensors, metadata=meta(
            st_header(blob).get("__metadata__") or {}, tensors))
        file.write_bytes(new)
        if subject == "ak":
            json_edit("ak", "record", lambda r: r.update(weights_sha256=hashlib.sha256(new).hexdigest()), "")(
                folder, pristine)
        return outcome
    return apply


def killed(subject: str, steps: Callable[[Path, Path], None], outcome: str) -> Apply:
    """The folder as a save killed part-way leaves it: ``steps(folder, newer)`` copies in what the newer save had
    written by then (``newer`` is that save's complete folder)."""
    def apply(folder: Path, pristine: Path) -> str:
        steps(folder, pristine.parent / f"{subject}-new")
        return outcome
    return apply

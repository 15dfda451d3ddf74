"""Bad input gets a clear one-line error naming what is wrong and where; nothing saved is lost."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Literal

import pytest
import torch

import adapterkit as ak
from adapterkit.core.registry import spec_class
from adapterkit.core.spec import AdapterSpec, require
from tests.conftest import logits, make_tiny, randomize, tokens


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(ak.UnknownMethodError) as exc:
        spec_class("lorra")
    assert "lorra" in one_line(exc) and "did you mean lora" in one_line(exc)


def test_targets_matching_nothing_name_the_closest_modules() -> None:
    model = make_tiny("bert")
    with pytest.raises(ak.TargetError) as exc:
        ak.attach(model, "a", ak.LoRA(), targets=["querry"])
    assert "match no module" in one_line(exc) and "query" in one_line(exc)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank) -> None:
    with pytest.raises(ak.SpecError) as exc:
        ak.LoRA(r=rank)
    assert "rank" in one_line(exc)


@pytest.mark.parametrize("make,field", [
    (lambda: ak.LoRA(alpha="x"), "alpha"), (lambda: ak.LoRA(r=True), "r"), (lambda: ak.LoRA(r=2.0), "r"),
    (lambda: ak.LoRA(dropout=True), "dropout"), (lambda: ak.DoRA(scaling=3), "scaling"),
    (lambda: ak.compose.XLoRA(hidden_size=32, top_k="2"), "top_k"), (lambda: ak.methods.LowBit(base=3), "base"),
], ids=["float-str", "int-bool", "int-float", "float-bool", "str-int", "optional", "nested-spec"])
def test_spec_fields_are_checked_against_their_annotations(make, field) -> None:
    with pytest.raises(ak.SpecError) as exc:
        make()
    assert f"field {field} must be" in one_line(exc)


@dataclasses.dataclass(frozen=True)
class Shapes(AdapterSpec):
    """A spec with every annotation form the base class checks."""

    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, float] = (1, 2.0)
    limit: float | None = None

    def __post_init__(self) -> None:  # compares: a TypeError without the type check that runs first
        require(self.limit is None or self.limit > 0, "shapes: limit must be > 0")


@pytest.mark.parametrize("fields,wanted", [
    ({"kind": "c"}, "kind must be one of ('a', 'b')"), ({"sizes": (1, "x")}, "sizes must be a tuple of an int"),
    ({"pair": (1,)}, "pair must be a tuple (an int, a number)"), ({"limit": "x"}, "limit must be a number or None"),
    ({"sizes": 3}, "sizes must be a tuple"), ({"kind": None}, "kind must be one of"),
])
def test_every_annotation_form_is_checked(fields, wanted) -> None:
    with pytest.raises(ak.SpecError) as exc:
        Shapes(**fields)
    assert one_line(exc).startswith(f"Shapes: field {wanted}")


def test_good_values_pass_and_lists_become_tuples() -> None:
    spec = Shapes(kind="b", sizes=[2, 3], pair=[4, 5], limit=1)  # an int is a fine float
    assert spec.sizes == (2, 3) and spec.pair == (4, 5) and hash(spec)
    assert ak.LoRA(alpha=16) == ak.LoRA(alpha=16.0)
    assert ak.spec_from_dict(ak.methods.LowBit(base=ak.LoRA(r=2)).to_dict()) == ak.methods.LowBit(base=ak.LoRA(r=2))
    with pytest.raises(ak.SpecError) as exc:
        ak.spec_from_dict({"method": "lora", "r": "2"}, where="saved/adapter.json")
    assert one_line(exc).startswith("saved/adapter.json: lora: field r must be an int")


def test_rank_larger_than_the_layer_allows() -> None:
    model = make_tiny("bert")  # hidden size 32
    with pytest.raises(ak.TargetError) as exc:
        ak.attach(model, "a", ak.LoRA(r=64), targets=["query"])
    assert "rank 64 exceeds" in one_line(exc) and "query" in one_line(exc)
    assert ak.adapters(model) == []  # validated before anything was attached


def test_name_already_used_and_invalid_names() -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.LoRA(r=2), targets=["query"])
    with pytest.raises(ak.NameInUseError) as exc:
        ak.attach(model, "a", ak.IA3(), targets=["key"])
    assert "already attached" in one_line(exc)
    for bad in ("a.b", "", "1x", "x/y"):
        with pytest.raises(ak.NameInUseError):
            ak.attach(model, bad, ak.LoRA(r=2), targets=["value"])


def test_method_that_cannot_adapt_a_module_type() -> None:
    model = make_tiny("bert")
    with pytest.raises(ak.TargetError) as exc:
        ak.attach(model, "a", ak.LoRA(), targets=["LayerNorm"])
    assert "LayerNorm" in one_line(exc)


def _saved(tmp_path, kind="bert"):
    model = make_tiny(kind)
    ak.attach(model, "a", ak.LoRA(r=2), targets=["query", "value"])
    randomize(model, "a")
    ak.save(model, tmp_path / "ad")
    return model


def test_loading_onto_a_different_base_model(tmp_path) -> None:
    _saved(tmp_path)
    other_weights = make_tiny("bert", seed=5)  # same shapes, other weights
    with pytest.raises(ak.StateError) as exc:
        ak.load(other_weights, tmp_path / "ad")
    assert "differ from the base model" in one_line(exc)
    assert ak.adapters(other_weights) == []
    ak.load(other_weights, tmp_path / "ad", strict_base=False)  # explicit override
    other_arch = make_tiny("llama")
    with pytest.raises(ak.StateError) as exc:
        ak.load(other_arch, tmp_path / "ad")
    assert "does not have" in one_line(exc)


def test_truncated_and_corrupted_weights(tmp_path) -> None:
    _saved(tmp_path)
    record = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    weights = tmp_path / "ad" / record["weights"]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert "truncated or corrupted" in one_line(exc)
    weights.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(ak.StateError):
        ak.load(make_tiny("bert"), tmp_path / "ad")
    # a file whose checksum matches but is not safetensors at all
    import hashlib

    weights.write_bytes(b"not a safetensors file")
    record["weights_sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(record))
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert "not a valid safetensors" in one_line(exc)


def test_unknown_spec_keys_warn_then_load(tmp_path) -> None:
    model = _saved(tmp_path)
    path = tmp_path / "ad" / "adapter.json"
    record = json.loads(path.read_text())
    record["spec"]["future_option"] = 3
    path.write_text(json.dumps(record))
    fresh = make_tiny("bert")
    with pytest.warns(UserWarning, match="future_option"):
        ak.load(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_newer_format_version_and_bad_json(tmp_path) -> None:
    _saved(tmp_path)
    path = tmp_path / "ad" / "adapter.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert "newer" in one_line(exc)
    path.write_text("{not json")
    with pytest.raises(ak.StateError, match="invalid JSON"):
        ak.load(make_tiny("bert"), tmp_path / "ad")
    with pytest.raises(ak.StateError, match="no adapter.json"):
        ak.load(make_tiny("bert"), tmp_path / "nowhere")


@pytest.mark.parametrize("damage,wanted", [
    (lambda r: r.pop("name"), "missing key 'name'"),
    (lambda r: r["fingerprint"].pop(r["targets"][1]), "fingerprint has no entry for target"),
    (lambda r: r["spec"].update(method=7), "spec.method must be a method name"),
    (lambda r: r.update(targets="query"), "targets must be a non-empty list"),
    (lambda r: r.update(modules=[3]), "modules must be a list of module paths"),
    (lambda r: r.update(weights_sha256=None), "weights_sha256 must be 64 lowercase hex digits"),
    (lambda r: r.update(format_version="1"), "format_version must be an integer"),
    (lambda r: r["fingerprint"].update({r["targets"][0]: [1]}), "must be a JSON object, got array"),
], ids=["no-name", "fingerprint-target", "method-type", "targets-str", "modules-int", "sha-null", "version-str",
        "fingerprint-entry"])
def test_record_keys_of_the_wrong_type_are_one_line_errors(damage, wanted, tmp_path) -> None:
    _saved(tmp_path)
    path = tmp_path / "ad" / "adapter.json"
    record = json.loads(path.read_text())
    damage(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert one_line(exc).startswith(f"{path}: ") and wanted in one_line(exc)


def test_a_record_that_is_a_json_list(tmp_path) -> None:
    _saved(tmp_path)
    (tmp_path / "ad" / "adapter.json").write_text("[1, 2]")
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert "adapter.json: must hold a JSON object, got a JSON array" in one_line(exc)


@pytest.mark.parametrize("where", ["../elsewhere/{}", "{abs}", "sub/{}", "..", ""])
def test_a_record_never_makes_us_read_outside_its_folder(where, tmp_path) -> None:
    """The weights named are a valid copy (right sha256) outside the folder: refused by name, never read."""
    _saved(tmp_path)
    path = tmp_path / "ad" / "adapter.json"
    record = json.loads(path.read_text())
    for folder in (tmp_path / "elsewhere", tmp_path / "ad" / "sub"):
        folder.mkdir()
        (folder / record["weights"]).write_bytes((tmp_path / "ad" / record["weights"]).read_bytes())
    (tmp_path / "ad" / record["weights"]).unlink()
    outside = str(tmp_path / "elsewhere" / record["weights"])
    path.write_text(json.dumps({**record, "weights": where.format(record["weights"], abs=outside)}))
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), tmp_path / "ad")
    assert "weights must be a plain file name in this folder" in one_line(exc)
    assert hashlib.sha256((tmp_path / "elsewhere" / record["weights"]).read_bytes()).hexdigest() == \
        record["weights_sha256"]  # it would have loaded, had we followed the path


def test_unknown_adapter_names_in_api_calls() -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.LoRA(r=2), targets=["query"])
    for call in (lambda: ak.merge(model, "b"), lambda: ak.detach(model, "b"), lambda: ak.activate(model, "b"),
                 lambda: ak.train_only(model, "b")):
        with pytest.raises(ak.NameInUseError, match="no adapter named 'b'"):
            call()


def test_save_into_an_unwritable_place(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.LoRA(r=2), targets=["query"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ak.StateError) as exc:
        ak.save(model, blocker / "ad")
    assert "cannot write" in one_line(exc)


KILLER = textwrap.dedent("""
    import sys, torch, adapterkit as ak
    sys.path.insert(0, {root!r})
    from tests.conftest import make_tiny
    model = make_tiny("bert")
    ak.attach(model, "a", ak.LoRA(r=2), targets=["query", "value"])
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.dim() == 2 and p.shape[0] == 2:
                    p.fill_(float(step))
        ak.save(model, {path!r})
""")


def test_a_killed_save_leaves_a_loadable_adapter(tmp_path) -> None:
    """SIGKILL a process that saves in a loop, several times: the folder always loads, old or new."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    target = tmp_path / "ad"
    ak.attach(model := make_tiny("bert"), "a", ak.LoRA(r=2), targets=["query", "value"])
    ak.save(model, target)
    for delay in (0.35, 0.5, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", KILLER.format(root=root, path=str(target))],
                                stdout=subprocess.PIPE, cwd=root)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh = make_tiny("bert")
            ak.load(fresh, target)  # never raises: the record always names a complete weights file
        assert len(list(target.glob("adapter-*.safetensors"))) <= 2

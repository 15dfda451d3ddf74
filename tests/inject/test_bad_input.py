"""Bad input gets a clear one-line error naming what is wrong and where; nothing saved is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import adapterkit as ak
from tests.conftest import logits, make_tiny, randomize, tokens


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(ak.UnknownMethodError) as exc:
        ak.spec_class("lorra")
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

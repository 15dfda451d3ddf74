"""Saving keeps what was trained, two saves into one folder keep each other's weights, loading rebuilds the adapter
at its saved paths without touching the random stream, and fingerprints survive dtype moves but not another base."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import adapterkit as ak
import adapterkit.inject.state as state
from adapterkit.core.errors import StateError
from tests.conftest import logits, make_tiny, randomize, tokens


def _trained(seed: int = 0) -> torch.nn.Module:
    model = make_tiny("bert", seed=seed)
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    randomize(model, "a")
    ak.train_only(model, "a", also=["classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # as if trained
    return model


def test_save_keeps_the_modules_trained_beside_the_adapter(tmp_path) -> None:
    model = _trained()
    expected = logits(model, tokens())
    ak.save(model, tmp_path / "ad")  # no modules= repeated
    record, _ = ak.read(tmp_path / "ad")
    assert record["modules"] == ["classifier"]
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, tokens()), expected)
    ak.save(fresh, tmp_path / "again")  # a loaded adapter remembers its head too
    assert ak.read(tmp_path / "again")[0]["modules"] == ["classifier"]
    ak.save(model, tmp_path / "alone", modules=())
    assert ak.read(tmp_path / "alone")[0]["modules"] == []


def test_two_saves_into_one_folder_never_delete_each_others_weights(tmp_path, monkeypatch) -> None:
    first, second = _trained(), _trained()
    randomize(second, "a", seed=9)
    target = tmp_path / "ad"
    ak.save(first, target)
    real_write = state.atomic_write
    other = threading.Thread(target=ak.save, args=(second, target))

    def write(path, data):  # a second save starts between the first one's weights and its record
        if path.name == "adapter.json" and threading.current_thread() is not other and not other.is_alive():
            other.start()
            time.sleep(0.3)  # unguarded, it would write its files and delete the first one's weights here
        real_write(path, data)

    monkeypatch.setattr(state, "atomic_write", write)
    ak.save(first, target)
    other.join()
    fresh = make_tiny("bert")
    ak.load(fresh, target)  # the record names complete weights, and only those are left
    assert torch.equal(logits(fresh, tokens()), logits(second, tokens()))
    assert len(list(target.glob("adapter-*.safetensors"))) == 1


def test_load_leaves_the_random_stream_alone_and_selects_nothing(tmp_path, monkeypatch) -> None:
    ak.save(_trained(), tmp_path / "ad")
    fresh = make_tiny("bert")
    import adapterkit.inject.engine as engine

    monkeypatch.setattr(engine, "select", lambda *a, **k: pytest.fail("load re-ran target selection"))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    ak.load(fresh, tmp_path / "ad")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_overwrite_copies_into_the_attached_adapter_in_place(tmp_path) -> None:
    model = _trained()
    ak.save(model, tmp_path / "ad")
    other = make_tiny("bert")
    ak.attach(other, "a", ak.LoRA(r=2), ["query", "value"])
    params = [p for p in other.parameters() if p.requires_grad]
    ak.load(other, tmp_path / "ad", overwrite=True)
    assert [p for p in other.parameters() if p.requires_grad] == params  # same objects
    assert torch.equal(logits(other, tokens()), logits(model, tokens()))
    wrong = make_tiny("bert")
    ak.attach(wrong, "a", ak.LoRA(r=4), ["query", "value"])
    with pytest.raises(StateError, match="another spec or targets"):
        ak.load(wrong, tmp_path / "ad", overwrite=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_an_adapter_moves_to_the_same_weights_in_another_dtype(tmp_path, dtype) -> None:
    ak.save(_trained(), tmp_path / "ad")
    moved = make_tiny("bert").to(dtype)
    ak.load(moved, tmp_path / "ad")  # refused before: the digest changed with the dtype
    ak.save(moved, tmp_path / "back")
    ak.load(make_tiny("bert"), tmp_path / "back")  # and back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_another_base_is_still_refused_with_one_line(tmp_path, dtype) -> None:
    ak.save(_trained(), tmp_path / "ad")
    other = make_tiny("bert", seed=5).to(dtype)
    with pytest.raises(StateError) as info:
        ak.load(other, tmp_path / "ad")
    assert "weights differ" in str(info.value) and "\n" not in str(info.value)
    nudged = make_tiny("bert")  # one weight of one target moved by a fine-tune-sized step: still another base
    with torch.no_grad():
        nudged.bert.encoder.layer[0].attention.self.query.weight.mul_(1.001)
    with pytest.raises(StateError, match="query weights differ"):
        ak.load(nudged, tmp_path / "ad")


def test_records_of_the_older_hash_scheme_still_load(tmp_path) -> None:
    from adapterkit.inject.fingerprint import tensor_digest

    model = _trained()
    ak.save(model, tmp_path / "ad")
    file = tmp_path / "ad" / "adapter.json"
    record = json.loads(file.read_text())
    base = make_tiny("bert")
    modules = dict(base.named_modules())
    for path, entry in record["fingerprint"].items():
        digest = __import__("hashlib").sha256()
        for _, param in modules[path].named_parameters():
            digest.update(tensor_digest(param).encode())
        record["fingerprint"][path] = {"shapes": entry["shapes"], "hash": digest.hexdigest()[:16]}
    file.write_text(json.dumps(record))
    ak.load(base, tmp_path / "ad")
    with pytest.raises(StateError, match="weights differ"):
        ak.load(make_tiny("bert", seed=5), tmp_path / "ad")


def test_load_walks_the_module_tree_twice(tmp_path, monkeypatch) -> None:
    ak.save(_trained(), tmp_path / "ad")
    fresh = make_tiny("bert")
    walks = []
    real = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        if self is fresh:
            walks.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    ak.load(fresh, tmp_path / "ad")
    assert len(walks) <= 2  # c50f2e0 walked it 9 times


def test_a_bad_saved_module_changes_no_module_of_the_model(tmp_path) -> None:
    import hashlib

    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    model = _trained()
    ak.save(model, tmp_path / "ad", modules=("classifier", "pooler"))
    file = tmp_path / "ad" / "adapter.json"
    record = json.loads(file.read_text())
    weights = tmp_path / "ad" / record["weights"]
    tensors = load_bytes(weights.read_bytes())
    del tensors["module.bert.pooler.dense.bias"]  # the second module is incomplete, the first is fine
    blob = save_bytes(tensors)
    weights.write_bytes(blob)
    record["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    file.write_text(json.dumps(record))
    fresh = make_tiny("bert")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(StateError, match="module bert.pooler: missing tensors"):
        ak.load(fresh, tmp_path / "ad")
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_base_tensor_over_2_24_values_fingerprints_and_round_trips(tmp_path) -> None:
    # SmolLM2's tied embedding has 28.3M values: float32 positions past 2**24 once rounded out of the tensor
    from torch import nn

    model = nn.Sequential(nn.Embedding((1 << 24) + 5, 1))
    ak.attach(model, "big", ak.LoRA(r=1), targets=["0"])  # crashed (IndexError) before
    ak.save(model, tmp_path / "big", "big")
    ak.detach(model, "big")
    ak.load(model, tmp_path / "big")
    assert "big" in ak.adapters(model)

"""Every registered method through the store, on the conformance suite's tiny models and specs: each one serves (a
mixed batch through the store equals a plain ``ak.load`` of the same folder, also after eviction and re-attach from
host memory), and the folders that cannot be served are refused with one line naming why (answered 400)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.serve.runners import per_row
from adapterkit.serve.store import AdapterStore
from tests.conformance.test_contract import CASES
from tests.conftest import logits, make_tiny, randomize, tokens

PARAMS = [pytest.param(kind, spec, targets, id=f"{method}-{kind}-{i}")
          for method, cases in CASES.items() for i, (kind, spec, targets) in enumerate(cases)]


def test_every_registered_method_has_a_case() -> None:
    assert sorted(CASES) == ak.methods.available()


def _saved(kind: str, spec, targets, folder: Path, scales: tuple[float, ...]) -> list[Path]:
    """One folder per scale of random change: the same method and targets, other weights (a large change flips
    even a mask that starts far from its threshold)."""
    donor = make_tiny(kind)
    ak.attach(donor, "a", spec, targets)
    out = []
    for i, scale in enumerate(scales):
        randomize(donor, "a", scale=scale, seed=3 + i)
        out.append(ak.save(donor, folder / f"v{i}", "a"))
    return out


@torch.no_grad()
@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_every_method_serves_equal_to_a_plain_load(kind, spec, targets, tmp_path) -> None:
    first, second = _saved(kind, spec, targets, tmp_path, scales=(0.05, 0.6))
    model = make_tiny(kind)
    store = AdapterStore(model, None, max_resident=1)  # one slot: every switch re-attaches from host memory
    if spec.rewrites_call:  # prompt / prefix methods: one setting per batch, refused with the reason
        with pytest.raises(ak.StateError, match="rewrites a module's whole call") as exc:
            store.add("a", first)
        assert "\n" not in str(exc.value) and store.entries == {} and ak.adapters(model) == []
        return
    store.add("a", first)
    store.add("b", second)  # evicts a
    ids = tokens(batch=3, length=6)
    want = {None: logits(make_tiny(kind), ids)}
    for name, folder in (("a", first), ("b", second)):
        plain = make_tiny(kind)
        ak.load(plain, folder)  # the library's own load: the reference
        want[name] = logits(plain, ids)
    assert not torch.allclose(want["a"], want["b"])  # the two adapters really differ
    for names in (["a", None, "a"], [None, "b", "b"], ["a", "a", None]):
        with store.lock, per_row(store, names):
            got = model(input_ids=ids).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(got[row], want[name][row], atol=1e-5, rtol=1e-5)
    assert store.stats["attached"] == 2 + 3  # a and b at add, then a, b, a again from host memory
    with store.lock:
        assert torch.equal(model(input_ids=ids).logits, want[None])  # outside a batch: the bare base


def test_a_combiner_folder_is_refused_with_its_reason(tmp_path) -> None:
    """A learned block's combiner runs only inside its block: the store refuses it (one line), loads nothing."""
    model = make_tiny("bert")
    ak.attach(model, "fusion", ak.compose.Fusion(), ["output.LayerNorm"])
    ak.save(model, tmp_path / "fusion", "fusion")
    store = AdapterStore(make_tiny("bert"), None)
    with pytest.raises(ak.StateError, match=r"fusion: holds a combiner for 'fuse' blocks, which runs only") as exc:
        store.add("fusion", tmp_path / "fusion")
    assert "\n" not in str(exc.value)
    assert store.entries == {} and ak.adapters(store.model) == []

"""Conformance of every registered combiner (the learned part of Fuse, Scale, Gate, Route, TaskRoute).

``CASES``: combiner name -> list of (model kind, combiner spec, combiner targets, block factory). The factory takes
the fresh model, attaches the block's children (seeded, so two fresh models get equal children) and returns the
block. Every case is checked for: the block's JSON round trip, save/load of the combiner (equal outputs on a fresh
model with the same children), ``train_only(model, combiner)`` training only the combiner, and a clear error for an
unknown child name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import HOST_ATTR, placements
from tests.conftest import make_tiny, randomize, tokens

Case = tuple[str, Any, list[str], Callable[[nn.Module], Any]]
CASES: dict[str, list[Case]] = {}


def _children(model: nn.Module, spec: Any, targets: list[str], names: tuple[str, ...]) -> None:
    for index, name in enumerate(names):
        ak.attach(model, name, spec, targets)
        randomize(model, name, scale=0.2, seed=50 + index)


# --- Fuse / Scale / Gate (branch compose-a: AdapterFusion, ScaLearn, MixDA) ------------------------------------
PFEIFFER = [r"re:.*layer\.\d+\.output\.LayerNorm"]
FFN_OUT = [r"re:.*layer\.\d+\.output\.dense"]
SEQ = ak.SeqBottleneck(reduction_factor=4)
DOMAIN = ak.ParBottleneck(reduction_factor=4, scaling=1.0, activation="gelu")


def _seq_sources(model: nn.Module, block: Callable[..., Any], name: str) -> Any:
    _children(model, SEQ, PFEIFFER, ("a", "b", "c"))
    return block("a", "b", "c", name=name)


CASES.update({
    "fusion": [
        ("bert", ak.compose.Fusion(), PFEIFFER, lambda m: _seq_sources(m, ak.Mix, "fusion")),
        ("bert", ak.compose.Fusion(form="static", temperature=2.0), PFEIFFER,
         lambda m: _seq_sources(m, ak.Mix, "fusion")),
        ("llama", ak.compose.Fusion(), ["o_proj"],
         lambda m: (_children(m, ak.LoRA(r=2), ["o_proj"], ("x", "y")), ak.Mix("x", "y", name="fusion"))[1]),
    ],
    "scalearn": [
        ("bert", ak.compose.ScaLearn(sources=3), PFEIFFER, lambda m: _seq_sources(m, ak.Mix, "scalearn")),
        ("bert", ak.compose.ScaLearn(sources=3, form="scalar", share="model"), PFEIFFER,
         lambda m: _seq_sources(m, ak.Mix, "scalearn")),
        ("gpt2", ak.compose.ScaLearn(sources=2, share="model"), ["c_proj"],
         lambda m: (_children(m, ak.LoRA(r=2), [r"re:.*mlp\.c_proj"], ("x", "y")),
                    ak.Stack(ak.Mix("x", "y", name="scalearn")))[1]),
    ],
    "mixda": [
        ("bert", ak.compose.MixDA(domains=2, hidden=8), FFN_OUT,
         lambda m: (_children(m, DOMAIN, FFN_OUT, ("d1", "d2")), ak.Mix("d1", "d2", name="mixda"))[1]),
        ("bert", ak.compose.MixDA(domains=1, hidden=8, depth=1, pool="mean"), FFN_OUT,
         lambda m: (_children(m, DOMAIN, FFN_OUT, ("d1",)), _children(m, SEQ, PFEIFFER, ("task",)),
                    ak.Stack(ak.Mix("d1", name="mixda"), "task"))[2]),
    ],
})
# --- end of compose-a cases -------------------------------------------------------------------------------------

FLAT = [(name, index, case) for name, cases in sorted(CASES.items()) for index, case in enumerate(cases)]
IDS = [f"{name}-{index}" for name, index, _ in FLAT]


def _model(case: Case, name: str) -> tuple[nn.Module, Any]:
    kind, spec, targets, factory = case
    model = make_tiny(kind)
    block = factory(model)
    ak.attach(model, name, spec, targets)
    return model, block


def _out(model: nn.Module, block: Any) -> torch.Tensor:
    with ak.use(model, block), torch.no_grad():
        return model(input_ids=tokens()).logits


@pytest.mark.parametrize("name,index,case", FLAT, ids=IDS)
def test_block_round_trips_through_json(name: str, index: int, case: Case) -> None:
    _, block = _model(case, name)
    again = ak.block_from_dict(json.loads(json.dumps(block.to_dict())))
    assert again == block and [n for _, n in again.combiners()] == [name]


@pytest.mark.parametrize("name,index,case", FLAT, ids=IDS)
def test_combiner_save_load_round_trip(name: str, index: int, case: Case, tmp_path) -> None:
    model, block = _model(case, name)
    randomize(model, name, scale=0.3, seed=7)  # away from the init, so a load that kept the init would show
    model.eval()
    expected = _out(model, block)
    ak.save(model, tmp_path / name, name)
    fresh, again = _model(case, f"{name}_unused")  # same base and children; this combiner is not the loaded one
    ak.detach(fresh, f"{name}_unused")
    ak.load(fresh, tmp_path / name)
    fresh.eval()
    assert name not in [n for _, _, h in placements(fresh, name) for n in h.active]  # never active on its own
    torch.testing.assert_close(_out(fresh, again), expected, atol=0, rtol=0)
    assert (expected - _out(model, ak.Stack(*block.leaves()))).abs().max() > 1e-6  # the combiner mattered


@pytest.mark.parametrize("name,index,case", FLAT, ids=IDS)
def test_train_only_trains_only_the_combiner(name: str, index: int, case: Case) -> None:
    model, block = _model(case, name)
    count = ak.train_only(model, name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert count > 0 and trainable
    assert all(f"{HOST_ATTR}.{name}." in n for n in trainable), trainable[:3]
    model.train()
    with ak.use(model, block) as routing:
        loss = model(input_ids=tokens()).logits.pow(2).sum() + routing.aux_loss()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name,index,case", FLAT, ids=IDS)
def test_unknown_child_names_are_clear_errors(name: str, index: int, case: Case) -> None:
    model, block = _model(case, name)
    learned, _ = block.combiners()[0]
    wrong = type(learned)(*learned.children[:-1], "missing_child", name=name)
    with pytest.raises(AdapterKitError, match="no adapter named 'missing_child'") as info:
        with ak.use(model, wrong):
            pass
    assert "\n" not in str(info.value)

"""The contract every registered combiner meets: block JSON round trip, save/load round trip, only the combiner
trains, unknown children are clear errors. Each combiner adds its cases to ``CASES``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.registry import spec_class
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, randomize, tokens

# combiner name -> [(model kind, spec, targets, block from its children's names)]
Case = tuple[str, AdapterSpec, list[str], Callable[[Sequence[str]], Any]]
CASES: dict[str, list[Case]] = {}

# ---- Route: X-LoRA and MoLE (compose/xlora.py, compose/mole.py) ----------------------------------------------
_XLORA = spec_class("xlora")
_MOLE = spec_class("mole")
CASES["xlora"] = [
    ("llama", _XLORA(experts=3, hidden_size=32, depth=2, size=8, scalings="layerwise"), ["q_proj", "down_proj"],
     lambda names: ak.Mix(*names, name="comb")),
    ("bert", _XLORA(experts=2, hidden_size=32, top_k=1), ["query", "value"],
     lambda names: ak.Stack(ak.Mix(*names, name="comb"))),
]
CASES["mole"] = [
    ("llama", _MOLE(experts=4), ["gate_proj", "up_proj", "down_proj"], lambda names: ak.Mix(*names, name="comb")),
    ("bert", _MOLE(experts=2, top_k=2), ["intermediate.dense"], lambda names: ak.Mix(*names, name="comb")),
]
# ---- end Route ------------------------------------------------------------------------------------------------

FLAT = [(name, index, case) for name, cases in sorted(CASES.items()) for index, case in enumerate(cases)]


def _experts(case: Case) -> int:
    return int(getattr(case[1], "experts", getattr(case[1], "children", 2)))


def _model(case: Case, with_combiner: bool = True) -> tuple[nn.Module, list[str]]:
    kind, spec, targets, _ = case
    model = make_tiny(kind)
    names = [f"c{i}" for i in range(_experts(case))]
    for index, name in enumerate(names):
        ak.attach(model, name, ak.LoRA(r=4), targets)
        randomize(model, name, seed=40 + index, scale=0.2)
    if with_combiner:
        ak.attach(model, "comb", spec, targets)
        randomize(model, "comb", seed=7, scale=0.5)
    return model.eval(), names


def _run(model: nn.Module, block: Any) -> torch.Tensor:
    with torch.no_grad(), ak.use(model, block):
        return model(input_ids=tokens(batch=2, length=6)).logits


@pytest.mark.parametrize("name,index,case", FLAT, ids=[f"{n}-{i}" for n, i, _ in FLAT])
def test_block_round_trips_through_json(name: str, index: int, case: Case) -> None:
    block = case[3]([f"c{i}" for i in range(_experts(case))])
    assert ak.block_from_dict(json.loads(json.dumps(block.to_dict()))) == block
    assert ak.spec_from_dict(json.loads(json.dumps(case[1].to_dict()))) == case[1]


@pytest.mark.parametrize("name,index,case", FLAT, ids=[f"{n}-{i}" for n, i, _ in FLAT])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path: Path, name: str, index: int, case: Case) -> None:
    model, names = _model(case)
    block = case[3](names)
    expected = _run(model, block)
    with ak.use(model):
        bare = model(input_ids=tokens(batch=2, length=6)).logits.detach()
    assert (expected - bare).abs().max() > 1e-4
    ak.save(model, tmp_path / "comb", name="comb")
    fresh, _ = _model(case, with_combiner=False)
    assert ak.load(fresh, tmp_path / "comb") == "comb"
    torch.testing.assert_close(_run(fresh.eval(), block), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name,index,case", FLAT, ids=[f"{n}-{i}" for n, i, _ in FLAT])
def test_only_the_combiner_trains(name: str, index: int, case: Case) -> None:
    model, names = _model(case)
    own = {id(p) for _, _, host in placements(model, "comb") for p in host.adapter("comb").parameters()}
    assert ak.train_only(model, "comb") == sum(p.numel() for p in model.parameters() if id(p) in own)
    model.train()
    with ak.use(model, case[3](names)) as routing:
        loss = model(input_ids=tokens(batch=2, length=6)).logits.pow(2).mean() + routing.aux_loss()
    loss.backward()
    for param in model.parameters():
        assert param.requires_grad == (id(param) in own)
        assert param.grad is None or id(param) in own
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if id(p) in own)


@pytest.mark.parametrize("name,index,case", FLAT, ids=[f"{n}-{i}" for n, i, _ in FLAT])
def test_unknown_children_are_clear_errors(name: str, index: int, case: Case) -> None:
    model, names = _model(case)
    with pytest.raises(AdapterKitError, match="no adapter named 'nope'") as info:
        with ak.use(model, case[3]([*names[:-1], "nope"])):
            pass
    assert "\n" not in str(info.value)

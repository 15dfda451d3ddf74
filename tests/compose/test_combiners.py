"""Conformance of every registered combiner: JSON round trips, save/load, training only the combiner, errors.

``CASES`` maps each combiner name to (model kind, spec, targets, block factory) cases. The factory gets a model,
attaches the block's children to it (seeded, so a fresh model gets the very same children) and returns the block;
the test attaches the combiner itself under the block's name. Each branch keeps its cases in its own section.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.compose.mma import MMA
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, randomize, tokens

Case = tuple[str, Any, list[str], Callable[[nn.Module], Any]]
CASES: dict[str, list[Case]] = {}
TASK_IDS = [0, 1]  # rows of the 2-example batch below; combiners that do not route by task ignore them


# ---- TaskRoute: poly (Poly / MHR), compose/poly.py -------------------------------------------------------------

def _poly_skills(count: int, targets: list[str], rank: int = 2) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        names = [f"skill{i}" for i in range(count)]
        for index, name in enumerate(names):
            torch.manual_seed(100 + index)
            ak.attach(model, name, ak.LoRA(r=rank), targets)
            randomize(model, name, seed=200 + index)
        return ak.Mix(*names, name="router")
    return make


CASES["poly"] = [
    ("bert", ak.compose.Poly(n_tasks=2, n_skills=3), ["query", "value"], _poly_skills(3, ["query", "value"])),
    ("gpt2", ak.compose.Poly(n_tasks=3, n_skills=2, n_splits=4, sampling="sigmoid"), ["c_attn", "c_fc"],
     _poly_skills(2, ["c_attn", "c_fc"])),
]

# ---- Mix: mma (LaVIN's mixture-of-modality router; learned routing: task routing has no parameters to train and is
# covered by tests/compose/test_mma.py), compose/mma.py ---------------------------------------------------------------

def _mma_children(spec: Any, targets: list[str], count: int) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        names = [f"mod{i}" for i in range(count)]
        for index, name in enumerate(names):
            torch.manual_seed(300 + index)
            ak.attach(model, name, spec, targets)
            randomize(model, name, scale=0.2, seed=400 + index)
        return ak.Mix(*names, name="router")
    return make


_PFEIFFER = [r"re:.*layer\.\d+\.output\.LayerNorm"]
CASES["mma"] = [
    ("bert", MMA(experts=2), ["query", "value"], _mma_children(ak.LoRA(r=2), ["query", "value"], 2)),
    ("llama", MMA(experts=3, pool="mean", temperature=1.0), ["self_attn"],
     _mma_children(ak.ParBottleneck(hidden=4, activation="identity"), ["self_attn"], 3)),
    ("bert", MMA(experts=2, reads="output", temperature=2.0), _PFEIFFER,
     _mma_children(ak.SeqBottleneck(reduction_factor=4), _PFEIFFER, 2)),
]

# ---- (other combiners: add their sections above this line) -------------------------------------------------------

ALL = [(name, index, case) for name, cases in sorted(CASES.items()) for index, case in enumerate(cases)]
IDS = [f"{name}-{index}" for name, index, _ in ALL]


def _setup(case: Case) -> tuple[nn.Module, Any]:
    kind, spec, targets, factory = case
    model = make_tiny(kind)
    block = factory(model)
    ak.attach(model, block.name, spec, targets)
    return model.eval(), block


def _output(model: nn.Module, block: Any) -> torch.Tensor:
    with ak.use(model, block, task_ids=TASK_IDS), torch.no_grad():
        return model(input_ids=tokens()).logits


@pytest.mark.parametrize("name,index,case", ALL, ids=IDS)
def test_block_and_spec_round_trip_through_json(name: str, index: int, case: Case) -> None:
    model, block = _setup(case)
    again = ak.block_from_dict(json.loads(json.dumps(block.to_dict())))
    assert again == block and type(again) is type(block)
    spec = case[1]
    assert ak.spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.method == name


@pytest.mark.parametrize("name,index,case", ALL, ids=IDS)
def test_save_and_load_give_the_same_outputs(name: str, index: int, case: Case, tmp_path: Path) -> None:
    model, block = _setup(case)
    randomize(model, block.name, scale=0.5, seed=7)  # away from the (often neutral) init
    expected = _output(model, block)
    ak.save(model, tmp_path / "combiner", block.name)
    fresh = make_tiny(case[0])
    assert case[3](fresh) == block  # the same children, with the same weights
    assert ak.load(fresh, tmp_path / "combiner") == block.name
    torch.testing.assert_close(_output(fresh.eval(), block), expected, atol=1e-6, rtol=0)
    with ak.use(fresh, *block.children), torch.no_grad():  # and the combiner matters: not a plain sum
        assert (fresh(input_ids=tokens()).logits - expected).abs().max() > 1e-5


@pytest.mark.parametrize("name,index,case", ALL, ids=IDS)
def test_train_only_the_combiner(name: str, index: int, case: Case) -> None:
    model, block = _setup(case)
    randomize(model, block.name, scale=0.5, seed=7)
    count = ak.train_only(model, block.name)
    own = {id(p) for _, _, host in placements(model, block.name) for p in host.adapter(block.name).parameters()}
    assert count == sum(p.numel() for p in model.parameters() if id(p) in own) > 0
    model.train()
    with ak.use(model, block, task_ids=TASK_IDS) as routing:
        loss = model(input_ids=tokens()).logits.pow(2).sum() + routing.aux_loss()
    loss.backward()
    for param in model.parameters():
        if id(param) in own:
            assert param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert param.grad is None


@pytest.mark.parametrize("name,index,case", ALL, ids=IDS)
def test_unknown_child_names_are_a_clear_error(name: str, index: int, case: Case) -> None:
    model, block = _setup(case)
    broken = type(block)(*block.children[:-1], "no_such_adapter", name=block.name)
    with pytest.raises(AdapterKitError, match="no adapter named 'no_such_adapter'") as info:
        with ak.use(model, broken, task_ids=TASK_IDS):
            pass
    assert "\n" not in str(info.value)

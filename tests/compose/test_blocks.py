"""Blocks as data (validation, JSON) and the interpreter's fixed blocks, against equivalent plain setups."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.blocks import Fuse
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.engine import placements
from tests.conftest import logits, make_tiny, randomize, tokens

NESTED = [
    ak.Stack("lang", "task"),
    ak.Parallel("a", ak.Stack("b", "c")),
    ak.Average("a", "b", weights=(0.25, 0.75)),
    ak.Stack("lang", ak.Mix("a", "b", "c", name="fusion")),
    ak.Parallel(ak.Mix("a", "b", name="s"), ak.Mix("c", name="g")),
    ak.Stack(ak.Mix("e1", "e2", name="router"), ak.Mix("s1", "s2", name="poly")),
    ak.Select(("a", None, "b")),
]


@pytest.mark.parametrize("block", NESTED, ids=lambda b: type(b).__name__)
def test_blocks_round_trip_through_json(block) -> None:
    again = ak.block_from_dict(json.loads(json.dumps(block.to_dict())))
    assert again == block and type(again) is type(block)


@pytest.mark.parametrize("make,message", [
    (lambda: ak.Mix(ak.Stack("a", "b"), "c", name="f"), "Mix cannot hold Stack"),
    (lambda: ak.Stack("a", ak.Select(("a",))), "Stack cannot hold Select"),
    (lambda: ak.Stack(), "needs at least one child"),
    (lambda: ak.Parallel("a", "a"), "adapter 'a' appears twice"),
    (lambda: ak.Average("a", "b", weights=(1.0,)), "1 weights for 2 children"),
    (lambda: ak.Mix("a", "b", name=""), "needs name="),
    (lambda: ak.block_from_dict({"block": "blend", "children": ["a"]}), "unknown block 'blend'"),
    (lambda: ak.block_from_dict({"block": "stack", "children": "a"}), "needs a 'children' list"),
    (lambda: ak.block_from_dict({"block": "stack", "children": ["a", 3]}), "block.children[1]: expected"),
])
def test_invalid_blocks_are_one_line_errors(make, message) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        make()
    assert "\n" not in str(info.value)


def _bert_with(*specs: tuple[str, AdapterSpec, list[str]]) -> nn.Module:
    model = make_tiny("bert")
    for index, (name, spec, targets) in enumerate(specs):
        ak.attach(model, name, spec, targets)
        randomize(model, name, seed=10 + index)
    return model.eval()


def test_stack_runs_children_in_order_like_an_active_list() -> None:
    model = _bert_with(("lang", ak.SeqBottleneck(reduction_factor=4), ["output.LayerNorm"]),
                       ("task", ak.SeqBottleneck(reduction_factor=2), ["output.LayerNorm"]))
    ids = tokens()
    with ak.use(model, "lang", "task"):
        expected = logits(model, ids)
    with ak.use(model, "task", "lang"):
        swapped = logits(model, ids)
    with ak.use(model, ak.Stack("lang", "task")):
        out = logits(model, ids)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (out - swapped).abs().max() > 1e-4  # the order matters, and the block kept it


def test_parallel_adds_changes_and_average_weights_them() -> None:
    lora = [("a", ak.LoRA(r=4), ["query", "value"]), ("b", ak.LoRA(r=2), ["query", "dense"])]
    model = _bert_with(*lora)
    ids = tokens()
    with ak.use(model, "a", "b"):  # LoRA deltas of active adapters add
        both = logits(model, ids)
    with ak.use(model, ak.Parallel("a", "b")):
        torch.testing.assert_close(logits(model, ids), both, atol=1e-6, rtol=0)
    # Average(w) equals two LoRAs whose B factors are scaled by w
    for (name, spec, targets), weight in zip(lora, (0.25, 0.75)):
        ak.attach(model, f"{name}_w", spec, targets)
        for (_, _, host), (_, _, src) in zip(placements(model, f"{name}_w"), placements(model, name)):
            state = {k: v * weight if k == "lora_b" else v
                     for k, v in src.adapter(name).state_dict().items()}
            host.adapter(f"{name}_w").load_state_dict(state)
    with ak.use(model, "a_w", "b_w"):
        scaled = logits(model, ids)
    with ak.use(model, ak.Average("a", "b", weights=(0.25, 0.75))):
        averaged = logits(model, ids)
    torch.testing.assert_close(averaged, scaled, atol=1e-6, rtol=0)
    assert (averaged - both).abs().max() > 1e-4


def test_input_site_adapters_apply_in_stack_order_and_are_refused_elsewhere() -> None:
    model = make_tiny("llama").eval()
    for index, name in enumerate(("i1", "i2")):
        ak.attach(model, name, ak.IA3(position="input"), ["down_proj"])
        randomize(model, name, seed=20 + index)
    ids = tokens()
    with ak.use(model, "i1", "i2"):
        expected = logits(model, ids)
    with ak.use(model, ak.Stack("i1", "i2")):
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)
    with ak.use(model, ak.Parallel("i1", "i2")), pytest.raises(AdapterKitError, match="only a Stack can order"):
        logits(model, ids)


@dataclasses.dataclass(frozen=True)
class SoftMix(AdapterSpec):
    """A toy combiner for these tests: softmax weights over the children's changes, one logit per child."""

    children: int = 2
    role = "scale"

    def build(self, base: nn.Module) -> nn.Module:
        return _SoftMix(self)


class _SoftMix(nn.Module):
    def __init__(self, spec: SoftMix) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.children
        self.logits = nn.Parameter(torch.zeros(spec.children))

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        weights = self.logits.softmax(0)
        call.record(weights)
        call.add_loss("entropy", (weights * weights.log()).sum())
        result = out
        for weight, branch in zip(weights, branches):
            delta = branch.change(x, out)
            if delta is not None:
                result = result + weight * delta
        return result


def test_a_learned_block_runs_its_combiner_reports_and_trains() -> None:
    model = _bert_with(("a", ak.LoRA(r=4), ["query"]), ("b", ak.LoRA(r=4), ["query"]))
    ak.attach(model, "mix", SoftMix(), ["query"])
    ids = tokens()
    with ak.use(model, ak.Average("a", "b", weights=(0.5, 0.5))):
        half = logits(model, ids)
    with ak.use(model, ak.Mix("a", "b", name="mix")) as routing:
        out = logits(model, ids)
    torch.testing.assert_close(out, half, atol=1e-6, rtol=0)  # zero logits: equal weights
    assert sorted(routing.weights["mix"]) == ["bert.encoder.layer.0.attention.self.query",
                                              "bert.encoder.layer.1.attention.self.query"]
    assert routing.aux_loss().item() == pytest.approx(2 * torch.tensor(0.5).log().item(), abs=1e-6)
    assert ak.train_only(model, "mix") == 4
    model.train()
    with ak.use(model, ak.Mix("a", "b", name="mix")) as routing:
        model(input_ids=ids).logits.pow(2).mean().backward()  # (the toy's aux loss would drown its 1e-9 gradients)
    assert routing.losses["entropy"][0].requires_grad
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_learned_block_errors_name_what_is_wrong() -> None:
    model = _bert_with(("a", ak.LoRA(r=4), ["query"]), ("b", ak.LoRA(r=4), ["query", "value"]))
    ids = tokens()
    with pytest.raises(AdapterKitError, match="combiner 'mix', which is not attached"):
        with ak.use(model, ak.Mix("a", "b", name="mix")):
            pass
    ak.attach(model, "mix", SoftMix(), ["query"])
    with pytest.raises(AdapterKitError, match="needs a 'fuse' combiner, but 'mix' is a scale"):
        with ak.use(model, Fuse("a", "b", name="mix")):  # the older block names still insist on their role
            pass
    with pytest.raises(AdapterKitError, match="Mix uses combiner 'b', which is not attached"):
        with ak.use(model, ak.Mix("a", name="b")):
            pass
    with pytest.raises(AdapterKitError, match="built for 2 children, the Mix block has 1"):
        with ak.use(model, ak.Mix("a", name="mix")):
            pass
    with pytest.raises(AdapterKitError, match="no adapter named 'zz'"):
        with ak.use(model, ak.Stack("a", "zz")):
            pass
    with pytest.raises(AdapterKitError, match="is a 'scale' combiner"):
        ak.activate(model, "mix")
    with pytest.raises(AdapterKitError, match="no combiner 'mix' at 'bert.encoder.layer.0.attention.self.value'"):
        with ak.use(model, ak.Mix("a", "b", name="mix")):
            logits(model, ids)
    ak.merge(model, "a")
    with pytest.raises(AdapterKitError, match="'a' is merged"):
        with ak.use(model, ak.Stack("a")):
            pass

"""LoRA's batched Select form caches its stacked factors: built once per ``use`` block, rebuilt after a weight edit."""

from __future__ import annotations

import torch

import adapterkit as ak
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, randomize, tokens


def _model() -> torch.nn.Module:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=2), ["q_proj", "v_proj"])
    ak.attach(model, "b", ak.LoRA(r=4), ["q_proj"])
    randomize(model, "a", scale=0.2, seed=1)
    randomize(model, "b", scale=0.2, seed=2)
    return model


@torch.no_grad()
def test_stacks_built_once_per_block_and_rebuilt_after_an_edit() -> None:
    model = _model()
    names = ["a", "b", None]
    ids = tokens(batch=3, length=4)
    host = next(h for path, _, h in placements(model, "a") if path.endswith("q_proj"))
    with ak.use(model, ak.Select(names)):
        first = model(input_ids=ids).logits
        stacks = host.select_cache["stacks"]
        again = model(input_ids=ids).logits  # a second forward in the block (a decode step) reuses the stacks
        assert host.select_cache["stacks"] is stacks
    assert torch.equal(first, again)
    for _, _, h in placements(model, "a"):
        h.adapter("a").lora_b.mul_(3.0)  # an in-place edit between blocks: its version counter moves
    with ak.use(model, ak.Select(names)):
        edited = model(input_ids=ids).logits
    assert host.select_cache["stacks"] is not stacks
    with ak.use(model, "a"):
        alone = model(input_ids=ids[:1]).logits[0]
    torch.testing.assert_close(edited[0], alone, atol=1e-5, rtol=1e-5)
    assert (edited[0] - first[0]).abs().max() > 1e-3  # the edit changed row 0's output
    torch.testing.assert_close(edited[1:], first[1:], atol=0, rtol=0)  # rows of other adapters did not change


@torch.no_grad()
def test_unchanged_weights_keep_the_stacks_across_blocks_and_dtype_rebuilds() -> None:
    model = _model()
    ids = tokens(batch=2, length=3)
    host = next(h for path, _, h in placements(model, "b") if path.endswith("q_proj"))
    with ak.use(model, ak.Select(["b", "a"])):
        model(input_ids=ids)
    stacks = host.select_cache["stacks"]
    with ak.use(model, ak.Select(["b", "a"])):
        model(input_ids=ids)
    assert host.select_cache["stacks"] is stacks  # versions checked, nothing rebuilt
    model.to(torch.float64)
    with ak.use(model, ak.Select(["b", "a"])):
        model(input_ids=ids)
    assert host.select_cache["stacks"][0].dtype == torch.float64

"""The sequential bottleneck equals AdapterHub's "seq_bn" (Pfeiffer) and "double_seq_bn" (Houlsby) on MiniLM.

`adapters` 1.3 pins transformers ~=4.57.6; where that pin does not hold the module is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.inject.engine import placements
from tests.conftest import make_minilm, tokens

adapters = pytest.importorskip("adapters")

# AdapterHub config -> (our targets, activation, the suffix that separates our target from their adapter's parent).
# Pfeiffer reads the sub-layer's normalised output and re-enters the norm; Houlsby sits on the projection
# before the residual and norm, after attention and after the FFN.
CASES = {
    "seq_bn": ([r"re:.*layer\.\d+\.output\.LayerNorm"], "relu", ".LayerNorm"),
    "double_seq_bn": (["output.dense"], "swish", ".dense"),
}


@pytest.mark.parametrize("config", sorted(CASES))
def test_sequential_bottleneck_matches_adapterhub(config) -> None:
    base = make_minilm()
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("bn", config=config)  # default init "bert": N(0, 0.02), non-zero output
    theirs.set_active_adapters("bn")
    theirs.eval()
    ours = copy.deepcopy(base)
    targets, activation, suffix = CASES[config]
    ak.attach(ours, "bn", ak.SeqBottleneck(reduction_factor=16, activation=activation), targets=targets)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, _, host in placements(ours, "bn"):
            prefix = path.removesuffix(suffix) + ".adapters.bn."
            block = host.adapter("bn").block
            block.down.weight.copy_(their_params[prefix + "adapter_down.0.weight"])
            block.down.bias.copy_(their_params[prefix + "adapter_down.0.bias"])
            block.up.weight.copy_(their_params[prefix + "adapter_up.weight"])
            block.up.bias.copy_(their_params[prefix + "adapter_up.bias"])
    expected_count = 12 if config == "double_seq_bn" else 6
    assert len(placements(ours, "bn")) == expected_count
    ids = tokens(batch=3, length=12, vocab=30522)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-4
    assert (got - expected).abs().max().item() <= 1e-5

"""OFT: parity with peft's current OFT for identical skew parameters (exact Cayley and peft's Neumann series;
outputs and gradients), orthogonality, merge W' = W R^T and its exact inverse, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.methods.oft import OFT, rotation, skew
from tests.conftest import make_tiny
from tests.methods.peft_pairs import check_parity, pair

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("spec", [OFT(block_size=8), OFT(r=2, block_size=0), OFT(block_size=16, cayley="neumann"),
                                  OFT(block_size=4, cayley="neumann", neumann_terms=3)], ids=str)
def test_oft_matches_peft(spec) -> None:
    base = make_tiny("llama")
    config = peft.OFTConfig(r=spec.r, oft_block_size=spec.block_size, target_modules=LLAMA,
                            use_cayley_neumann=spec.cayley == "neumann", num_cayley_neumann_terms=spec.neumann_terms)
    ours, theirs = pair(base, config, spec, LLAMA, scale=0.1)
    check_parity(base, ours, theirs)


def test_oft_on_bert_matches_peft() -> None:
    base = make_tiny("bert")
    targets = ["query", "value", "output.dense"]
    config = peft.OFTConfig(oft_block_size=8, target_modules=targets, use_cayley_neumann=False)
    ours, theirs = pair(base, config, OFT(block_size=8), targets, scale=0.5)
    check_parity(base, ours, theirs)


def test_exact_cayley_is_orthogonal_and_merge_is_w_rt_with_exact_inverse() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 5).double()
    adapter = OFT(block_size=4).build(base)
    with torch.no_grad():
        adapter.oft_r.normal_()
    blocks = adapter.rotation()
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    torch.testing.assert_close(blocks @ blocks.transpose(-2, -1), eye, atol=1e-12, rtol=0)
    q = skew(adapter.oft_r, 4)
    torch.testing.assert_close(q, -q.transpose(-2, -1), atol=0, rtol=0)
    torch.testing.assert_close(blocks, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-12, rtol=0)  # Cayley
    full = torch.block_diag(*blocks)
    weight = base.weight.detach()
    merged, _ = adapter.merge(weight, None)
    torch.testing.assert_close(merged, weight @ full.T, atol=1e-12, rtol=0)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(base(adapter(x, None)), x @ merged.T + base.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(adapter.unmerge(merged, None)[0], weight, atol=1e-12, rtol=0)


def test_neumann_unmerge_inverts_its_merge() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6).double()
    adapter = OFT(block_size=4, cayley="neumann").build(base)
    with torch.no_grad():
        adapter.oft_r.normal_(std=0.2)
    blocks = adapter.rotation()
    assert (blocks @ blocks.transpose(-2, -1) - torch.eye(4)).abs().max() > 1e-6  # not orthogonal: R^T would not do
    weight = base.weight.detach()
    torch.testing.assert_close(adapter.unmerge(adapter.merge(weight, None)[0], None)[0], weight, atol=1e-12, rtol=0)
    q = skew(adapter.oft_r, 4)
    series = torch.eye(4) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q  # peft's five terms
    torch.testing.assert_close(rotation(adapter.oft_r, 4, "neumann", 5), series, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fields,match", [({"r": 2, "block_size": 4}, "exactly one"),
                                          ({"r": 0, "block_size": 0}, "exactly one"),
                                          ({"block_size": 1}, "block_size 1"), ({"r": -1}, "r must"),
                                          ({"cayley": "qr"}, "cayley"), ({"neumann_terms": 1}, "neumann_terms")])
def test_bad_specs_are_one_line_errors(fields, match) -> None:
    with pytest.raises(SpecError, match=match) as info:
        OFT(**fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec,match", [(OFT(block_size=5), "block_size 5 does not divide the 32 input features of "),
                                        (OFT(r=3, block_size=0), "r 3 does not divide the 32 input features"),
                                        (OFT(r=32, block_size=0), "blocks of width 1"),
                                        (OFT(block_size=64), "block_size 64 does not divide")])
def test_a_split_that_does_not_fit_the_width_is_a_one_line_error(spec, match) -> None:
    with pytest.raises(TargetError, match=match) as info:
        ak.attach(make_tiny("llama"), "a", spec, ["q_proj"])
    assert "\n" not in str(info.value)


def test_a_non_linear_target_is_a_one_line_error() -> None:
    with pytest.raises(TargetError, match="oft cannot adapt model.embed_tokens"):
        ak.attach(make_tiny("llama"), "a", OFT(), ["embed_tokens"])

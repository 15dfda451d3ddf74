"""Hydra against its equation in float64, its merge in closed form, conversion to a LoRA, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.core.layers import read_weight
from adapterkit.inject.engine import placements
from adapterkit.methods.hydra import Hydra
from tests.conftest import logits, make_tiny, randomize, tokens


def _holder(base: nn.Module, spec: Hydra, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``base`` in float64 inside a Sequential, Hydra attached, every adapter weight random (B's are zero at init)."""
    torch.manual_seed(seed)
    holder = nn.Sequential(base).double()
    ak.attach(holder, "h", spec, targets=["0"])
    adapter = placements(holder, "h")[0][2].adapter("h")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if getattr(base, "bias", None) is not None:
            base.bias.normal_()  # GPT-2's Conv1D starts with a zero bias: make the bias path visible
    return holder, adapter


def _canonical(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return read_weight(base)  # (out, in) also for GPT-2's transposed Conv1D


BASES = {
    "linear": lambda: nn.Linear(9, 6),
    "linear-no-bias": lambda: nn.Linear(9, 6, bias=False),
    "conv1d": lambda: Conv1D(6, 9),  # GPT-2's layer: nf=6 outputs, nx=9 inputs, weight stored (in, out)
}


@pytest.mark.parametrize("kind", sorted(BASES))
def test_forward_is_the_equation(kind) -> None:
    base = BASES[kind]()
    holder, adapter = _holder(base, Hydra(r_par=2, r_seq=3, scale=0.7))
    weight, bias = _canonical(base)
    x = torch.randn(4, 5, 9, dtype=torch.float64)
    y0 = x @ weight.T + (0 if bias is None else bias)
    expected = (y0 + 0.7 * (x @ adapter.par_a.T @ adapter.par_b.T)  # y0 + s B_p A_p x + s B_s A_s y0
                + 0.7 * (y0 @ adapter.seq_a.T @ adapter.seq_b.T))
    with torch.no_grad():
        assert (holder(x) - expected).abs().max() < 1e-10


@pytest.mark.parametrize("kind", sorted(BASES))
def test_merge_is_the_closed_form_and_unmerge_restores_the_base(kind) -> None:
    base = BASES[kind]()
    holder, adapter = _holder(base, Hydra(r_par=3, r_seq=2, scale=1.3))
    w0, b0 = _canonical(base)
    x = torch.randn(7, 9, dtype=torch.float64)
    with torch.no_grad():
        unmerged = holder(x)
    ak.merge(holder, "h")
    w1, b1 = _canonical(base)
    m = torch.eye(6, dtype=torch.float64) + 1.3 * adapter.seq_b.detach() @ adapter.seq_a.detach()  # M = I + s B_s A_s
    expected_w = m @ w0 + 1.3 * adapter.par_b.detach() @ adapter.par_a.detach()  # W' = M W0 + s B_p A_p
    assert (w1 - expected_w).abs().max() < 1e-10
    if b0 is None:
        assert b1 is None
    else:
        assert (b1 - m @ b0).abs().max() < 1e-10  # b' = M b0: the sequential branch transforms the bias
        assert (b1 - b0).abs().max() > 1e-3
    with torch.no_grad():
        assert (holder(x) - unmerged).abs().max() < 1e-10  # merged: the base alone computes the adapted output
    ak.unmerge(holder, "h")
    w2, b2 = _canonical(base)
    assert (w2 - w0).abs().max() < 1e-10
    assert b0 is None or (b2 - b0).abs().max() < 1e-10
    with torch.no_grad():
        assert (holder(x) - unmerged).abs().max() < 1e-10


def test_starts_as_the_base_and_only_b_factors_get_a_first_gradient() -> None:
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(9, 6)).double()
    x = torch.randn(3, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = holder(x)
    ak.attach(holder, "h", Hydra(init="xavier"), targets=["0"])
    assert torch.equal(holder(x).detach(), ref)  # B_p = B_s = 0: exactly the base output
    adapter = placements(holder, "h")[0][2].adapter("h")
    holder(x).pow(2).sum().backward()
    assert adapter.par_b.grad.abs().sum() > 0 and adapter.seq_b.grad.abs().sum() > 0
    assert adapter.par_a.grad.abs().sum() == 0 and adapter.seq_a.grad.abs().sum() == 0  # B = 0 blocks them


def test_delta_weight_and_to_lora_at_full_rank() -> None:
    """The delta s (B_p A_p + B_s A_s W0) has rank <= r_par + r_seq, so a LoRA of that rank holds it exactly."""
    model = make_tiny("llama")  # bias-free projections: a LoRA holds the whole change
    ak.attach(model, "h", Hydra(r_par=2, r_seq=2), ["down_proj"])
    randomize(model, "h")
    ids = tokens()
    expected = logits(model, ids)
    adapter = placements(model, "h")[0][2].adapter("h")
    w0 = placements(model, "h")[0][1].weight.detach()
    delta = adapter.scale * (adapter.par_b @ adapter.par_a + adapter.seq_b @ adapter.seq_a @ w0)
    torch.testing.assert_close(adapter.delta_weight(), delta.detach(), atol=1e-6, rtol=0)
    errors = ak.to_lora(model, "h", rank=4)
    assert max(errors.values()) < 1e-5
    with ak.use(model, "h_lora4"):
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_save_load_keeps_both_branches(tmp_path) -> None:
    model = make_tiny("gpt2")
    ak.attach(model, "h", Hydra(r_par=2, r_seq=3, scale=0.5), ["c_attn", "c_proj"])
    randomize(model, "h")
    ids = tokens()
    expected = logits(model, ids)
    ak.save(model, tmp_path / "h")
    _, tensors = ak.read(tmp_path / "h")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"par_a", "par_b", "seq_a", "seq_b"}
    fresh = make_tiny("gpt2")
    ak.load(fresh, tmp_path / "h")
    assert torch.equal(logits(fresh, ids), expected)


@pytest.mark.parametrize("fields,field", [
    ({"r_par": 0}, "r_par"), ({"r_seq": -2}, "r_seq"), ({"scale": 0.0}, "scale"), ({"dropout": 1.0}, "dropout"),
    ({"init": "orthogonal"}, "init"), ({"r_par": 2.5}, "r_par"),
])
def test_bad_spec_is_a_one_line_error(fields, field) -> None:
    with pytest.raises(SpecError, match=field) as info:
        Hydra(**fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("base,targets,words", [
    (nn.Sequential(nn.Embedding(10, 6)), ["0"], "needs a Linear or Conv1D"),
    (nn.Sequential(nn.LayerNorm(6)), ["0"], "needs a Linear or Conv1D"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"], "needs a Linear or Conv1D"),
    (nn.Sequential(nn.Linear(9, 3)), ["0"], "r_seq 4 exceeds the output size 3"),
])
def test_a_layer_hydra_cannot_wrap_is_a_one_line_error(base, targets, words) -> None:
    spec = Hydra(r_par=2) if "r_seq" in words else Hydra()
    with pytest.raises(TargetError, match=words) as info:
        ak.attach(base, "h", spec, targets)
    assert "\n" not in str(info.value)
    assert not ak.adapters(base)


def test_a_merge_that_could_not_be_undone_is_refused_and_leaves_the_weights() -> None:
    base = nn.Linear(9, 6)
    holder, adapter = _holder(base, Hydra(r_par=1, r_seq=1, scale=2.0))
    with torch.no_grad():  # s A_s B_s = -1: M = I + s B_s A_s maps B_s's direction to zero
        adapter.seq_a.zero_()
        adapter.seq_a[0, 0] = 1.0
        adapter.seq_b.zero_()
        adapter.seq_b[0, 0] = -0.5
    w0, b0 = _canonical(base)
    with pytest.raises(ak.AdapterKitError, match="singular") as info:
        ak.merge(holder, "h")
    assert "\n" not in str(info.value)
    assert not ak.is_merged(holder, "h")
    w1, b1 = _canonical(base)
    assert torch.equal(w1, w0) and torch.equal(b1, b0)

"""LoHa and LoKr: parity with peft for identical factors (outputs and gradients; Linear and Conv2d), peft's width
factorisation, the Kronecker forward against the formed ΔW, the equations in float64 and one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.methods.loha import LoHa
from adapterkit.methods.lokr import LoKr, factorization
from tests.conftest import make_tiny
from tests.methods.peft_pairs import check_parity, pair

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind,targets", [("llama", LLAMA), ("bert", ["query", "value", "intermediate.dense"])])
def test_loha_matches_peft(kind, targets) -> None:
    base = make_tiny(kind)
    ours, theirs = pair(base, peft.LoHaConfig(r=4, alpha=6, target_modules=targets), LoHa(r=4, alpha=6.0), targets,
                        scale=0.3)
    check_parity(base, ours, theirs)


@pytest.mark.parametrize("spec", [LoKr(r=2), LoKr(r=8), LoKr(r=1, decompose_both=True), LoKr(r=2, decompose_factor=4),
                                  LoKr(r=3, alpha=5.0, decompose_factor=16)], ids=str)
def test_lokr_matches_peft(spec) -> None:
    base = make_tiny("llama")
    config = peft.LoKrConfig(r=spec.r, alpha=spec.alpha, target_modules=LLAMA, decompose_both=spec.decompose_both,
                             decompose_factor=spec.decompose_factor or -1)
    ours, theirs = pair(base, config, spec, LLAMA, scale=0.3)
    check_parity(base, ours, theirs)


@pytest.mark.parametrize("method,r", [("loha", 2), ("lokr", 1), ("lokr", 4)])
def test_conv2d_matches_peft(method, r) -> None:
    base = ConvNet().eval()
    config = (peft.LoHaConfig if method == "loha" else peft.LoKrConfig)(r=r, alpha=2, target_modules=["conv"])
    spec = LoHa(r=r, alpha=2.0) if method == "loha" else LoKr(r=r, alpha=2.0)
    ours, theirs = pair(base, config, spec, ["conv"], scale=0.3)
    check_parity(base, ours, theirs, torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)))


def test_factorization_is_peft_s() -> None:
    for dimension in range(1, 300):
        for factor in (None, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor or -1), (dimension, factor)


def test_lokr_kronecker_forward_equals_the_formed_delta_and_the_equation_in_float64() -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 20).double()
    adapter = LoKr(r=1, alpha=3.0, decompose_both=True).build(base)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_()
    w1, w2 = adapter.w1_a @ adapter.w1_b, adapter.w2_a @ adapter.w2_b
    assert w1.shape == (4, 4) and w2.shape == (5, 6)  # 20 = 4 * 5, 24 = 4 * 6
    delta = torch.kron(w1, w2) * 3.0
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(adapter(x, None), x @ delta.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(adapter.delta_weight(), delta, atol=1e-12, rtol=0)


def test_loha_equation_in_float64() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    adapter = LoHa(r=3, alpha=6.0).build(base)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_()
    delta = (adapter.w1_a @ adapter.w1_b) * (adapter.w2_a @ adapter.w2_b) * 2.0
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(adapter(x, None), x @ delta.T, atol=1e-10, rtol=0)
    merged, _ = adapter.merge(base.weight.detach(), None)
    torch.testing.assert_close(adapter.unmerge(merged, None)[0], base.weight.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls,fields,match", [(LoHa, {"r": 0}, "rank r"), (LoHa, {"alpha": 0.0}, "alpha"),
                                              (LoKr, {"r": -2}, "rank r"), (LoKr, {"decompose_factor": 0},
                                                                             "decompose_factor"),
                                              (LoKr, {"decompose_both": 1}, "decompose_both")])
def test_bad_specs_are_one_line_errors(cls, fields, match) -> None:
    with pytest.raises(SpecError, match=match) as info:
        cls(**fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", [LoHa(), LoKr()], ids=["loha", "lokr"])
def test_unsupported_targets_are_one_line_errors(spec) -> None:
    with pytest.raises(TargetError, match=f"{spec.method} cannot adapt model.embed_tokens") as info:
        ak.attach(make_tiny("llama"), "a", spec, ["embed_tokens"])
    assert "\n" not in str(info.value)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetError, match="grouped"):
        ak.attach(grouped, "a", spec, ["0"])

"""SNNK adapter layers against their equation in float64, the kernels their feature maps estimate, what a saved
adapter holds, parameter counts against a bottleneck adapter, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.snnk import SNNK, exp_features, relu_features
from tests.conftest import logits, make_tiny, randomize, tokens


def _holder(base: nn.Module, spec: SNNK) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    holder = nn.Sequential(base).double()
    ak.attach(holder, "s", spec, targets=["0"])
    adapter = placements(holder, "s")[0][2].adapter("s")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # the up-projection starts at zero
    return holder, adapter


def _phi(h: torch.Tensor, spec: SNNK, size: int) -> torch.Tensor:
    """The feature map written out from the paper, with G redrawn here from the spec's seed."""
    g = torch.randn(spec.features, size, generator=torch.Generator().manual_seed(spec.seed)).double()  # (m, d)
    if spec.feature_map == "relu":
        return torch.maximum(h @ g.T, torch.full((), -spec.leak, dtype=h.dtype)) / math.sqrt(spec.features)
    return torch.exp(h @ g.T - (h * h).sum(-1, keepdim=True) / 2) / math.sqrt(spec.features)


SPECS = [SNNK(features=12), SNNK(features=5, hidden=3, leak=0.2, seed=7), SNNK(features=9, feature_map="exp")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.feature_map}-{s.hidden}")
def test_on_a_linear_output_is_the_equation(spec) -> None:
    base = nn.Linear(8, 6)
    holder, adapter = _holder(base, spec)
    x = torch.randn(3, 4, 8, dtype=torch.float64) * 0.5
    y0 = x @ base.weight.T + base.bias  # f(x)
    z = _phi(y0, spec, 6) @ adapter.psi.T  # Psi phi(f(x)): (..., k)
    u = z * adapter.modulation if spec.hidden is None else z @ adapter.up.weight.T + adapter.up.bias
    with torch.no_grad():
        assert (holder(x) - (y0 + u)).abs().max() < 1e-10  # y = f(x) + u(f(x))


def test_on_a_post_norm_the_output_re_enters_the_norm() -> None:
    spec = SNNK(features=7, hidden=4)
    norm = nn.LayerNorm(6)
    holder, adapter = _holder(norm, spec)
    with torch.no_grad():
        norm.weight.add_(torch.randn(6, dtype=torch.float64) * 0.1)
    x = torch.randn(5, 6, dtype=torch.float64)
    ln = nn.functional.layer_norm
    h = ln(x, (6,), norm.weight, norm.bias)
    u = (_phi(h, spec, 6) @ adapter.psi.T) @ adapter.up.weight.T + adapter.up.bias
    with torch.no_grad():
        assert (holder(x) - ln(x + u, (6,), norm.weight, norm.bias)).abs().max() < 1e-10  # LN(x + u(LN(x)))


def test_psi_starts_as_the_features_of_a_kaiming_w0_and_the_adapter_as_the_identity() -> None:
    spec = SNNK(features=10, hidden=4, seed=3)
    torch.manual_seed(5)
    holder = nn.Sequential(nn.Linear(8, 6)).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = holder(x)
    torch.manual_seed(11)
    w0 = torch.empty(4, 6, dtype=torch.float64)
    nn.init.kaiming_uniform_(w0, a=math.sqrt(5))  # the draw the adapter makes from the global stream
    torch.manual_seed(11)
    ak.attach(holder, "s", spec, ["0"])
    adapter = placements(holder, "s")[0][2].adapter("s")
    assert (adapter.psi.detach() - _phi(w0, spec, 6)).abs().max() < 1e-12  # Psi = phi(W0)
    with torch.no_grad():
        assert torch.equal(holder(x), ref)  # zero up-projection: exactly the base output
    assert not adapter.projection.requires_grad and "projection" not in dict(adapter.named_parameters())


def test_feature_maps_estimate_their_kernels() -> None:
    """phi(w) . phi(h) is an unbiased estimate of the map's kernel: checked with many features."""
    g = torch.randn(400_000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.tensor([0.6, -0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    h = torch.tensor([0.2, 0.5, -0.4, 0.3, 0.1], dtype=torch.float64)
    theta = torch.arccos(w @ h / (w.norm() * h.norm()))  # arc-cosine kernel of order 1 (Cho & Saul 2009)
    arccos = w.norm() * h.norm() / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta))
    estimate = relu_features(w, g, 0.0) @ relu_features(h, g, 0.0)
    assert abs(float(estimate / arccos) - 1) < 0.02
    estimate = exp_features(w, g, 0.0) @ exp_features(h, g, 0.0)
    assert abs(float(estimate / torch.exp(w @ h)) - 1) < 0.02  # E exp(g.w - |w|^2/2) exp(g.h - |h|^2/2) = e^(w.h)


def test_saved_file_holds_only_trained_tensors_and_reloads_exactly(tmp_path) -> None:
    model = make_tiny("bert")
    spec = SNNK(features=8, seed=4)
    ak.attach(model, "s", spec, ["output.dense"])  # Houlsby placement: attention output and FFN output
    assert len(placements(model, "s")) == 4
    randomize(model, "s")
    ids = tokens()
    expected = logits(model, ids)
    ak.save(model, tmp_path / "s")
    record, tensors = ak.read(tmp_path / "s")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"psi", "modulation"}  # G is rebuilt from the seed
    assert record["spec"]["seed"] == 4
    fresh = make_tiny("bert")
    state = torch.random.get_rng_state()
    ak.load(fresh, tmp_path / "s")
    assert torch.equal(torch.random.get_rng_state(), state)  # G came from a private generator
    assert torch.equal(logits(fresh, ids), expected)


@pytest.mark.parametrize("hidden", [None, 5])
def test_fewer_trained_parameters_than_a_bottleneck_of_the_same_hidden_size(hidden) -> None:
    d, m = 32, 8
    counts = {}
    for name, spec in (("snnk", SNNK(features=m, hidden=hidden)), ("seq_bn", ak.SeqBottleneck(hidden=hidden or m))):
        model = make_tiny("bert")
        ak.attach(model, name, spec, [r"re:.*layer\.\d+\.output\.LayerNorm"])  # after each FFN: 2
        counts[name] = ak.train_only(model, name)
    k = hidden or d
    snnk = k * m + (d if hidden is None else d * k + d)  # Psi (k, m), then v (d,) or W_up (d, k) + b (d,)
    h = hidden or m
    assert counts["snnk"] == 2 * snnk
    assert counts["seq_bn"] == 2 * (2 * d * h + h + d)
    assert counts["snnk"] < counts["seq_bn"]


@pytest.mark.parametrize("fields,field", [
    ({"features": 0}, "features"), ({"hidden": 0}, "hidden"), ({"feature_map": "rbf"}, "feature_map"),
    ({"leak": -0.5}, "leak"), ({"leak": 0.1, "feature_map": "exp"}, "leak"), ({"seed": -1}, "seed"),
    ({"features": 3.0}, "features"),
])
def test_bad_spec_is_a_one_line_error(fields, field) -> None:
    with pytest.raises(SpecError, match=field) as info:
        SNNK(**fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("base,words", [
    (nn.Sequential(nn.Conv2d(3, 4, 3)), "Conv2d"),
    (nn.Sequential(nn.ReLU()), "cannot find the feature size"),
])
def test_a_module_snnk_cannot_wrap_is_a_one_line_error(base, words) -> None:
    with pytest.raises(TargetError, match=words) as info:
        ak.attach(base, "s", SNNK(), ["0"])
    assert "\n" not in str(info.value)
    assert not ak.adapters(base)

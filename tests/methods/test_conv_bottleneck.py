"""Convolutional bottleneck adapters (methods/conv_bottleneck.py): both forms against their equation written here in
float64 with unfold and einsum (no torch conv), the parallel form's geometry beside strided / padded / dilated convs,
placement on EfficientNet-Lite0's blocks, parameter counts, and bad input (one-line errors). The contract (identity
at init, only adapter parameters train, save/load bit-exact, detach restores the model) runs in
tests/conformance on the tiny CNN (cases_conv_bottleneck.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.conv_bottleneck import ParConvBottleneck, SeqConvBottleneck
from adapterkit.models.efficientnet_lite import EfficientNetLite0


def conv_ref(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int] = (1, 1),
             padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """A (groups 1) convolution as unfold + einsum: (B, C, H, W) -> (B, O, H', W')."""
    kh, kw = weight.shape[-2:]
    h_out = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    out = torch.einsum("bkl,ok->bol", cols, weight.reshape(weight.shape[0], -1))  # (B, O, L)
    out = out.reshape(x.shape[0], -1, h_out, w_out)
    return out if bias is None else out + bias[None, :, None, None]


def bottleneck_ref(h: Tensor, adapter: Any, act: Any, geometry: nn.Conv2d | None = None) -> Tensor:
    """s Up(act(Down(h))) with Down 1x1, or with the conv's geometry beside a conv."""
    p = {k: v.detach().double() for k, v in adapter.block.state_dict().items()}
    where = {} if geometry is None else dict(stride=geometry.stride, padding=geometry.padding,
                                             dilation=geometry.dilation)
    down = conv_ref(h, p["down.weight"], p["down.bias"], **where)
    return adapter.spec.scaling * conv_ref(act(down), p["up.weight"], p["up.bias"])


def _randomize(model: nn.Module, name: str, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, host in placements(model, name):
            for param in host.adapter(name).parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1), nn.BatchNorm2d(8),
                        nn.Conv2d(8, 8, 3, stride=1, padding=2, dilation=2, bias=False))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net.double().eval()


def test_sequential_equation_float64() -> None:
    net = _net()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        f0, f1 = net[0](x), net[1](net[0](x))
    spec = SeqConvBottleneck(reduction_factor=2, activation="gelu", scaling=0.7)
    ak.attach(net, "a", spec, ["1"])  # on the BatchNorm2d after the strided conv
    _randomize(net, "a")
    adapter = placements(net, "a")[0][2].adapter("a")
    with torch.no_grad():
        got = net[1](f0)
    want = f1 + bottleneck_ref(f1, adapter, F.gelu)
    assert adapter.block.down.weight.shape == (4, 8, 1, 1)  # hidden = 8 / 2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - f1).abs().max() > 1e-2  # the adapter really changes the output


@pytest.mark.parametrize("index", [0, 2])  # stride 2 + padding 1; dilation 2 + padding 2
def test_parallel_equation_float64_with_the_convs_geometry(index: int) -> None:
    net = _net()
    conv = net[index]
    x = torch.randn(2, conv.in_channels, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        base = conv(x)
    ak.attach(net, "a", ParConvBottleneck(hidden=3, activation="relu", scaling=2.0), [str(index)])
    _randomize(net, "a")
    adapter = placements(net, "a")[0][2].adapter("a")
    with torch.no_grad():
        got = conv(x)
    torch.testing.assert_close(got, base + bottleneck_ref(x, adapter, F.relu, conv), atol=1e-12, rtol=0)
    assert adapter.block.down.weight.shape == (3, conv.in_channels, 3, 3)


def test_parallel_beside_a_batchnorm_is_1x1() -> None:
    net = _net()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        base = net[1](x)
    ak.attach(net, "a", ParConvBottleneck(hidden=2), ["1"])
    _randomize(net, "a")
    adapter = placements(net, "a")[0][2].adapter("a")
    with torch.no_grad():
        got = net[1](x)
    assert adapter.block.down.weight.shape == (2, 8, 1, 1)
    torch.testing.assert_close(got, base + bottleneck_ref(x, adapter, F.relu), atol=1e-12, rtol=0)


def test_on_efficientnet_lite0_blocks_counts_and_trains() -> None:
    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = model(x)
    spec = SeqConvBottleneck(reduction_factor=8)
    plan = ak.explain(model, ["_project_conv"], spec)
    # per block: Down C -> C/8 and Up C/8 -> C, each with a bias, over the 16 blocks' output channels
    outs = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    expected = sum(2 * c * round(c / 8) + round(c / 8) + c for c in outs)
    assert len(plan.rows) == 16 and plan.adapter_params == expected
    ak.attach(model, "cb", spec, ["_project_conv"])
    ak.attach(model, "pb", ParConvBottleneck(reduction_factor=8), ["_depthwise_conv"])  # kxk, stride 2 in some
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)  # both start as identity
    count = ak.train_only(model, ["cb", "pb"], also=["_fc"])
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model(x).logsumexp(-1).mean().backward()
    ups = [host.adapter("cb").block.up.weight.grad for _, _, host in placements(model, "cb")]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)  # Up starts at zero: its gradient does not
    assert model._conv_stem.weight.grad is None


@pytest.mark.parametrize("spec,match", [
    (lambda: SeqConvBottleneck(reduction_factor=0), "reduction_factor must be > 0"),
    (lambda: SeqConvBottleneck(hidden=0), "hidden must be a positive integer"),
    (lambda: ParConvBottleneck(activation="swishy"), "activation must be one of"),
    (lambda: ParConvBottleneck(init="zeros"), "init must be one of"),
    (lambda: SeqConvBottleneck(scaling=-1.0), "scaling must be > 0"),
])
def test_bad_specs_fail_in_one_line(spec: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match) as exc:
        spec()
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec,targets,match", [
    (SeqConvBottleneck(), [nn.Linear], r"seq_conv_bottleneck cannot adapt 1 \(Linear\): needs a Conv2d"),
    (SeqConvBottleneck(hidden=9), ["0"], "hidden size 9 exceeds the 8 channels of 0"),
    (ParConvBottleneck(hidden=5), ["0"], "hidden size 5 exceeds the 4 channels of 0"),
    (ParConvBottleneck(), ["2"], r"2 changes the spatial size \(strided conv 0\)"),
])
def test_bad_targets_fail_in_one_line(spec: Any, targets: list, match: str) -> None:
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Linear(8, 8),
                        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8)))
    with pytest.raises(TargetError, match=match) as exc:
        ak.attach(net, "a", spec, targets)
    assert "\n" not in str(exc.value) and ak.adapters(net) == []

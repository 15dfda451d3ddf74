"""Each method against its paper's equation, evaluated independently in float64 on fresh random inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

import adapterkit as ak
from adapterkit.inject.engine import placements


def _one(module: nn.Module, spec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    holder = nn.Sequential(module).double()
    ak.attach(holder, "a", spec, targets=[type(module)])
    adapter = placements(holder, "a")[0][2].adapter("a")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and "magnitude" not in str(p.shape) else 0.0))
    return holder


def test_lora_and_rslora_equation() -> None:
    for scaling, factor in (("lora", 12 / 4), ("rslora", 12 / math.sqrt(4))):
        base = nn.Linear(10, 7)
        holder = _one(base, ak.LoRA(r=4, alpha=12, scaling=scaling))
        adapter = placements(holder, "a")[0][2].adapter("a")
        x = torch.randn(3, 5, 10, dtype=torch.float64)
        expected = x @ base.weight.T + base.bias + factor * (x @ adapter.lora_a.T @ adapter.lora_b.T)
        torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)


def test_lora_conv2d_and_embedding_equations() -> None:
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    holder = _one(conv, ak.LoRA(r=2, alpha=4))
    adapter = placements(holder, "a")[0][2].adapter("a")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    delta_w = (adapter.lora_b.reshape(5, 2) @ adapter.lora_a.reshape(2, -1)).reshape(5, 3, 3, 3) * 2
    expected = nn.functional.conv2d(x, conv.weight + delta_w, conv.bias, padding=1)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)

    emb = nn.Embedding(20, 6)
    holder = _one(emb, ak.LoRA(r=3, alpha=3))
    adapter = placements(holder, "a")[0][2].adapter("a")
    ids = torch.randint(0, 20, (4, 5))
    expected = emb.weight[ids] + (adapter.lora_b @ adapter.lora_a).T[ids]
    torch.testing.assert_close(holder(ids), expected, atol=1e-12, rtol=0)


def test_dora_equation() -> None:
    base = nn.Linear(9, 6)
    holder = _one(base, ak.DoRA(r=3, alpha=6))
    adapter = placements(holder, "a")[0][2].adapter("a")
    x = torch.randn(4, 9, dtype=torch.float64)
    v = base.weight + 2 * adapter.lora.lora_b @ adapter.lora.lora_a  # V = W0 + s B A
    w = adapter.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)  # W' = m V / ||V||
    torch.testing.assert_close(holder(x), x @ w.T + base.bias, atol=1e-12, rtol=0)


def test_ia3_equations() -> None:
    base = nn.Linear(5, 4)
    x = torch.randn(3, 5, dtype=torch.float64)
    holder = _one(base, ak.IA3())
    scale = placements(holder, "a")[0][2].adapter("a").ia3_l
    torch.testing.assert_close(holder(x), (x @ base.weight.T + base.bias) * scale, atol=1e-12, rtol=0)
    base = nn.Linear(5, 4)
    holder = _one(base, ak.IA3(position="input"))
    scale = placements(holder, "a")[0][2].adapter("a").ia3_l
    torch.testing.assert_close(holder(x), (x * scale) @ base.weight.T + base.bias, atol=1e-12, rtol=0)


def _mlp(adapter, h):
    block = adapter.block
    return block.up.weight @ torch.relu(block.down.weight @ h + block.down.bias) + block.up.bias


def test_bottleneck_equations() -> None:
    x = torch.randn(6, dtype=torch.float64)
    base = nn.Linear(6, 6)
    holder = _one(base, ak.SeqBottleneck(hidden=3, scaling=0.5))
    f = base.weight @ x + base.bias
    expected = f + 0.5 * _mlp(placements(holder, "a")[0][2].adapter("a"), f)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)

    norm = nn.LayerNorm(6)
    holder = _one(norm, ak.SeqBottleneck(hidden=3))
    adapter = placements(holder, "a")[0][2].adapter("a")
    ln = nn.functional.layer_norm
    expected = ln(x + _mlp(adapter, ln(x, (6,), norm.weight, norm.bias)), (6,), norm.weight, norm.bias)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)

    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    torch.manual_seed(0)
    holder = nn.Sequential(mlp).double()
    ak.attach(holder, "a", ak.ParBottleneck(hidden=2, scaling=4.0), targets=["re:0"])
    adapter = placements(holder, "a")[0][2].adapter("a")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    with ak.use(holder):  # the bare sub-layer
        plain = mlp(x)
    torch.testing.assert_close(holder(x), plain + 4.0 * _mlp(adapter, x), atol=1e-12, rtol=0)


def test_bitfit_equation() -> None:
    base = nn.Linear(4, 3)
    holder = _one(base, ak.BitFit())
    delta = placements(holder, "a")[0][2].adapter("a").delta_b
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(holder(x), x @ base.weight.T + base.bias + delta, atol=1e-12, rtol=0)

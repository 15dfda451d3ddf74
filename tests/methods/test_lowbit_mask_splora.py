"""Low-bit adapters, mask tuning and SPLoRA against their papers' equations (float64), storage, pruning and export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.inject.engine import placements
from adapterkit.methods.lowbit import lloyd_max_normal
from adapterkit.methods.mask_tuning import mask_regularizer, masked_fraction
from adapterkit.methods.splora import kept_channels, prune_channels, shrink, sparsity_schedule
from tests.conftest import logits, make_tiny, randomize, tokens


def _one(module: nn.Module, spec, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    holder = nn.Sequential(module).double()
    ak.attach(holder, "a", spec, targets=[type(module)])
    adapter = placements(holder, "a")[0][2].adapter("a")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return holder, adapter


def _quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The paper's QLinear forward value, in float64: Lloyd-Max level of (W - mu) / (sigma + eps), rescaled."""
    levels, thresholds = (torch.tensor(v, dtype=torch.float64) for v in lloyd_max_normal(bits))
    mu, sigma = w.mean(), w.std()
    w_hat = (w - mu) / (sigma + 1e-5)
    return levels[(w_hat[..., None] > thresholds).sum(-1)] * sigma + mu


def test_lloyd_max_levels_of_the_normal() -> None:
    (low, high), (threshold,) = lloyd_max_normal(1)
    assert high == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12) and low == -high and threshold == 0
    levels, _ = lloyd_max_normal(2)  # the classic 4-level Max quantiser: +-0.4528, +-1.510
    assert levels[2] == pytest.approx(0.4528, abs=1e-4) and levels[3] == pytest.approx(1.5104, abs=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lowbit_lora_equation(bits) -> None:
    base = nn.Linear(10, 7)
    holder, adapter = _one(base, ak.methods.LowBit(ak.LoRA(r=4, alpha=8), bits=bits))
    a = adapter.inner.parametrizations.lora_a.original
    b = adapter.inner.parametrizations.lora_b.original
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ _quantize(a, bits).T @ _quantize(b, bits).T)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)
    assert len(torch.unique(adapter.inner.lora_a)) <= 2 ** bits  # at most 2^k distinct values per matrix


def test_straight_through_gradient_reaches_the_latents() -> None:
    base = nn.Linear(6, 5)
    holder, adapter = _one(base, ak.methods.LowBit(ak.LoRA(r=2, alpha=2), bits=1))
    holder(torch.randn(4, 6, dtype=torch.float64)).pow(2).sum().backward()
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0  # sign() alone would give zero gradients


def test_lowbit_bottleneck_equation() -> None:
    norm = nn.LayerNorm(8)
    holder, adapter = _one(norm, ak.methods.LowBit(ak.SeqBottleneck(hidden=3, scaling=2.0), bits=1))
    block = adapter.inner.block
    down, up = block.down.parametrizations.weight.original, block.up.parametrizations.weight.original
    x = torch.randn(4, 8, dtype=torch.float64)
    f = nn.functional.layer_norm(x, (8,), norm.weight, norm.bias)
    delta = 2.0 * (torch.relu(f @ _quantize(down, 1).T + block.down.bias) @ _quantize(up, 1).T + block.up.bias)
    expected = nn.functional.layer_norm(x + delta, (8,), norm.weight, norm.bias)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)


def test_lowbit_stores_bits_and_reloads_the_quantised_function(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.methods.LowBit(ak.LoRA(r=8), bits=1), ["query", "value"])
    randomize(model, "a")
    ids = tokens()
    expected = logits(model, ids)
    ak.save(model, tmp_path / "bit")
    _, tensors = ak.read(tmp_path / "bit")
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    floats = 4 * sum(p.numel() for _, _, h in placements(model, "a") for p in h.adapter("a").parameters())
    assert floats / weights > 16  # 1 bit + a header per matrix, two float32 statistics per matrix
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "bit")
    assert torch.equal(logits(fresh, ids), expected)
    ak.save(fresh, tmp_path / "again")  # re-saving a loaded adapter writes the same codes
    assert all(torch.equal(v, ak.read(tmp_path / "again")[1][k]) for k, v in tensors.items())


def test_mask_tuning_equation_and_regulariser() -> None:
    base = nn.Linear(9, 6)
    holder, adapter = _one(base, ak.methods.MaskTuning(init=0.01, threshold=0.005, reg=1e-4))
    x = torch.randn(4, 9, dtype=torch.float64)
    keep = (adapter.scores > 0.005).double()
    torch.testing.assert_close(holder(x), x @ (keep * base.weight).T + base.bias, atol=1e-12, rtol=0)
    assert 0 < keep.mean() < 1
    reg = mask_regularizer(holder, "a")
    assert reg.item() == pytest.approx(1e-4 * adapter.scores.norm().item(), rel=1e-12)
    assert masked_fraction(holder, "a") == pytest.approx(1 - keep.mean().item())
    reg.backward()
    torch.testing.assert_close(adapter.scores.grad, 1e-4 * adapter.scores / adapter.scores.norm())


def test_mask_tuning_gradient_is_straight_through() -> None:
    base = nn.Linear(5, 3)
    holder, adapter = _one(base, ak.methods.MaskTuning())
    x = torch.randn(2, 5, dtype=torch.float64)
    holder(x).sum().backward()
    # dL/dM := dL/dW_eff * W, with dL/dW_eff = sum over rows of x for an output sum
    expected = torch.ones(2, 3, dtype=torch.float64).T @ x * base.weight
    torch.testing.assert_close(adapter.scores.grad, expected, atol=1e-12, rtol=0)


def test_splora_equation_with_pruned_channels() -> None:
    base = nn.Linear(8, 6)
    holder, adapter = _one(base, ak.methods.SPLoRA(r=2))
    with torch.no_grad():
        adapter.keep[[1, 4]] = False
    x = torch.randn(3, 8, dtype=torch.float64)
    w = base.weight + adapter.cols @ adapter.rows
    mask = adapter.keep.double()
    torch.testing.assert_close(holder(x), (x @ w.T + base.bias + adapter.bias) * mask, atol=1e-12, rtol=0)


def test_iterative_schedule_prunes_the_weakest_fused_rows_monotonically() -> None:
    assert sparsity_schedule(0.5, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert len(sparsity_schedule(0.95)) == 19
    model = make_tiny("bert")
    ak.attach(model, "p", ak.methods.SPLoRA(r=4), ["intermediate.dense"])
    randomize(model, "p")
    before = None
    for sparsity in sparsity_schedule(0.5, 0.25):
        kept = prune_channels(model, "p", sparsity)
        assert all(v == 64 - round(sparsity * 64) for v in kept.values())
        keep = kept_channels(model, "p")
        if before is not None:
            assert all(not (k & ~before[p]).any() for p, k in keep.items())  # pruned stays pruned
        before = keep
    path = "bert.encoder.layer.0.intermediate.dense"
    adapter = placements(model, "p")[0][2].adapter("p")
    layer = model.get_submodule(path)
    norms = (layer.weight + adapter.cols @ adapter.rows).norm(dim=1)
    assert norms[keep[path]].min() >= norms[~keep[path]].max()  # one step from dense keeps the same set


def test_splora_export_is_smaller_and_equals_the_masked_model(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "p", ak.methods.SPLoRA(r=4), ["intermediate.dense"])
    randomize(model, "p")
    for sparsity in sparsity_schedule(0.5, 0.25):
        prune_channels(model, "p", sparsity)
    ids = tokens()
    masked = logits(model, ids)
    ak.save(model, tmp_path / "p")
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "p")
    assert torch.equal(logits(fresh, ids), masked)
    _, stored = ak.read(tmp_path / "p")
    assert stored["adapter.bert.encoder.layer.0.intermediate.dense.cols"].shape == (32, 4)  # kept rows only

    exported = copy.deepcopy(model)
    keep = kept_channels(exported, "p")
    ak.merge(exported, "p")
    ak.detach(exported, "p", keep_merged=True)
    shrink(exported, keep)
    for layer in exported.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    torch.testing.assert_close(logits(exported, ids), masked, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in make_tiny("bert").parameters())


def test_splora_unmerge_restores_pruned_rows_exactly() -> None:
    model = make_tiny("bert")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ak.attach(model, "p", ak.methods.SPLoRA(r=4), ["intermediate.dense"])
    randomize(model, "p")
    prune_channels(model, "p", 0.5)
    ak.merge(model, "p")
    assert (model.bert.encoder.layer[0].intermediate.dense.weight.abs().sum(1) == 0).sum() == 32
    ak.unmerge(model, "p")
    after = model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)


def test_shrink_refuses_layers_that_still_have_adapters() -> None:
    model = make_tiny("bert")
    ak.attach(model, "p", ak.methods.SPLoRA(r=4), ["intermediate.dense"])
    with pytest.raises(ak.TargetError, match="merge and detach them first"):
        shrink(model, kept_channels(model, "p"))

"""MoSA (masks, one expert per step, merge = mean of the copies, consistency loss) and AdapterBit, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.inject.engine import placements
from adapterkit.methods.mosa import consistency_loss, merged_bottleneck
from tests.conftest import make_tiny, randomize, tokens


def _attached(spec, size: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(size, size)).double()
    ak.attach(holder, "a", spec, targets=[nn.Linear])
    adapter = placements(holder, "a")[0][2].adapter("a")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return holder, adapter


def test_masks_are_disjoint_cover_and_balanced() -> None:
    _, adapter = _attached(ak.methods.MoSA(hidden=5, experts=3, split="all"))
    for name in ("down.weight", "up.weight"):
        owner = adapter.owner(name)
        assert owner.shape == adapter.adapter.block.get_parameter(name).shape
        counts = torch.bincount(owner.flatten().long(), minlength=3)
        assert counts.sum() == owner.numel() and len(counts) == 3  # every entry has exactly one expert
        assert int(counts.max() - counts.min()) <= 1
    model_a, model_b = make_tiny("bert"), make_tiny("bert")
    ak.attach(model_a, "a", ak.methods.MoSA(reduction_factor=4), ["output.LayerNorm"])
    ak.attach(model_b, "a", ak.methods.MoSA(reduction_factor=4), ["output.LayerNorm"])
    owners_a = [h.adapter("a").owner("up.weight") for _, _, h in placements(model_a, "a")]
    owners_b = [h.adapter("a").owner("up.weight") for _, _, h in placements(model_b, "a")]
    assert all(torch.equal(a, b) for a, b in zip(owners_a, owners_b, strict=True))  # rebuilt from the seed


def test_training_forward_is_one_expert_copy_and_updates_only_its_mask() -> None:
    holder, adapter = _attached(ak.methods.MoSA(hidden=4, experts=4, split="all", scaling=0.5))
    holder.train()
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.manual_seed(11)
    out = holder(x)
    torch.manual_seed(11)
    choice = {n: int(torch.randint(4, (1,))) for n in ("down.weight", "up.weight")}
    block, base = adapter.adapter.block, holder[0]
    weights = adapter.expert_weights(choice)
    f = x @ base.weight.T + base.bias
    expected = f + 0.5 * (F.relu(f @ weights["down.weight"].T + block.down.bias) @ weights["up.weight"].T
                          + block.up.bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    mask = adapter.owner("down.weight") == choice["down.weight"]
    torch.testing.assert_close(weights["down.weight"], adapter.down_init + block.down.weight * mask)
    out.pow(2).sum().backward()
    for name in ("down.weight", "up.weight"):
        grad = block.get_parameter(name).grad
        outside = adapter.owner(name) != choice[name]
        assert grad.abs().sum() > 0 and grad[outside].abs().sum() == 0  # one sparse copy trained this step


def test_merged_adapter_is_the_mean_of_the_copies_and_a_plain_bottleneck() -> None:
    for split in ("up", "all"):
        holder, adapter = _attached(ak.methods.MoSA(hidden=4, experts=3, split=split, scaling=0.5))
        copies = [adapter.expert_weights(dict.fromkeys(adapter.split_names, i)) for i in range(3)]
        merged = adapter.merged_weights()
        for name in adapter.split_names:
            mean = sum(c[name] for c in copies) / 3
            torch.testing.assert_close(merged[name], mean, atol=1e-12, rtol=0)
            union = sum(c[name] * (adapter.owner(name) == i) for i, c in enumerate(copies))  # each mask from its copy
            start = adapter.down_init if name == "down.weight" else torch.zeros_like(union)
            torch.testing.assert_close(merged[name], start + (union - start) / 3, atol=1e-12, rtol=0)  # W0 + P / E
        holder.eval()
        x = torch.randn(5, 12, dtype=torch.float64)
        spec, state = merged_bottleneck(adapter)
        assert spec == ak.SeqBottleneck(hidden=4, scaling=0.5)
        plain = nn.Sequential(holder[0])
        expected = holder(x)
        ak.detach(holder)
        ak.attach(plain, "dense", spec, targets=[nn.Linear])
        placements(plain, "dense")[0][2].adapter("dense").load_state_dict(state)
        torch.testing.assert_close(plain(x), expected, atol=1e-12, rtol=0)


def test_same_seed_same_expert_draws() -> None:
    outs = []
    for _ in range(2):
        model = make_tiny("bert")
        ak.attach(model, "a", ak.methods.MoSA(reduction_factor=4, experts=4), ["output.LayerNorm"])
        randomize(model, "a")
        model.train()
        torch.manual_seed(3)
        outs.append(torch.stack([model(input_ids=tokens()).logits for _ in range(4)]))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0][0], outs[0][1]) or not torch.equal(outs[0][1], outs[0][2])  # draws differ


def test_consistency_loss_equation() -> None:
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    p, q = a.softmax(-1), b.softmax(-1)
    kl = lambda u, v: (u * (u / v).log()).sum(-1).mean()  # noqa: E731
    expected = 0.5 * (kl(p, q) + kl(q, p))
    loss = consistency_loss(a, b)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=0)
    assert float(consistency_loss(a, a).detach()) == 0.0
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_adapterbit_equations() -> None:
    holder, adapter = _attached(ak.methods.AdapterBit())  # s = 0.1, hidden = 12 / 2, GELU
    block, base, delta_b = adapter.adapter.block, holder[0], adapter.bias.delta_b
    assert block.down.weight.shape == (6, 12)
    x = torch.randn(3, 12, dtype=torch.float64)
    f = x @ base.weight.T + base.bias + delta_b
    expected = f + 0.1 * (F.gelu(f @ block.down.weight.T + block.down.bias) @ block.up.weight.T + block.up.bias)
    torch.testing.assert_close(holder(x), expected, atol=1e-12, rtol=0)

    torch.manual_seed(0)
    norm = nn.LayerNorm(8).double()
    holder = nn.Sequential(norm)
    ak.attach(holder, "a", ak.methods.AdapterBit(hidden=3), targets=[nn.LayerNorm])
    adapter = placements(holder, "a")[0][2].adapter("a")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    block, delta_b = adapter.adapter.block, adapter.bias.delta_b
    x = torch.randn(2, 8, dtype=torch.float64)
    ln = lambda z: F.layer_norm(z, (8,), norm.weight, norm.bias + delta_b)  # noqa: E731  LN with the tuned bias
    mlp = lambda h: F.gelu(h @ block.down.weight.T + block.down.bias) @ block.up.weight.T + block.up.bias  # noqa: E731
    torch.testing.assert_close(holder(x), ln(x + 0.1 * mlp(ln(x))), atol=1e-12, rtol=0)


def test_adapterbit_trains_the_target_bias_and_rejects_biasless_targets() -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.methods.AdapterBit(), ["output.dense"])
    ak.train_only(model, "a")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # "output.dense" ends both sub-layers (attention and FFN) of the 2 layers: 4 adapters, 4 tuned biases
    assert sum(n.endswith("bias.delta_b") for n in trainable) == 4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (32 + 2 * 32 * 16 + 16 + 32)
    with pytest.raises(ak.TargetError, match="with a bias"):
        ak.attach(nn.Sequential(nn.Linear(4, 4, bias=False)), "a", ak.methods.AdapterBit(), [nn.Linear])

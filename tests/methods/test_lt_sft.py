"""LT-SFT: the sparse diff's equation, top-K selection, exact apply/revert, composition by addition, the sparse
file, the two-phase procedure, and bad input (another base model, malformed indices)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.methods.lt_sft import add_diff, diffs, keep_top_k, lottery_ticket
from tests.conftest import logits, make_tiny, tokens


def _holder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _set(model: nn.Module, name: str, values_by_layer: list[tuple[list[int], list[float]]]) -> None:
    for diff, (idx, vals) in zip(diffs(model, name), values_by_layer, strict=True):
        diff.set_support(torch.tensor(idx), torch.tensor(vals, dtype=torch.float64))


def test_equation_float64() -> None:
    model = _holder()
    ak.attach(model, "d", ak.methods.LTSFT(k=4), targets=[nn.Linear])
    first = model[0]
    _set(model, "d", [([0, 7, 29, 31], [0.5, -1.0, 2.0, 0.25]), ([3], [1.5])])  # 30 weights, then 5 biases
    delta_w = torch.zeros(30, dtype=torch.float64)
    delta_w[[0, 7, 29]] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    delta_b = torch.zeros(5, dtype=torch.float64)
    delta_b[1] = 0.25
    x = torch.randn(3, 6, dtype=torch.float64)
    hidden = torch.tanh(x @ (first.weight + delta_w.view(5, 6)).T + first.bias + delta_b)
    second_w = model[2].weight.detach().clone().reshape(-1)
    second_w[3] += 1.5
    expected = hidden @ second_w.view(4, 5).T + model[2].bias
    torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)


def test_sparse_product_matches_the_dense_delta_and_its_gradients(monkeypatch) -> None:
    from adapterkit.methods import lt_sft

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(40, 30)).double()
    ak.attach(holder, "d", ak.methods.LTSFT(k=9), targets=[nn.Linear])
    diff = diffs(holder, "d")[0]
    index = torch.tensor([0, 41, 77, 399, 800, 1199, 1200, 1215, 1229])  # weight entries, then 3 bias entries
    diff.set_support(index, torch.randn(9, dtype=torch.float64))
    x = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    results = []
    for threshold in (1.0, 0.0):  # sparse product (9 of 1230 entries), then the dense path forced
        monkeypatch.setattr(lt_sft, "_SPARSE_BELOW", threshold)
        diff.values.grad, x.grad = None, None
        out = holder(x)
        (out * torch.linspace(-1, 1, 30, dtype=torch.float64)).sum().backward()
        results.append((out.detach(), x.grad.clone(), diff.values.grad.clone()))
    for sparse, dense in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=0)
    weight = torch.zeros(1200, dtype=torch.float64)
    weight[index[:6]] = diff.values.detach()[:6]
    expected = x.detach() @ (holder[0].weight + weight.view(30, 40)).T + holder[0].bias
    expected[..., [0, 15, 29]] += diff.values.detach()[6:]
    torch.testing.assert_close(results[0][0], expected, atol=1e-12, rtol=0)


def test_top_k_keeps_the_most_changed_entries_over_all_layers_and_resets() -> None:
    model = _holder()
    ak.attach(model, "d", ak.methods.LTSFT(k=3), targets=[nn.Linear])
    parts = diffs(model, "d")
    assert [d.values.numel() for d in parts] == [35, 24]  # dense at start: phase 1 trains every entry
    with torch.no_grad():
        for d in parts:
            d.values.fill_(0.01)
        parts[0].values[[4, 33]] = torch.tensor([-3.0, 2.0], dtype=torch.float64)
        parts[1].values[10] = 5.0
        parts[1].values[11] = 1.0  # the 4th largest: dropped
    assert keep_top_k(model, "d") == 3
    assert parts[0].indices.tolist() == [4, 33] and parts[1].indices.tolist() == [10]
    assert parts[0].indices.dtype == torch.int32
    assert all(torch.equal(d.values, torch.zeros_like(d.values)) for d in parts)  # reset to theta0


def test_apply_revert_restores_the_base_bit_exactly() -> None:
    model = make_tiny("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens()
    ak.attach(model, "d", ak.methods.LTSFT(k=200), targets=["query", "value", "dense"])
    generator = torch.Generator().manual_seed(0)

    def any_magnitude() -> None:  # values from 1e-9 to 1: W + v - v would not round back to W in float32
        with torch.no_grad():
            for d in diffs(model, "d"):
                scale = 10.0 ** torch.randint(-9, 1, d.values.shape, generator=generator)
                d.values.copy_(torch.randn(d.values.shape, generator=generator) * scale)

    any_magnitude()
    keep_top_k(model, "d")
    any_magnitude()
    unmerged = logits(model, ids)
    ak.merge(model, "d")  # apply
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    changed = sum(int((model.state_dict()[k] != v).sum()) for k, v in before.items())
    assert 0 < changed <= 200
    ak.unmerge(model, "d")  # revert
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ak.AdapterKitError, match="not merged"):
        ak.unmerge(model, "d")


def _base(model: nn.Module) -> list[torch.Tensor]:
    return [model[0].weight, model[0].bias, model[2].weight, model[2].bias]


def test_two_diffs_compose_by_addition_float64() -> None:
    model = _holder()
    base = [p.detach().clone() for p in _base(model)]
    ak.attach(model, "domain", ak.methods.LTSFT(k=3), targets=[nn.Linear])
    ak.attach(model, "task", ak.methods.LTSFT(k=3), targets=[nn.Linear])
    _set(model, "domain", [([1, 30], [0.125, -0.5]), ([0], [0.3])])
    _set(model, "task", [([1, 2], [0.7, 0.1]), ([23], [-0.2])])  # overlaps the domain diff at entry 1
    expected = [p.clone() for p in base]
    by_layer = ((0, [([1, 30], [0.125, -0.5]), ([1, 2], [0.7, 0.1])]), (1, [([0], [0.3]), ([23], [-0.2])]))
    for layer, diff_sets in by_layer:
        weight, bias = expected[2 * layer].view(-1), expected[2 * layer + 1]
        for idx, vals in diff_sets:
            for i, v in zip(idx, vals, strict=True):
                if i < weight.numel():
                    weight[i] += v
                else:
                    bias[i - weight.numel()] += v
    x = torch.randn(4, 6, dtype=torch.float64)
    both_unmerged = model(x)
    ak.merge(model, "domain")
    ak.merge(model, "task")
    assert all(torch.equal(p, e) for p, e in zip(_base(model), expected, strict=True))  # base + d1 + d2
    torch.testing.assert_close(model(x), both_unmerged, atol=1e-12, rtol=0)
    ak.unmerge(model, "domain")  # revert one, keep the other
    ak.unmerge(model, "task")
    assert all(torch.equal(p, b) for p, b in zip(_base(model), base, strict=True))
    add_diff(model, "domain", "task")  # one diff that applies both
    assert diffs(model, "domain")[0].indices.tolist() == [1, 2, 30]
    assert diffs(model, "domain")[0].values.tolist() == pytest.approx([0.825, 0.1, -0.5], abs=1e-15)
    ak.detach(model, "task")
    ak.merge(model, "domain")
    for p, e in zip(_base(model), expected, strict=True):
        torch.testing.assert_close(p, e, atol=1e-15, rtol=0)


def _sparse_saved(tmp_path, k: int = 40):
    model = make_tiny("bert")
    ak.attach(model, "d", ak.methods.LTSFT(k=k), targets=["query", "value"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for d in diffs(model, "d"):
            d.values.copy_(torch.randn(d.values.shape, generator=generator))
    keep_top_k(model, "d")
    with torch.no_grad():
        for d in diffs(model, "d"):
            d.values.copy_(torch.randn(d.values.shape, generator=generator) * 0.1)
    ak.save(model, tmp_path / "d")
    return model


def test_sparse_file_round_trip_is_exact(tmp_path) -> None:
    model = _sparse_saved(tmp_path)
    record, tensors = ak.read(tmp_path / "d")
    assert sum(v.numel() for k, v in tensors.items() if k.endswith(".values")) == 40
    assert all(v.dtype == torch.int32 and v.dim() == 1 for k, v in tensors.items() if k.endswith(".indices"))
    assert (tmp_path / "d" / record["weights"]).stat().st_size < 40 * 8 + 4096  # K * (4 + 4) bytes plus headers
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "d")
    for a, b in zip(diffs(model, "d"), diffs(fresh, "d"), strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
    ak.merge(fresh, "d")
    ak.merge(model, "d")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_diff_for_another_base_model_is_refused(tmp_path) -> None:
    _sparse_saved(tmp_path)
    other = make_tiny("bert", seed=7)  # same architecture, other weights
    with pytest.raises(ak.StateError, match="differ from the base model") as exc:
        ak.load(other, tmp_path / "d")
    assert "\n" not in str(exc.value)
    assert ak.adapters(other) == []


def _tamper(folder, edit) -> None:
    record = json.loads((folder / "adapter.json").read_text())
    weights = folder / record["weights"]
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "adapter.json").write_text(json.dumps(record))


@pytest.mark.parametrize("edit,message", [
    (lambda t, k: t.__setitem__(k, t[k][None, :]), "must be 1-D and of equal length"),
    (lambda t, k: t.__setitem__(k, t[k][:-1]), "must be 1-D and of equal length"),
    (lambda t, k: t.__setitem__(k, t[k] + 10_000), "must lie in"),
    (lambda t, k: t.__setitem__(k, t[k].flip(0)), "strictly increasing"),
    (lambda t, k: t.__setitem__(k, t[k].float()), "int32 or int64"),
])
def test_malformed_indices_are_a_clear_error(tmp_path, edit, message) -> None:
    _sparse_saved(tmp_path)

    def change(tensors):
        key = next(k for k in tensors if k.endswith("query.indices"))
        edit(tensors, key)

    _tamper(tmp_path / "d", change)
    fresh = make_tiny("bert")
    with pytest.raises(ak.StateError, match=message) as exc:
        ak.load(fresh, tmp_path / "d")
    assert "\n" not in str(exc.value) and "query" in str(exc.value)
    assert ak.adapters(fresh) == []


def test_lottery_ticket_two_phases() -> None:
    model = make_tiny("bert")
    ak.attach(model, "d", ak.methods.LTSFT(k=30), targets=["query", "value"])
    ak.train_only(model, "d", also=["classifier"])
    head = model.classifier.weight.detach().clone()
    generator = torch.Generator().manual_seed(5)
    seen: list[tuple[list[int], float]] = []
    phase1: list[torch.Tensor] = []

    def train() -> None:  # a fake trainer: moves every trainable entry, records what it was given
        parts = diffs(model, "d")
        seen.append(([d.values.numel() for d in parts], parts[0].l1))
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
            for d in parts:
                d.values.copy_(torch.randn(d.values.shape, generator=generator))
        phase1.append(torch.cat([d.values.detach().abs() for d in parts]))

    assert lottery_ticket(model, "d", train, l1_full=2.0, l1_sparse=3.0) == 30
    sizes = [d.size for d in diffs(model, "d")]
    total = sum(sizes)
    assert seen[0] == (sizes, 2.0 / total) and sum(seen[1][0]) == 30 and seen[1][1] == 3.0 / total
    assert all(d.l1 == 0.0 for d in diffs(model, "d"))
    scores = phase1[0].tolist()
    owners = [(layer, j) for layer, size in enumerate(sizes) for j in range(size)]
    expected = {owners[i] for i in sorted(range(len(scores)), key=scores.__getitem__)[-30:]}
    kept = {(layer, int(j)) for layer, d in enumerate(diffs(model, "d")) for j in d.indices}
    assert kept == expected
    torch.testing.assert_close(model.classifier.weight, head + 1.0)  # reset to theta0 before phase 2, then trained
    assert all(d.values.requires_grad for d in diffs(model, "d"))


def test_l1_pull_adds_lambda_times_sign_to_the_gradient() -> None:
    model = _holder()
    ak.attach(model, "d", ak.methods.LTSFT(k=2), targets=[nn.Linear])
    _set(model, "d", [([0, 1], [0.5, -0.5]), ([], [])])
    diff = diffs(model, "d")[0]
    diff.l1 = 0.25
    model(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()  # zero input: the weights' own gradient is 0
    torch.testing.assert_close(diff.values.grad, torch.tensor([0.25, -0.25], dtype=torch.float64))

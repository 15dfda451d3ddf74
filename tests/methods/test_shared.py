"""Shared adapters (VL-Adapter's weight sharing): one parameter set for every placement, counted and stored once;
its gradient is the sum of the per-layer gradients of a hand-tied copy; merge, save/load, detach and errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.shared import Shared
from tests.conftest import logits, make_tiny, randomize, tokens

BN = ak.SeqBottleneck(reduction_factor=4)  # tiny BERT: d = 32, h = 8 -> 32*8 + 8 + 8*32 + 32 = 552 parameters


def _params(model, name: str) -> list[torch.Tensor]:
    return [p for _, _, host in placements(model, name) for p in host.adapter(name).parameters()]


def test_one_parameter_set_counted_and_stored_once(tmp_path) -> None:
    model = make_tiny("bert")
    plan = ak.explain(model, ["output.LayerNorm"], Shared(BN))
    ak.attach(model, "s", Shared(BN), ["output.LayerNorm"])
    assert len(placements(model, "s")) == 4
    assert plan.adapter_params == ak.train_only(model, "s") == 552
    counts = [sum(p.numel() for p in host.adapter("s").parameters()) for _, _, host in placements(model, "s")]
    assert counts == [552, 0, 0, 0]
    first = placements(model, "s")[0][2].adapter("s").inner.block
    for _, _, host in placements(model, "s"):  # every placement reads the very same tensors
        assert host.adapter("s").inner.block.down.weight is first.down.weight
    record, _ = ak.read(ak.save(model, tmp_path / "s"))
    keys = load_file(tmp_path / "s" / record["weights"]).keys()
    assert sorted(keys) == sorted(f"adapter.{record['targets'][0]}.inner.block.{n}"
                                  for n in ("down.weight", "down.bias", "up.weight", "up.bias"))


def _hand_tied(kind: str, spec, targets, seed: int = 3):
    """(shared model, reference model): the reference holds the plain adapter at every placement, each a copy of
    the shared weights; both in float64."""
    shared = make_tiny(kind).double()
    ak.attach(shared, "s", Shared(spec), targets)
    randomize(shared, "s", scale=0.3, seed=seed)
    owner = placements(shared, "s")[0][2].adapter("s").inner.state_dict()
    reference = make_tiny(kind).double()
    ak.attach(reference, "s", spec, targets)
    with torch.no_grad():
        for _, _, host in placements(reference, "s"):
            host.adapter("s").load_state_dict(owner)
    return shared, reference


@pytest.mark.parametrize("kind,spec,targets", [("bert", BN, ["output.LayerNorm"]),
                                               ("bert", ak.LoRA(r=4), ["query", "value"]),
                                               ("gpt2", ak.LoRA(r=2), ["c_attn"])])
def test_outputs_and_gradient_equal_the_sum_over_a_hand_tied_copy(kind, spec, targets) -> None:
    shared, reference = _hand_tied(kind, spec, targets)
    ids = tokens(batch=3)
    for model in (shared, reference):
        ak.train_only(model, "s")  # eval mode: no dropout, so both see the same computation
        model(input_ids=ids).logits.pow(2).sum().backward()
    torch.testing.assert_close(logits(shared, ids), logits(reference, ids), atol=1e-12, rtol=0)
    names = [n for n, _ in placements(shared, "s")[0][2].adapter("s").inner.named_parameters()]
    grads = dict(zip(names, (p.grad for p in _params(shared, "s"))))
    per_layer = [dict(host.adapter("s").named_parameters()) for _, _, host in placements(reference, "s")]
    assert len(per_layer) > 1
    for name, grad in grads.items():
        expected = sum(layer[name].grad for layer in per_layer)
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)
        assert not torch.allclose(grad, per_layer[0][name].grad)  # the other layers really contribute


def test_save_load_is_bit_exact_and_resumes_to_the_same_outputs(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "s", Shared(BN), ["output.LayerNorm"])
    randomize(model, "s")
    ak.save(model, tmp_path / "s")
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "s")
    ids = tokens()
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert sum(p.numel() for p in _params(fresh, "s")) == 552
    for each in (model, fresh):  # one identical step on both: the loaded adapter is tied again
        ak.train_only(each, "s")
        optimizer = torch.optim.SGD([p for p in each.parameters() if p.requires_grad], lr=0.5)
        each(input_ids=ids).logits.pow(2).sum().backward()
        optimizer.step()
    after = logits(model, ids)
    assert torch.equal(logits(fresh, ids), after) and not torch.equal(after, logits(make_tiny("bert"), ids))


def test_a_shared_lora_merges_the_same_delta_everywhere_and_a_bottleneck_refuses() -> None:
    model = make_tiny("bert")
    ak.attach(model, "s", Shared(ak.LoRA(r=4)), ["query", "value"])
    randomize(model, "s", scale=0.2)
    inner = placements(model, "s")[0][2].adapter("s").inner
    delta = (inner.lora_b @ inner.lora_a * inner.scale).detach()
    ids = tokens()
    before = {p: m.weight.detach().clone() for p, m, _ in placements(model, "s")}
    unmerged = logits(model, ids)
    ak.merge(model, "s")
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    for path, module, _ in placements(model, "s"):
        torch.testing.assert_close(module.weight - before[path], delta, atol=1e-6, rtol=0)
    ak.unmerge(model, "s")
    other = make_tiny("bert")
    ak.attach(other, "s", Shared(BN), ["output.LayerNorm"])
    with pytest.raises(ak.AdapterKitError, match=r"\(SharedAdapter at .*\) cannot be merged"):
        ak.merge(other, "s")


def test_detach_restores_the_model_exactly() -> None:
    model = make_tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ak.attach(model, "s", Shared(ak.ParBottleneck(hidden=8)), ["mlp"])
    randomize(model, "s")
    ak.detach(model)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_the_tie_survives_a_conversion_that_replaces_parameters() -> None:
    model = make_tiny("bert")
    ak.attach(model, "s", Shared(ak.LoRA(r=4)), ["query"])
    randomize(model, "s")
    ids = tokens()
    expected = logits(model.double(), ids)  # in place: the parameter objects stay
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.float()  # new parameter objects in the owner: the other placement must read them, not stale ones
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    owner = placements(model, "s")[0][2].adapter("s").inner
    with torch.no_grad():
        owner.lora_a.zero_()  # only the owner's tensors: every placement stops adapting
    assert torch.equal(logits(model, ids), logits(make_tiny("bert"), ids))
    assert not torch.allclose(expected.float(), logits(make_tiny("bert"), ids))


def test_one_adapter_for_every_task_of_a_multitask_model() -> None:
    """VL-Adapter's "single adapter": the encoder's one shared adapter runs for every row, whatever its task."""
    from transformers import BertConfig, BertModel

    from adapterkit.train.multitask import MultiTaskClassifier

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)).eval()
    ak.attach(encoder, "s", Shared(BN), ["output.LayerNorm"])
    randomize(encoder, "s")
    model = MultiTaskClassifier(encoder, {"a": 2, "b": 3}).eval()
    ids, mask = tokens(batch=4), torch.ones(4, 8, dtype=torch.long)
    out = model(ids, mask, torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 0, 0]))
    pooled = encoder(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(out.logits[1], model.heads["b"](pooled[1]))
    torch.testing.assert_close(out.logits[0, :2], model.heads["a"](pooled[0]))


def test_bad_specs_and_targets_are_one_line_errors() -> None:
    cases = [
        (lambda: ak.attach(make_tiny("bert"), "s", Shared(ak.LoRA(r=2)), ["query", "intermediate.dense"]),
         TargetError, r"shared: bert\.encoder\.layer\.0\.intermediate\.dense has feature sizes \(in, out\) = "
                      r"\(32, 64\), bert\.encoder\.layer\.0\.attention\.self\.query has \(32, 32\)"),
        (lambda: ak.attach(make_tiny("bert"), "s", Shared(ak.DoRA(r=2)), ["query"]),
         TargetError, "dora's initial parameters depend on each module's own weights"),
        (lambda: Shared(ak.LoRA(r=2, init="pissa")), SpecError, "moves part of each base weight"),
        (lambda: Shared(Shared(BN)), SpecError, "base must be an adapter method's spec"),
        (lambda: Shared(ak.compose.Fusion()), SpecError, "base must be an adapter method's spec"),
        (lambda: ak.attach(make_tiny("bert"), "s", Shared(ak.methods.LowBit(ak.LoRA(r=2))), ["query"]),
         SpecError, "stores a packed or resized form"),
        (lambda: ak.spec_from_dict({"method": "shared", "base": {"method": "lora", "r": 0}}), SpecError, "r must"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as exc:
            call()
        assert "\n" not in str(exc.value)
    model = make_tiny("bert")
    with pytest.raises(TargetError):
        ak.attach(model, "s", Shared(ak.LoRA(r=2)), ["query", "intermediate.dense"])
    assert ak.adapters(model) == []  # nothing attached by a refused attach


def test_json_round_trip_nests_the_inner_spec() -> None:
    spec = Shared(ak.LoRA(r=4, alpha=8.0))
    data = spec.to_dict()
    assert data == {"method": "shared", "base": ak.LoRA(r=4, alpha=8.0).to_dict()}
    assert ak.spec_from_dict(data) == spec

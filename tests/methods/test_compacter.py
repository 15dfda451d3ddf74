"""Compacter / Compacter++ equal AdapterHub's ``CompacterConfig`` / ``CompacterPlusPlusConfig`` for the same weights
(outputs, gradients, trainable parameter counts); the rule A is one tensor shared by every layer; bad specs and
targets are one-line errors.

`adapters` 1.3 pins transformers ~=4.57.6; where that pin does not hold the module is skipped.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.inject.engine import placements
from adapterkit.methods.compacter import Compacter, kron_sum
from tests.conftest import logits, make_minilm, make_tiny, tokens

adapters = pytest.importorskip("adapters")

# variant -> (AdapterHub config class, our targets, the suffix between our target and their adapter's parent)
VARIANTS = {
    "compacter": (adapters.CompacterConfig, ["output.dense"], ".dense"),
    "compacter++": (adapters.CompacterPlusPlusConfig, [r"re:.*layer\.\d+\.output\.LayerNorm"], ".LayerNorm"),
}
# (our spec fields, their config fields) beyond the variant's defaults
FORMS: dict[str, tuple[dict, dict]] = {
    "rank1-shared": ({}, {}),
    "n2-rank3": ({"phm_dim": 2, "phm_rank": 3}, {"phm_dim": 2, "phm_rank": 3}),
    "full-W": ({"phm_rank": None}, {"factorized_phm_W": False}),
    "layer-rule": ({"rule": "layer"}, {"shared_phm_rule": False}),
    "relu-scaled": ({"activation": "relu", "scaling": 0.5}, {"non_linearity": "relu", "scaling": 0.5}),
}


def _pair(base: torch.nn.Module, variant: str, ours_fields: dict, theirs_fields: dict, rf: float):
    """(theirs, ours): AdapterHub's adapter with random weights, and ours attached with the same weights."""
    config_class, targets, suffix = VARIANTS[variant]
    theirs: Any = copy.deepcopy(base)  # AdapterHub adds its methods to the model
    adapters.init(theirs)
    theirs.add_adapter("c", config=config_class(reduction_factor=rf, **theirs_fields))
    theirs.train_adapter("c")
    theirs.eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # well away from the init (A ~ N(0, 1e-4) would make the adapter almost silent)
        for name, param in theirs.named_parameters():
            if ".adapters.c." in name or ".shared_parameters.c." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    ours = copy.deepcopy(base)
    ak.attach(ours, "c", Compacter(reduction_factor=rf, **ours_fields), targets=targets)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, _, host in placements(ours, "c"):
            prefix = path.removesuffix(suffix) + ".adapters.c."
            adapter = host.adapter("c")
            for side, where in ((adapter.down, "adapter_down.0."), (adapter.up, "adapter_up.")):
                for mine, name in (("w_left", "W_left"), ("w_right", "W_right"), ("w", "W"), ("bias", "b"),
                                   ("phm_rule", "phm_rule")):
                    if isinstance(getattr(side, mine, None), torch.Tensor):
                        getattr(side, mine).copy_(their_params[prefix + where + name])
            if adapter.phm_rule is not None:
                adapter.phm_rule.copy_(their_params["bert.shared_parameters.c.phm_rule"])
    return theirs, ours


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.pow(2).sum()


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_gradients_and_counts_match_adapterhub(variant, form) -> None:
    base = make_tiny("bert")
    theirs, ours = _pair(base, variant, *FORMS[form], rf=4)
    assert len(placements(ours, "c")) == (4 if variant == "compacter" else 2)
    count = ak.train_only(ours, "c", also=["classifier"])  # AdapterHub's train_adapter leaves the head trainable
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ids = tokens(batch=3, length=10)
    expected, got, plain = logits(theirs, ids), logits(ours, ids), logits(base, ids)
    assert (expected - plain).abs().max() > 1e-3  # the adapters really change the (small) logits
    assert (got - expected).abs().max().item() <= 1e-5
    _loss(theirs, ids).backward()
    _loss(ours, ids).backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for path, _, host in placements(ours, "c"):
        prefix = path.removesuffix(VARIANTS[variant][2]) + ".adapters.c."
        up = host.adapter("c").up
        torch.testing.assert_close(up.bias.grad, their_grads[prefix + "adapter_up.b"], atol=1e-5, rtol=1e-4)
        mine, name = ("w_left", "W_left") if up.w is None else ("w", "W")
        torch.testing.assert_close(getattr(up, mine).grad, their_grads[prefix + "adapter_up." + name], atol=1e-5,
                                   rtol=1e-4)
    shared = placements(ours, "c")[0][2].adapter("c").phm_rule
    if shared is not None:  # one gradient summed over every layer and projection, as AdapterHub's shared rule
        torch.testing.assert_close(shared.grad, their_grads["bert.shared_parameters.c.phm_rule"], atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_defaults_match_adapterhub_on_minilm(variant) -> None:
    """The papers' defaults (n = 4, k = 1, rf 32, GELU, shared rule) on MiniLM: 12 / 6 placements, same count."""
    base = make_minilm()
    theirs, ours = _pair(base, variant, {}, {}, rf=32)
    assert len(placements(ours, "c")) == (12 if variant == "compacter" else 6)
    ids = tokens(batch=2, length=12, vocab=30522)
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= 1e-5
    count = ak.train_only(ours, "c", also=["classifier"])
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    head = sum(p.numel() for p in ours.classifier.parameters())
    # per adapter: down 4*96 + 4*3 + 12, up 4*3 + 4*96 + 384; plus one shared rule of 4**3
    assert count - head == (12 if variant == "compacter" else 6) * (408 + 780) + 64


def test_the_rule_is_one_tensor_whose_gradient_sums_every_layer(tmp_path) -> None:
    model = make_tiny("bert")
    plan = ak.explain(model, ["output.dense"], Compacter(reduction_factor=4))  # the dry run counts A once too
    ak.attach(model, "c", Compacter(reduction_factor=4), targets=["output.dense"])
    assert plan.adapter_params == ak.train_only(model, "c") == 4 * 120 + 64
    modules = [host.adapter("c") for _, _, host in placements(model, "c")]
    rule = modules[0].phm_rule
    assert rule is not None and all(m.rule() is rule for m in modules)
    assert [n for n, _ in model.named_parameters() if n.endswith("phm_rule")] == [
        n for n, p in model.named_parameters() if p is rule]  # registered once
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.normal_(0.0, 0.3)
    ak.train_only(model, "c")
    ids = tokens()
    _loss(model, ids).backward()
    shared_grad = rule.grad.clone()
    # the same loss with one private copy of A per placement: their gradients add up to the shared one
    copies = [rule.detach().clone().requires_grad_(True) for _ in modules]
    for m, own in zip(modules, copies):
        m.rule = lambda own=own: own  # type: ignore[method-assign]
    _loss(model, ids).backward()
    torch.testing.assert_close(sum(c.grad for c in copies), shared_grad, atol=1e-5, rtol=1e-5)
    assert all(c.grad.abs().sum() > 0 for c in copies)
    for m in modules:
        del m.rule
    expected = logits(model, ids)
    ak.save(model, tmp_path / "c")
    weights = load_file(next((tmp_path / "c").glob("adapter-*.safetensors")))
    assert sum(key.endswith("phm_rule") for key in weights) == 1  # stored once
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "c")
    loaded = [host.adapter("c") for _, _, host in placements(fresh, "c")]
    assert all(m.rule() is loaded[0].phm_rule for m in loaded)
    assert torch.equal(loaded[0].phm_rule, rule)
    assert torch.equal(logits(fresh, ids), expected)


def test_kron_sum_is_the_sum_of_kronecker_products() -> None:
    generator = torch.Generator().manual_seed(0)
    rule = torch.randn(3, 3, 3, generator=generator, dtype=torch.float64)
    blocks = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)
    expected = sum(torch.kron(rule[i], blocks[i]) for i in range(3))
    torch.testing.assert_close(kron_sum(rule, blocks), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fields,match", [
    ({"phm_rank": 0}, r"compacter: phm_rank must be a positive integer .* got 0"),
    ({"phm_rank": -2}, r"phm_rank"),
    ({"phm_dim": 0}, r"compacter: phm_dim must be a positive integer, got 0"),
    ({"rule": "global"}, r"compacter: rule must be one of \('shared', 'layer'\)"),
    ({"w_init": "phm"}, r"w_init must be one of"),
    ({"reduction_factor": 0}, r"reduction_factor must be > 0"),
])
def test_bad_specs_are_one_line_errors(fields, match) -> None:
    with pytest.raises(ak.SpecError, match=match) as exc:
        Compacter(**fields)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("fields,match", [
    ({"phm_dim": 3, "reduction_factor": 4}, r"compacter: phm_dim=3 does not divide the feature size 32 of "
                                           r"bert\.encoder\.layer\.0\.attention\.output\.dense"),
    ({"phm_dim": 4, "reduction_factor": 16}, r"compacter: phm_dim=4 does not divide the hidden size 2 \(= 32 // "
                                            r"reduction_factor 16\) of bert\.encoder\.layer\.0\.attention"),
])
def test_sizes_phm_dim_does_not_divide_are_one_line_errors_naming_the_module(fields, match) -> None:
    model = make_tiny("bert")
    with pytest.raises(ak.TargetError, match=match) as exc:
        ak.attach(model, "c", Compacter(**fields), targets=["output.dense"])
    assert "\n" not in str(exc.value)
    assert ak.adapters(model) == []  # checked before anything is attached

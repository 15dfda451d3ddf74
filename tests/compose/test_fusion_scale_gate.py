"""Fuse (AdapterFusion), Scale (ScaLearn) and Gate (MixDA): parity with AdapterHub, the papers' equations, variants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.inject.engine import placements
from tests.conftest import logits, make_minilm, make_tiny, randomize, tokens

PFEIFFER = [r"re:.*layer\.\d+\.output\.LayerNorm"]
FFN_OUT = [r"re:.*layer\.\d+\.output\.dense"]


def _sources(model: nn.Module, names: tuple[str, ...] = ("a", "b", "c"), targets: list[str] = PFEIFFER) -> None:
    for index, name in enumerate(names):
        ak.attach(model, name, ak.SeqBottleneck(reduction_factor=4), targets)
        randomize(model, name, scale=0.2, seed=30 + index)


def test_fusion_equals_adapterhub_fuse_on_minilm() -> None:
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Fuse as TheirFuse

    base = make_minilm()
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    for name in "abc":
        theirs.add_adapter(name, config="seq_bn")  # init "bert": N(0, 0.02), non-zero outputs
    theirs.add_adapter_fusion(TheirFuse("a", "b", "c"))  # "dynamic": query, key, value
    theirs.set_active_adapters(TheirFuse("a", "b", "c"))
    their = dict(theirs.named_parameters())
    with torch.no_grad():  # make the attention far from uniform, so a wrong query / key / value shows
        for key, param in their.items():
            if "adapter_fusion_layer" in key:
                param.add_(torch.randn_like(param) * (0.05 if key.endswith("value.weight") else 0.3))
    ours = copy.deepcopy(base)
    for name in "abc":
        ak.attach(ours, name, ak.SeqBottleneck(reduction_factor=16), PFEIFFER)
    ak.attach(ours, "fusion", ak.compose.Fusion(), PFEIFFER)
    with torch.no_grad():
        for name in "abc":
            for path, _, host in placements(ours, name):
                prefix = path.removesuffix(".LayerNorm") + f".adapters.{name}."
                block = host.adapter(name).block
                block.down.weight.copy_(their[prefix + "adapter_down.0.weight"])
                block.down.bias.copy_(their[prefix + "adapter_down.0.bias"])
                block.up.weight.copy_(their[prefix + "adapter_up.weight"])
                block.up.bias.copy_(their[prefix + "adapter_up.bias"])
        for path, _, host in placements(ours, "fusion"):
            prefix = path.removesuffix(".LayerNorm") + ".adapter_fusion_layer.a,b,c."
            layer = host.adapter("fusion")
            for part in ("query", "key"):
                getattr(layer, part).weight.copy_(their[prefix + f"{part}.weight"])
                getattr(layer, part).bias.copy_(their[prefix + f"{part}.bias"])
            layer.value.weight.copy_(their[prefix + "value.weight"])
    ids = tokens(batch=3, length=12, vocab=30522)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        with ak.use(ours, ak.Mix("a", "b", "c", name="fusion")) as routing:
            got = ours(input_ids=ids).logits
        with ak.use(ours, ak.Average("a", "b", "c")):
            averaged = ours(input_ids=ids).logits
    assert (expected - averaged).abs().max() > 1e-3  # the fusion attention matters here
    assert (got - expected).abs().max().item() <= 1e-5
    probs = routing.weights["fusion"]["bert.encoder.layer.0.output.LayerNorm"]
    assert probs.shape == (3, 12, 3) and torch.allclose(probs.sum(-1), torch.ones(3, 12))
    # the value regulariser equals AdapterHub's get_fusion_regularization_loss (training only)
    ak.train_only(ours, "fusion")
    ours.train()
    with ak.use(ours, ak.Mix("a", "b", "c", name="fusion")) as routing:
        ours(input_ids=ids)
    torch.testing.assert_close(routing.aux_loss(), theirs.base_model.get_fusion_regularization_loss().detach(),
                               rtol=1e-5, atol=1e-7)


def test_fusion_static_form_has_no_value_and_uses_temperature() -> None:
    model = make_tiny("bert")
    _sources(model)
    ak.attach(model, "fs", ak.compose.Fusion(form="static", temperature=1e6), PFEIFFER)
    assert ak.train_only(model, "fs") == 2 * 2 * (32 * 32 + 32)  # query and key per layer, no value
    ak.attach(model, "third", ak.compose.ScaLearn(sources=3, form="scalar", init_std=0.0, init_scale=1.0), PFEIFFER)
    model.eval()
    ids = tokens()
    with ak.use(model, ak.Mix("a", "b", "c", name="third")):  # LN(x + mean_i a_i), mixed before the norm
        averaged = logits(model, ids)
    with ak.use(model, ak.Mix("a", "b", "c", name="fs")):  # a huge temperature: uniform attention = the mean
        fused = logits(model, ids)
    torch.testing.assert_close(fused, averaged, atol=1e-5, rtol=0)
    with ak.use(model, ak.Average("a", "b", "c")):  # the fixed block averages after the norm: another output
        assert (logits(model, ids) - fused).abs().max() > 1e-4


def _scalearn_reference(model: nn.Module, spec: ak.compose.ScaLearn, ids: torch.Tensor) -> torch.Tensor:
    """y = LN(x + sum_i w_i a_i) at every Pfeiffer site, written out with forward hooks in float64."""
    model = copy.deepcopy(model).double()
    handles = []
    for (_, module, host), (_, _, shost) in zip(placements(model, "a"), placements(model, "s")):
        weights = shost.adapter("s").weights()  # (N, d or 1)

        def hook(mod, args, out, host=host, weights=weights):  # noqa: ANN001, ANN202
            deltas = [host.adapter(n).block(out) for n in ("a", "b", "c")]
            return torch.nn.functional.layer_norm(args[0] + sum(w * d for w, d in zip(weights, deltas)),
                                                  mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        handles.append(module.register_forward_hook(hook))
    with ak.use(model), torch.no_grad():  # no adapter runs; the hooks do the mixing
        out = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    return out.float()


@pytest.mark.parametrize("form,share,count", [("vector", "layer", 2 * 3 * 32), ("scalar", "layer", 2 * 3),
                                              ("vector", "model", 3 * 32), ("scalar", "model", 3)])
def test_scalearn_variants_match_the_equation_and_count(form: str, share: str, count: int) -> None:
    model = make_tiny("bert")
    _sources(model)
    spec = ak.compose.ScaLearn(sources=3, form=form, share=share)
    ak.attach(model, "s", spec, PFEIFFER)
    assert ak.train_only(model, "s") == count
    scales = [host.adapter("s").weights() for _, _, host in placements(model, "s")]
    assert abs(scales[0].mean().item() - 2.0 / 3) < 0.01 and scales[0].std().item() < 0.01  # N(c/N, 0.001)
    with torch.no_grad():
        for each in scales:
            each.normal_(0.5, 0.3)
    model.eval()
    ids = tokens()
    with ak.use(model, ak.Mix("a", "b", "c", name="s")):
        got = logits(model, ids)
    torch.testing.assert_close(got, _scalearn_reference(model, spec, ids), atol=1e-5, rtol=0)


def test_scalearn_shared_scales_are_one_parameter_that_trains_saves_and_loads_once(tmp_path) -> None:
    model = make_tiny("bert")
    _sources(model)
    ak.attach(model, "s", ak.compose.ScaLearn(sources=3, share="model"), PFEIFFER)
    layers = [host.adapter("s") for _, _, host in placements(model, "s")]
    assert layers[0].weights() is layers[1].weights()
    ak.train_only(model, "s")
    model.train()
    with ak.use(model, ak.Mix("a", "b", "c", name="s")):
        model(input_ids=tokens()).logits.pow(2).sum().backward()
    grad = layers[0].weights().grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        layers[0].weights().mul_(1.5)
    assert torch.equal(layers[1].weights(), layers[0].weights())  # really one set: the change shows everywhere
    ak.save(model, tmp_path / "s", "s")
    _, tensors = ak.read(tmp_path / "s")
    assert len(tensors) == 1  # saved once, by the first placement
    fresh = make_tiny("bert")
    _sources(fresh)
    ak.load(fresh, tmp_path / "s")
    again = [host.adapter("s") for _, _, host in placements(fresh, "s")]
    assert again[0].weights() is again[1].weights() and torch.equal(again[1].weights(), layers[0].weights())


def test_scalearn_dropout_acts_on_the_scales_in_training_only() -> None:
    model = make_tiny("bert")
    _sources(model)
    ak.attach(model, "s", ak.compose.ScaLearn(sources=3, form="vector", dropout=0.3), PFEIFFER)
    ids = tokens()
    model.train()
    torch.manual_seed(0)
    with ak.use(model, ak.Mix("a", "b", "c", name="s")) as routing, torch.no_grad():
        model(input_ids=ids)
    used = routing.weights["s"]["bert.encoder.layer.0.output.LayerNorm"]
    zeros = (used == 0).float().mean().item()
    assert 0.15 < zeros < 0.45  # about p of the scales dropped, the rest scaled by 1 / (1 - p)
    kept = used[used != 0]
    own = next(host.adapter("s") for _, _, host in placements(model, "s")).weights()
    assert torch.allclose(kept, (own / 0.7)[used != 0])
    model.eval()
    with ak.use(model, ak.Mix("a", "b", "c", name="s")) as routing, torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(routing.weights["s"]["bert.encoder.layer.0.output.LayerNorm"], own)


def test_fusion_and_scale_refuse_children_that_combine_in_another_space() -> None:
    model = make_tiny("bert")
    _sources(model, ("a",))
    ak.attach(model, "bias", ak.BitFit(), PFEIFFER)  # a parallel delta on the norm: the post-norm space
    ak.attach(model, "s", ak.compose.ScaLearn(sources=2), PFEIFFER)
    with ak.use(model, ak.Mix("a", "bias", name="s")), pytest.raises(AdapterKitError, match="another space"):
        logits(model, tokens())
    # where both live in the sub-layer's output space (no norm), they mix: y = f + w_a a + w_b b
    ak.attach(model, "a2", ak.SeqBottleneck(reduction_factor=4), FFN_OUT)
    ak.attach(model, "lora", ak.LoRA(r=2), FFN_OUT)
    randomize(model, "a2", seed=5)
    randomize(model, "lora", seed=6)
    ak.attach(model, "s2", ak.compose.ScaLearn(sources=2, form="scalar", init_std=0.0, init_scale=2.0), FFN_OUT)
    with ak.use(model, ak.Mix("a2", "lora", name="s2")):
        got = logits(model.eval(), tokens())
    with ak.use(model, ak.Parallel("a2", "lora")):  # weights 2 / N = 1: the plain sum of changes
        torch.testing.assert_close(got, logits(model, tokens()), atol=1e-6, rtol=0)


def test_mixda_gate_mixes_domain_adapters_with_the_ffn_by_the_equation() -> None:
    model = make_tiny("bert")
    domain = ak.ParBottleneck(reduction_factor=4, scaling=1.0, activation="gelu")
    for index, name in enumerate(("d1", "d2")):
        ak.attach(model, name, domain, FFN_OUT)
        randomize(model, name, scale=0.3, seed=40 + index)
    ak.attach(model, "gate", ak.compose.MixDA(domains=2, hidden=16, pool="last"), FFN_OUT)
    (path, module, host), *_ = placements(model, "gate")
    assert path == "bert.encoder.layer.0.output.dense" and len(placements(model, "gate")) == 2
    model.eval()
    ids = tokens()
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o))
    with ak.use(model, ak.Mix("d1", "d2", name="gate")) as routing:
        logits(model, ids)
    handle.remove()
    x, mixed = seen["x"], seen["out"]
    f = torch.nn.functional.linear(x, module.weight, module.bias)
    gate = host.adapter("gate")
    g = torch.softmax(gate.mlp(x[:, -1]), dim=-1)  # (B, 3)
    e = [host.adapter(n).block(x) for n in ("d1", "d2")]
    expected = g[:, None, 2:3] * f + g[:, None, 0:1] * e[0] + g[:, None, 1:2] * e[1]
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.weights["gate"][path], g, atol=1e-6, rtol=0)
    # the gate MLP: Dropout, Linear(64 -> 16), [ReLU, Dropout, Linear(16 -> 16)] x 2, ReLU, Dropout, Linear(16 -> 3)
    sizes = [tuple(m.weight.shape) for m in gate.mlp if isinstance(m, nn.Linear)]
    assert sizes == [(16, 64), (16, 16), (16, 16), (3, 16)]


@pytest.mark.parametrize("make,message", [
    (lambda: ak.compose.Fusion(form="soft"), "fusion: form must be one of"),
    (lambda: ak.compose.ScaLearn(form="matrix"), "scalearn: form must be one of"),
    (lambda: ak.compose.ScaLearn(share="all"), "scalearn: share must be one of"),
    (lambda: ak.compose.ScaLearn(sources=0), "scalearn: sources must be a positive integer"),
    (lambda: ak.compose.ScaLearn(dropout=1.0), r"scalearn: dropout must lie in \[0, 1\)"),
    (lambda: ak.compose.MixDA(pool="max"), "mixda: pool must be one of"),
    (lambda: ak.compose.MixDA(domains=0), "mixda: domains must be a positive integer"),
])
def test_bad_combiner_specs_are_one_line_errors(make, message) -> None:
    with pytest.raises(SpecError, match=message) as info:
        make()
    assert "\n" not in str(info.value)

"""X-LoRA (compose/xlora.py): equal to peft's ``xlora`` for the same weights, generate with a KV cache, training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.compose.xlora import XLoRA
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.inject.engine import placements
from adapterkit.interop.peft_format import export_peft
from tests.conftest import make_tiny, randomize, tokens

TARGETS = ["q_proj", "v_proj", "down_proj"]
EXPERTS = ak.Mix("e0", "e1", "e2", name="xl")


def _experts(model: nn.Module, folder: Path | None = None) -> None:
    for i in range(3):
        ak.attach(model, f"e{i}", ak.LoRA(r=4), TARGETS)
        randomize(model, f"e{i}", seed=10 + i, scale=0.2)
        if folder is not None:
            export_peft(model, f"e{i}", folder / f"e{i}")


def _router(model: nn.Module, name: str = "xl") -> nn.Module:
    return placements(model, name)[0][2].adapter(name)


PEFT_CASES = {
    "shared-depth1": ({}, {}),
    "layerwise-depth2": (dict(depth=2, size=16, scalings="layerwise"),
                         dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True)),
    "depth3-temperature": (dict(depth=3, size=8, temperature=0.5), dict(xlora_depth=3, xlora_size=8,
                                                                        softmax_temperature=0.5)),
    "top2-softmax": (dict(scalings="layerwise", top_k=2, top_k_normalize="softmax", normalize="none"),
                     dict(layerwise_scalings=True, top_k_lora=2, enable_softmax_topk=True, enable_softmax=False)),
    "scaling-pass-0.5": (dict(scaling_pass_value=0.5, global_scaling_weight=0.7),
                         dict(scaling_pass_value=0.5, global_scaling_weight=0.7)),
}


def _peft_pair(tmp_path: Path, ours: dict, theirs: dict) -> tuple[nn.Module, nn.Module]:
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    _experts(model, tmp_path)
    ak.attach(model, "xl", XLoRA(experts=3, hidden_size=32, **ours), TARGETS)
    base = make_tiny("llama")
    base.config.use_cache = False  # peft's X-LoRA refuses a model with the cache on
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, **theirs,
                              adapters={str(i): str(tmp_path / f"e{i}") for i in range(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(base, config).eval()
    classifier = reference.base_model.internal_xlora_classifier.layers
    with torch.no_grad():
        for param in classifier.parameters():  # larger than nn.Linear's init, so routing differs by token
            param.normal_(0, 0.5)
    _router(model).classifier.load_state_dict(classifier.state_dict())
    return model.eval(), reference


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_outputs_equal_peft_xlora_for_the_same_weights(tmp_path: Path, case: str) -> None:
    model, reference = _peft_pair(tmp_path, *PEFT_CASES[case])
    ids = tokens(batch=3, length=10)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with ak.use(model, EXPERTS) as routing:
            out = model(input_ids=ids).logits
        with ak.use(model):
            bare = model(input_ids=ids).logits
    assert (out - expected).abs().max().item() < 1e-5
    assert (out - bare).abs().max().item() > 1e-2  # the experts did change the output
    scalings = reference.base_model.internal_xlora_scalings  # (B, L, N, K), modules in model order
    paths = [p for p, _, _ in placements(model, "xl")]
    assert list(routing.weights["xl"]) == paths and len(paths) == 6
    for n, path in enumerate(paths):  # per token and module: what a routing heat map draws
        weights = routing.weights["xl"][path]
        assert weights.shape == (3, 10, 3)
        if "top_k" not in PEFT_CASES[case][0]:
            torch.testing.assert_close(weights, scalings[:, :, n, :], atol=1e-6, rtol=0)


def test_generate_with_the_kv_cache_equals_peft_without(tmp_path: Path) -> None:
    model, reference = _peft_pair(tmp_path, dict(scalings="layerwise"), dict(layerwise_scalings=True))
    ids = tokens(batch=2, length=5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, **settings)
        with ak.use(model, EXPERTS):
            cached = model.generate(input_ids=ids, use_cache=True, **settings)
            uncached = model.generate(input_ids=ids, use_cache=False, **settings)
        plain = model.generate(input_ids=ids, use_cache=True, **settings)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    assert not torch.equal(plain, expected)  # routing changed what is generated


def test_only_the_classifier_trains_and_gets_gradients() -> None:
    model = make_tiny("llama")
    _experts(model)
    ak.attach(model, "xl", XLoRA(experts=3, hidden_size=32, depth=2, size=8), TARGETS)
    count = ak.train_only(model, "xl")
    assert count == (32 * 8 + 8) + (8 * 3 + 3)  # the classifier lives once, in the first placement
    model.train()
    ids = tokens()
    with ak.use(model, EXPERTS):
        model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_a_forward_outside_the_model_or_a_bad_spec_is_a_clear_error() -> None:
    model = make_tiny("llama")
    _experts(model)
    ak.attach(model, "xl", XLoRA(experts=3, hidden_size=32), TARGETS)
    layer = model.model.layers[0].self_attn.q_proj
    with ak.use(model, EXPERTS), pytest.raises(AdapterKitError, match="has no scalings: call the model"):
        layer(torch.randn(1, 2, 32))
    for bad, message in [(dict(hidden_size=0), "hidden_size must be"), (dict(top_k=4), "top_k must be None or"),
                         (dict(scalings="per-layer"), "scalings must be one of"), (dict(temperature=0), "> 0")]:
        with pytest.raises(SpecError, match=message):
            XLoRA(**{"experts": 3, "hidden_size": 32, **bad})


def test_a_cache_filled_outside_the_use_block_is_refused() -> None:
    model = make_tiny("llama")
    _experts(model)
    ak.attach(model, "xl", XLoRA(experts=3, hidden_size=32), TARGETS)
    ids = tokens(batch=1, length=4)
    with torch.no_grad():
        with ak.use(model, EXPERTS):
            cache = model(input_ids=ids[:, :3], use_cache=True).past_key_values
            step = model(input_ids=ids[:, 3:], past_key_values=cache, use_cache=True).logits[:, -1]
            full = model(input_ids=ids, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)  # the same block: the scaling pass kept a cache
        with ak.use(model, EXPERTS), pytest.raises(AdapterKitError, match="filled outside this use") as info:
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_experts_mixed_in_two_matmuls_equal_the_loop(monkeypatch: pytest.MonkeyPatch, ranks: tuple[int, ...]
                                                     ) -> None:
    """LoRA's ``mixed_delta`` (stacked factors, mixed ranks) gives the outputs and gradients of running each expert
    on its own (the combiner's fallback loop)."""
    from adapterkit.methods.lora import LoRALinear

    results = []
    for batched in (True, False):
        model = make_tiny("llama")
        for i, rank in enumerate(ranks):
            ak.attach(model, f"e{i}", ak.LoRA(r=rank), TARGETS)
            randomize(model, f"e{i}", seed=10 + i, scale=0.2)
        torch.manual_seed(0)
        ak.attach(model, "xl", XLoRA(experts=3, hidden_size=32, scaling_pass_value=0.3), TARGETS)
        if not batched:
            monkeypatch.setattr(LoRALinear, "mixed_delta", staticmethod(lambda adapters, x, weights: None))
        ids = tokens()
        with ak.use(model, EXPERTS):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "adapterkit" in n}
        results.append((loss.detach(), grads))
        monkeypatch.undo()
    (loss, grads), (loop_loss, loop_grads) = results
    torch.testing.assert_close(loss, loop_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == loop_grads.keys() and any("xl" in n for n in grads)  # the router trains through it
    for name, grad in grads.items():
        torch.testing.assert_close(grad, loop_grads[name], atol=1e-6, rtol=1e-5)

"""Same weights through peft and adapterkit give the same outputs (float32, max abs diff <= 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.inject.engine import placements
from tests.conftest import make_minilm, make_tiny, tokens

peft = pytest.importorskip("peft")

MODELS = {
    "minilm": (lambda: make_minilm(), ["query", "value"], 30522),
    "gpt2": (lambda: make_tiny("gpt2"), ["c_attn", "c_proj", "c_fc"], 100),
    "llama": (lambda: make_tiny("llama"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], 100),
}


def _peft_layer(peft_model, path: str):
    return peft_model.base_model.model.get_submodule(path)


def _randomize_peft(peft_model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _compare(base, ours, peft_model, vocab: int) -> None:
    ids = tokens(batch=3, length=12, vocab=vocab)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapters really change the output
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_matches_peft(model_name, rslora) -> None:
    build, targets, vocab = MODELS[model_name]
    base = build()
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomize_peft(peft_model)
    ak.attach(ours, "a", ak.LoRA(r=4, alpha=8, scaling="rslora" if rslora else "lora"), targets=targets)
    with torch.no_grad():
        for path, _, host in placements(ours, "a"):
            layer = _peft_layer(peft_model, path)
            host.adapter("a").lora_a.copy_(layer.lora_A["default"].weight)
            host.adapter("a").lora_b.copy_(layer.lora_B["default"].weight)
    _compare(base, ours, peft_model, vocab)


@pytest.mark.parametrize("model_name", ["minilm", "llama"])
def test_dora_matches_peft(model_name) -> None:
    build, targets, vocab = MODELS[model_name]
    base = build()
    ours = copy.deepcopy(base)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                          use_dora=True)).eval()
    _randomize_peft(peft_model)
    ak.attach(ours, "a", ak.DoRA(r=4, alpha=8), targets=targets)
    with torch.no_grad():
        for path, _, host in placements(ours, "a"):
            layer, adapter = _peft_layer(peft_model, path), host.adapter("a")
            adapter.lora.lora_a.copy_(layer.lora_A["default"].weight)
            adapter.lora.lora_b.copy_(layer.lora_B["default"].weight)
            adapter.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    _compare(base, ours, peft_model, vocab)


def test_ia3_matches_peft_on_outputs_and_ffn_inputs() -> None:
    base = make_tiny("llama")
    ours = copy.deepcopy(base)
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomize_peft(peft_model)
    ak.attach(ours, "kv", ak.IA3(), targets=["k_proj", "v_proj"])
    ak.attach(ours, "ffn", ak.IA3(position="input"), targets=["down_proj"])
    with torch.no_grad():
        for name in ("kv", "ffn"):
            for path, _, host in placements(ours, name):
                host.adapter(name).ia3_l.copy_(_peft_layer(peft_model, path).ia3_l["default"].reshape(-1))
    _compare(base, ours, peft_model, 100)


def test_lora_merge_matches_peft_merge() -> None:
    base = make_tiny("gpt2")  # Conv1D: the transposed-weight case
    ours = copy.deepcopy(base)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                          fan_in_fan_out=True)).eval()
    _randomize_peft(peft_model)
    ak.attach(ours, "a", ak.LoRA(r=4, alpha=8), targets=["c_attn"])
    with torch.no_grad():
        for path, _, host in placements(ours, "a"):
            layer = _peft_layer(peft_model, path)
            host.adapter("a").lora_a.copy_(layer.lora_A["default"].weight)
            host.adapter("a").lora_b.copy_(layer.lora_B["default"].weight)
    merged_peft = peft_model.merge_and_unload()
    ak.merge(ours, "a")
    ak.detach(ours, keep_merged=True)
    theirs = merged_peft.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=1e-6)

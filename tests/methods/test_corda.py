"""CorDA (LoRA init="corda_ipm" / "corda_kpm"): the same base and calibration samples through peft's
preprocess_corda + corda_init and through ak.calibrate_corda + attach give equal covariances, factors, residual
base weights, outputs and gradients; padding is left out of the covariance; the decomposition is exact; the
trained adapter converts back to a plain LoRA and peft loads its export; bad input gets one line."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.arith.residual_lora import residual_to_lora
from adapterkit.interop.peft_format import export_peft
from adapterkit.methods.corda import Covariance, corda_factors, damped, waiting
from adapterkit.train.calibrate import calibrate_corda
from tests.conftest import make_tiny, tokens
from tests.methods.test_lora_init import _train, check_residual_init

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

LLAMA = ["q_proj", "v_proj", "down_proj"]


def _samples(count: int = 6, length: int = 10):
    return [tokens(batch=1, length=length, seed=20 + i)[0] for i in range(count)]


def _pair(mode: str, kind: str = "llama", targets: list[str] = LLAMA, r: int = 4, alpha: float = 8):
    base = make_tiny(kind)
    samples = _samples()
    theirs = copy.deepcopy(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    # peft's hook takes one sample per forward (it squeezes the batch dimension)
    preprocess_corda(theirs, config, run_model=lambda: [theirs(input_ids=s[None]) for s in samples])
    theirs = peft.get_peft_model(theirs, config)
    ours = copy.deepcopy(base)
    batches = [torch.stack(samples[i:i + 2]) for i in range(0, len(samples), 2)]  # two samples per batch here
    covariances = calibrate_corda(ours, batches, targets, progress=False)
    ak.attach(ours, "c", ak.LoRA(r=r, alpha=alpha, init=f"corda_{mode}"), targets=targets)
    return base, ours, theirs, covariances


@pytest.mark.parametrize("mode,kind,targets", [("ipm", "llama", LLAMA), ("kpm", "llama", LLAMA),
                                               ("ipm", "gpt2", ["c_attn", "c_fc"])])
def test_corda_matches_peft(mode, kind, targets) -> None:
    base, ours, theirs, covariances = _pair(mode, kind, targets)
    found = check_residual_init(base, ours, theirs, "c")
    assert sorted(covariances) == sorted(p for p, _, _ in found)
    for _, module, host in found:
        assert host.adapter("c").spec.init == "residual" and waiting(module) is None  # the covariance was used once


def test_padding_is_left_out_of_the_covariance() -> None:
    torch.manual_seed(0)
    first, second = torch.randn(5, 6), torch.randn(3, 6)
    alone = Covariance()
    alone.add(first, None)
    alone.add(second, None)
    padded = torch.zeros(2, 5, 6)
    padded[0], padded[1, :3] = first, second
    padded[1, 3:] = 100.0  # garbage under the pad positions
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batched = Covariance()
    batched.add(padded, mask)
    assert batched.samples == alone.samples == 2
    torch.testing.assert_close(batched.mean(), alone.mean(), atol=1e-6, rtol=0)
    expected = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in (first, second)) / 2  # peft's formula
    torch.testing.assert_close(batched.mean(), expected, atol=1e-6, rtol=0)


def test_decomposition_is_exact_and_modes_split_it() -> None:
    torch.manual_seed(1)
    weight, x = torch.randn(6, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    covariance = x.T @ x / 40
    fixed, inverse = damped(covariance)
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    torch.testing.assert_close(u @ torch.diag(s) @ vh @ inverse, weight, atol=1e-10, rtol=0)  # U S V_hat^T = W
    top_a, top_b = corda_factors(weight, covariance, 3, 2.0, "corda_ipm")
    low_a, low_b = corda_factors(weight, covariance, 3, 2.0, "corda_kpm")
    torch.testing.assert_close(2.0 * (top_b @ top_a + low_b @ low_a), weight, atol=1e-10, rtol=0)  # 3 + 3 = all 6
    assert torch.linalg.norm(top_b @ top_a) > torch.linalg.norm(low_b @ low_a)


def test_trained_corda_converts_to_a_plain_lora_that_peft_loads(tmp_path) -> None:
    original = make_tiny("llama")
    model = copy.deepcopy(original)
    calibrate_corda(model, [torch.stack(_samples(4))], LLAMA, progress=False)
    ak.attach(model, "c", ak.LoRA(r=4, alpha=8, init="corda_kpm"), targets=LLAMA)
    _train(model, "c")
    ids = tokens(batch=2, length=9, seed=3)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    residual_to_lora(model, "c", original, new_name="lora")
    export_peft(original, "lora", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - trained).abs().max() <= 1e-5


def test_bad_inputs_are_one_line() -> None:
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ak.TargetError, match="needs calibration data: no input covariance for") as error:
        ak.attach(model, "c", ak.LoRA(r=2, init="corda_ipm"), targets=["q_proj"])
    assert "\n" not in str(error.value)
    calibrate_corda(model, [tokens(batch=2, length=6)], ["q_proj"], progress=False)
    with pytest.raises(ak.TargetError, match="no input covariance for model.layers.0.mlp.down_proj"):
        ak.attach(model, "c", ak.LoRA(r=2, init="corda_kpm"), targets=["q_proj", "down_proj"])  # not calibrated
    with pytest.raises(ak.AdapterKitError, match="no calibration sample reached"):
        calibrate_corda(model, [], ["v_proj"], progress=False)
    bad = tokens(batch=1, length=4)
    model.model.embed_tokens.weight.data[bad[0, 0]] = float("nan")
    with pytest.raises(ak.AdapterKitError, match="calibrate_corda: model.layers.0.*NaN"):
        calibrate_corda(model, [bad], ["q_proj"], progress=False)
    model.model.embed_tokens.weight.data.copy_(before["model.embed_tokens.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was touched


@pytest.mark.parametrize("init", ["pissa", "olora", "corda_ipm"])
def test_explain_leaves_the_base_and_the_covariance_alone(init) -> None:
    model = make_tiny("llama")
    calibrate_corda(model, [tokens(batch=2, length=6)], ["q_proj"], progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ak.explain(model, ["q_proj"], ak.LoRA(r=2, init=init))
    assert plan.adapter_params == 2 * 2 * (32 + 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a dry run decomposes nothing
    assert waiting(model.model.layers[0].self_attn.q_proj) is not None

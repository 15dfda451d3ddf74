"""VeRA: peft's shared projections drawn from the seed, parity with peft for identical d / b (outputs, gradients),
files that hold only d and b, the equation in float64, and one-line errors."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.vera import VeRA, projections
from tests.conftest import logits, make_tiny, randomize, tokens
from tests.methods.peft_pairs import check_parity, pair

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "k_proj", "v_proj", "down_proj", "up_proj"]  # widths 32->32, 32->16, 64->32, 32->64


@pytest.mark.parametrize("kind,targets,widest", [("llama", LLAMA, (64, 64)),
                                                 ("bert", ["query", "value", "intermediate.dense"], (32, 64))])
def test_vera_matches_peft(kind, targets, widest) -> None:
    base = make_tiny(kind)
    config = peft.VeraConfig(r=6, target_modules=targets, projection_prng_key=7, d_initial=0.2)
    ours, theirs = pair(base, config, VeRA(r=6, seed=7, d_initial=0.2), targets, scale=1.0)
    shared_a, shared_b = theirs.base_model.vera_A["default"], theirs.base_model.vera_B["default"]
    drawn = projections(7, 6, *widest)  # (r, widest input), (widest output, r)
    assert torch.equal(shared_a, drawn[0]) and torch.equal(shared_b, drawn[1])
    for path, _, host in placements(ours, "a"):  # each module holds the top-left slice peft's forward takes
        adapter, layer = host.adapter("a"), theirs.base_model.model.get_submodule(path)
        assert torch.equal(adapter.vera_a, shared_a[:, : layer.in_features])
        assert torch.equal(adapter.vera_b, shared_b[: layer.out_features])
    check_parity(base, ours, theirs)


def test_vera_on_gpt2_conv1d_matches_peft() -> None:
    base = make_tiny("gpt2")
    config = peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ours, theirs = pair(base, config, VeRA(r=4), ["c_attn", "c_fc"], scale=0.3)
    check_parity(base, ours, theirs)


def test_at_init_d_is_d_initial_b_is_zero_and_the_model_is_the_base() -> None:
    model = make_tiny("llama")
    ids = tokens()
    ref = logits(model, ids)
    ak.attach(model, "a", VeRA(r=4, d_initial=0.5), LLAMA)
    adapter = placements(model, "a")[0][2].adapter("a")
    assert torch.equal(adapter.lambda_d, torch.full((4,), 0.5)) and not adapter.lambda_b.any()
    assert torch.equal(logits(model, ids), ref)


def test_saved_files_hold_only_d_and_b_and_reload_the_same_projections(tmp_path) -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", VeRA(r=4, seed=3), LLAMA)
    randomize(model, "a", scale=0.3)
    ids = tokens()
    expected = logits(model, ids)
    ak.save(model, tmp_path / "v")
    _, tensors = ak.read(tmp_path / "v")
    assert {key.rpartition(".")[2] for key in tensors} == {"lambda_b", "lambda_d"}
    assert sum(t.numel() for t in tensors.values()) == 10 * 4 + 2 * (32 + 16 + 16 + 32 + 64)  # d and b of 10 layers
    fresh = make_tiny("llama")
    before = torch.get_rng_state()
    ak.load(fresh, tmp_path / "v")
    assert torch.equal(torch.get_rng_state(), before)  # the projections come from their own generator
    assert torch.equal(logits(fresh, ids), expected)


def test_another_seed_draws_other_projections() -> None:
    a, b = projections(0, 4, 32, 16), projections(1, 4, 32, 16)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert torch.equal(projections(0, 4, 32, 16)[0], a[0])
    assert a[0].abs().max() <= (6 / 32) ** 0.5 and a[1].abs().max() <= (6 / 4) ** 0.5  # Kaiming-uniform bounds


def test_the_equation_in_float64() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).double()
    adapter = VeRA(r=5, seed=2).build(base)
    with torch.no_grad():
        adapter.lambda_b.normal_()
        adapter.lambda_d.normal_()
    x = torch.randn(4, 12, dtype=torch.float64)
    a, b = (m.double() for m in projections(2, 5, 12, 10))
    expected = x @ (torch.diag(adapter.lambda_b) @ b @ torch.diag(adapter.lambda_d) @ a).T  # Λ_b B Λ_d A x
    torch.testing.assert_close(adapter(x, None), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(adapter.merge(base.weight, None)[0] - base.weight, adapter.delta_weight(),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("fields,match", [({"r": 0}, "rank r"), ({"d_initial": 0.0}, "d_initial"),
                                          ({"dropout": 1.0}, "dropout"), ({"seed": -1}, "seed"),
                                          ({"seed": 2**63}, "seed"), ({"r": 2.5}, "r")])
def test_bad_specs_are_one_line_errors(fields, match) -> None:
    with pytest.raises(SpecError, match=match) as info:
        VeRA(**fields)
    assert "\n" not in str(info.value)


def test_a_non_linear_target_is_a_one_line_error() -> None:
    with pytest.raises(TargetError, match="vera cannot adapt model.embed_tokens") as info:
        ak.attach(make_tiny("llama"), "a", VeRA(r=4), ["embed_tokens"])
    assert "\n" not in str(info.value)

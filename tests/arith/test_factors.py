"""Low-rank factors: the truncated SVD against its float64 definition, and a LoRA built from given factors adds
exactly their product."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.arith.factors import attach_factors
from adapterkit.core.errors import AdapterKitError
from adapterkit.ops.lowrank import truncated_svd
from tests.conftest import logits, make_tiny, tokens


def test_truncated_svd_is_the_best_rank_r_approximation() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    b, a, error = truncated_svd(delta, 4)
    s = torch.linalg.svdvals(delta)
    assert b.shape == (12, 4) and a.shape == (4, 9)
    assert error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-10)  # Eckart-Young
    exact_b, exact_a, zero = truncated_svd(delta, 50)  # rank above the matrix's: exact, capped at 9
    assert exact_a.shape[0] == 9 and zero < 1e-12
    torch.testing.assert_close(exact_b @ exact_a, delta)
    assert truncated_svd(torch.zeros(3, 3), 2)[2] == 0.0
    with pytest.raises(ValueError, match="positive integer"):
        truncated_svd(delta, 0)


def test_a_lora_from_factors_adds_their_product_at_each_module() -> None:
    model = make_tiny("llama")
    generator = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    factors = {}
    for path, rank in (("model.layers.0.self_attn.q_proj", 3), ("model.layers.1.mlp.down_proj", 5)):
        out_f, in_f = modules[path].weight.shape
        factors[path] = (torch.randn(out_f, rank, generator=generator) * 0.1,
                         torch.randn(rank, in_f, generator=generator) * 0.1)
    attach_factors(model, "f", factors)
    ids = tokens()
    with ak.use(model, "f"):
        ours = logits(model, ids)
    reference = make_tiny("llama")
    with torch.no_grad():
        for path, (b, a) in factors.items():
            dict(reference.named_modules())[path].weight.add_(b @ a)
    torch.testing.assert_close(ours, logits(reference, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterKitError, match="do not give"):
        attach_factors(model, "g", {"model.layers.0.self_attn.q_proj": (torch.zeros(3, 2), torch.zeros(2, 3))})
    with pytest.raises(AdapterKitError, match="Linear / Conv1D layers only"):
        attach_factors(model, "g", {"model.norm": (torch.zeros(32, 1), torch.zeros(1, 32))})

"""MixDA on a pre-norm decoder (a tiny random Llama): the per-token gate is causal, and the old-knowledge loss
compares a decoder layer's normalised output with and without the mixture."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny, randomize, tokens

import adapterkit as ak
from adapterkit.compose.mixda import MixDA
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import placements
from adapterkit.train.mixda import old_knowledge_hooks

DOWN = [r"re:.*layers\.1\.mlp\.down_proj"]
PATH = "model.layers.1.mlp.down_proj"
LAYER = "model.layers.1"


def _decoder(pool: str = "token") -> torch.nn.Module:
    model = make_tiny("llama")
    ak.attach(model, "dom", ak.ParBottleneck(reduction_factor=4, scaling=1.0, activation="gelu"), DOWN)
    randomize(model, "dom", scale=0.3, seed=7)
    ak.attach(model, "gate", MixDA(domains=1, hidden=8, pool=pool), DOWN)
    return model.eval()


def test_token_pool_gives_one_gate_per_token_and_later_tokens_do_not_change_earlier_logits() -> None:
    model, ids = _decoder(), tokens(batch=2, length=8)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 100
    with ak.use(model, ak.Mix("dom", name="gate")) as routing, torch.no_grad():
        first = model(input_ids=ids).logits
        assert routing.weights["gate"][PATH].shape == (2, 8, 2)
        second = model(input_ids=changed).logits
    torch.testing.assert_close(first[:, :5], second[:, :5], atol=1e-6, rtol=0)
    last = _decoder(pool="last")  # the per-sequence pool reads the last token: earlier positions see it
    with ak.use(last, ak.Mix("dom", name="gate")), torch.no_grad():
        assert not torch.allclose(last(input_ids=ids).logits[:, :5], last(input_ids=changed).logits[:, :5])


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def test_old_knowledge_loss_of_a_decoder_layer_compares_its_normalised_output_with_the_bare_projection() -> None:
    model, ids = _decoder(), tokens()
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    spies = [modules[PATH].register_forward_hook(lambda m, a, o: seen.update(x=a[0], m=o)),  # before ours
             modules[LAYER].register_forward_hook(lambda m, a, o: seen.update(h=o[0] if isinstance(o, tuple) else o))]
    losses: list[torch.Tensor] = []
    handles = old_knowledge_hooks(model, [LAYER], losses)
    with ak.use(model, ak.Mix("dom", name="gate")), torch.no_grad():
        model(input_ids=ids)
    for handle in (*handles, *spies):
        handle.remove()
    bare = torch.nn.functional.linear(seen["x"], modules[PATH].weight)
    expected = torch.nn.functional.mse_loss(_rms(seen["h"]), _rms(seen["h"] - seen["m"] + bare))
    assert len(losses) == 1 and losses[0].item() > 0
    torch.testing.assert_close(losses[0], expected)
    gate = placements(model, "gate")[0][2].adapter("gate")
    with torch.no_grad():  # a gate that keeps the FFN alone: no old-knowledge loss
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.copy_(torch.tensor([0.0, 50.0]))
    losses.clear()
    handles = old_knowledge_hooks(model, [LAYER], losses)
    with ak.use(model, ak.Mix("dom", name="gate")), torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    assert losses[0].item() < 1e-10


@pytest.mark.parametrize("path,held", [("model.layers.0", 0), (PATH, 0)])
def test_old_knowledge_hooks_refuse_a_module_without_one_gated_projection_inside(path: str, held: int) -> None:
    with pytest.raises(AdapterKitError, match=f"'{path}' is not an FFN output sub-layer.*holds {held}"):
        old_knowledge_hooks(_decoder(), [path], [])

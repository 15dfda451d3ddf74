"""torch.compile works with attached adapters: same outputs, gradients reach only the adapter."""

from __future__ import annotations

import torch
from tests.conftest import make_tiny, randomize, tokens

import adapterkit as ak


def test_compiled_model_matches_eager_and_trains() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=4), ["q_proj", "v_proj"])
    randomize(model, "a")
    ids = tokens()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled_model = torch.compile(model)
        compiled = compiled_model(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    ak.train_only(model, "a")
    model.train()
    compiled_model(input_ids=ids).logits.float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

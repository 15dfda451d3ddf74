"""A peft model and an adapterkit model with identical adapter weights, for the VeRA / LoHa / LoKr / OFT parity
tests: peft's adapter tensors are randomised, copied into ours by peft's saved names (interop.peft_tuners.NAMES),
and outputs and gradients compared."""

from __future__ import annotations

import copy

import torch
from torch import nn

import adapterkit as ak
from adapterkit.inject.engine import placements
from adapterkit.interop.peft_tuners import NAMES
from tests.conftest import tokens

PEFT_PREFIXES = ("vera_lambda", "hada_", "lokr_", "oft_R")


def peft_tensor(layer: nn.Module, suffix: str) -> torch.Tensor:
    """peft's live tensor for a saved-name suffix: ``vera_lambda_b`` -> ``vera_lambda_b.default``,
    ``oft_R.weight`` -> ``oft_R.default.weight``."""
    head, _, tail = suffix.partition(".")
    return layer.get_parameter(f"{head}.default" + (f".{tail}" if tail else ""))


def pair(base: nn.Module, config, spec, targets, scale: float = 0.1, seed: int = 0):
    """(ours, peft_model): ``base`` adapted both ways, peft's adapter tensors randomised and copied into ours."""
    import peft

    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if any(p in name for p in PEFT_PREFIXES):
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    ak.attach(ours, "a", spec, targets)
    for _, (ours_t, theirs_t) in tensor_pairs(ours, theirs):
        with torch.no_grad():
            ours_t.copy_(theirs_t)
    return ours, theirs


def tensor_pairs(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(path.name, (our trainable tensor, peft's)) for every adapter tensor of adapter "a"."""
    out = []
    for path, _, host in placements(ours, "a"):
        adapter = host.adapter("a")
        layer = theirs.base_model.model.get_submodule(path)
        for pname, param in adapter.named_parameters():
            out.append((f"{path}.{pname}", (param, peft_tensor(layer, NAMES[adapter.spec.method][1][pname]))))
    assert out
    return out


def run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def check_parity(base: nn.Module, ours: nn.Module, theirs: nn.Module, inputs=None) -> None:
    """Same outputs (float32, 1e-5) and the same gradients of every adapter tensor."""
    inputs = {"input_ids": tokens(batch=3, length=12)} if inputs is None else inputs
    with torch.no_grad():
        plain = run(base, inputs)
    expected, got = run(theirs, inputs), run(ours, inputs)
    change = (expected - plain).abs().max().item()
    assert change > 1e-4, change  # the adapters really change the output
    assert (got - expected).abs().max().item() <= 1e-5
    expected.pow(2).mean().backward()
    got.pow(2).mean().backward()
    for name, (mine, peft_t) in tensor_pairs(ours, theirs):
        assert mine.grad is not None and peft_t.grad is not None, name
        assert peft_t.grad.abs().max() > 0, name
        torch.testing.assert_close(mine.grad, peft_t.grad, atol=1e-6, rtol=1e-4, msg=name)

"""MoLE (compose/mole.py): top-k routing against a dense float64 reference, sparse compute, balancing loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.compose.mole import MoLE, switch_loss
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, randomize, tokens

TARGETS = ["gate_proj", "up_proj", "down_proj"]
NAMES = [f"x{i}" for i in range(4)]


def _model(top_k: int = 1, balance: float = 0.01) -> nn.Module:
    model = make_tiny("llama")
    for i, name in enumerate(NAMES):
        ak.attach(model, name, ak.LoRA(r=4), TARGETS)
        randomize(model, name, seed=30 + i, scale=0.3)
    ak.attach(model, "mole", MoLE(experts=4, top_k=top_k, balance=balance, router_std=0.5), TARGETS)
    return model.eval()


def _dense_change(model: nn.Module, path: str, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The paper's formula computed densely in float64: every expert on every token, then weighted by the gates."""
    host = next(h for p, _, h in placements(model, "mole") if p == path)
    x = x.double()
    probs = (x @ host.adapter("mole").router.double().T).softmax(-1)  # (B, T, K)
    top_p, top_i = probs.topk(top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True) if top_k > 1 else top_p
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
    deltas = []
    for name in NAMES:
        adapter = host.adapter(name)
        a, b = adapter.lora_a.double(), adapter.lora_b.double()
        deltas.append((x @ a.T @ b.T) * adapter.scale)
    return (gates.unsqueeze(-1) * torch.stack(deltas, -2)).sum(-2)  # (B, T, out)


@pytest.mark.parametrize("top_k", [1, 2])
def test_routed_changes_equal_the_dense_float64_formula(top_k: int) -> None:
    model = _model(top_k)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for path, module, _ in placements(model, "mole"):
        def post(mod: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
            seen[path] = (args[0], out - torch.nn.functional.linear(args[0], mod.weight))
        hooks.append(module.register_forward_hook(post))  # registered after the host's: sees the routed output
    with torch.no_grad(), ak.use(model, ak.Mix(*NAMES, name="mole")) as routing:
        model(input_ids=tokens(batch=3, length=7))
    for handle in hooks:
        handle.remove()
    assert len(seen) == 6
    for path, (x, change) in seen.items():
        expected = _dense_change(model, path, x, top_k)
        assert ((change.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5, path
        weights = routing.weights["mole"][path]  # (B, T, K): the gates used, per token and module
        assert weights.shape == (3, 7, 4) and ((weights > 0).sum(-1) == top_k).all()


def test_each_expert_runs_only_on_its_own_tokens() -> None:
    model = _model()
    rows: dict[str, int] = {}
    for name in NAMES:
        adapter = placements(model, name)[0][2].adapter(name)
        adapter.register_forward_hook(lambda m, a, o, name=name: rows.__setitem__(name, a[0].shape[0]))
    with torch.no_grad(), ak.use(model, ak.Mix(*NAMES, name="mole")) as routing:
        model(input_ids=tokens(batch=3, length=7))
    first = routing.weights["mole"][placements(model, "mole")[0][0]]
    chosen = torch.bincount(first.argmax(-1).reshape(-1), minlength=4)
    assert sum(rows.values()) == 21  # 3 x 7 tokens, each through exactly one expert
    assert [rows.get(n, 0) for n in NAMES] == chosen.tolist() and (chosen < 21).all()


def test_balancing_loss_is_switch_and_the_router_learns_from_the_task_loss() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    assert switch_loss(probs, probs.argmax(-1)).item() == pytest.approx(2 * (2 / 3 * 0.5 + 1 / 3 * 0.5))
    assert switch_loss(torch.full((4, 4), 0.25), torch.arange(4)).item() == pytest.approx(1.0)
    model = _model(balance=0.5)
    assert ak.train_only(model, "mole") == 2 * 4 * (32 + 32 + 64)  # 2 blocks, K x d_in per projection
    model.train()
    ids = tokens()
    with ak.use(model, ak.Mix(*NAMES, name="mole")) as routing:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        task_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        assert len(routing.losses["load_balance"]) == 6
        assert 0.5 <= routing.aux_loss().item() / 6 <= 0.5 * 4  # each term is balance * (1 .. K)
        routing.aux_loss().backward()
    assert all(g.abs().sum() > 0 for g in task_grads)  # through the gate p_{k*}, not only the aux loss


def test_token_mask_keeps_padding_out_of_the_balancing_loss() -> None:
    model = _model(balance=1.0)
    ids = tokens(batch=2, length=6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])  # row 1 ends in two padding tokens
    seen: list[tuple[str, torch.Tensor]] = []  # (module path, its input), in execution order
    handles = [module.register_forward_hook(lambda m, args, out, path=path: seen.append((path, args[0])))
               for path, module, _ in placements(model, "mole")]
    block = ak.Mix(*NAMES, name="mole")
    with torch.no_grad():
        with ak.use(model, block, token_mask=mask) as masked:
            model(input_ids=ids, attention_mask=mask)
        with ak.use(model, block) as unmasked:
            model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    routers = {path: host.adapter("mole").router for path, _, host in placements(model, "mole")}
    real = mask.reshape(-1).bool()
    for (path, x), got, everything in zip(seen, masked.losses["load_balance"], unmasked.losses["load_balance"]):
        probs = (x.reshape(-1, x.shape[-1]) @ routers[path].T).softmax(-1)  # (12 tokens, K)
        expected = switch_loss(probs[real], probs[real].argmax(-1))  # the 10 real tokens only
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert everything.item() == pytest.approx(switch_loss(probs, probs.argmax(-1)).item(), rel=1e-5)
    assert len(masked.losses["load_balance"]) == 6
    with pytest.raises(ak.AdapterKitError, match="only apply to a composition block"):
        with ak.use(model, "x0", token_mask=mask):
            pass


def test_bad_specs_and_targets_are_one_line_errors() -> None:
    with pytest.raises(SpecError, match="top_k must be in 1..experts"):
        MoLE(experts=2, top_k=3)
    with pytest.raises(SpecError, match="balance must be >= 0"):
        MoLE(balance=-1)
    model = make_tiny("llama")
    with pytest.raises(TargetError, match="mole cannot route at model.norm"):
        ak.attach(model, "m", MoLE(), ["model.norm"])

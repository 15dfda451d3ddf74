"""Poly / MHR (TaskRoute): parity with peft's ``poly``, errors, and the MHR-z / MHR-mu few-shot tools."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.train import poly_tools
from tests.conftest import logits, make_tiny, randomize, tokens

TARGETS = ["query", "intermediate.dense", "output.dense"]  # square (32 -> 32) and rectangular (32 <-> 64)


def _peft_and_ours(n_splits: int, n_tasks: int = 3, n_skills: int = 4, r: int = 2):
    peft = pytest.importorskip("peft")
    base = make_tiny("bert")
    ours = copy.deepcopy(base)
    config = peft.PolyConfig(r=r, target_modules=TARGETS, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                             init_weights=False)  # B non-zero, so the update is not trivially 0
    reference = peft.get_peft_model(base, config).eval()
    block = poly_tools.attach_poly(ours, "poly", ak.LoRA(r=r, alpha=1.0), TARGETS, n_tasks=n_tasks, n_skills=n_skills,
                           n_splits=n_splits)
    layers = dict(reference.base_model.model.named_modules())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, _, host in placements(ours, "poly"):
            layer = layers[path]
            layer.poly_router["default"].module_logits.normal_(generator=generator)  # routing far from uniform
            host.adapter("poly").module_logits.copy_(layer.poly_router["default"].module_logits)
            a, b = layer.poly_lora_A["default"], layer.poly_lora_B["default"]  # (Q, S, in/Q, r), (Q, S, r, out/Q)
            for skill, child in enumerate(block.children):
                lora = host.adapter(child)
                lora.lora_a.copy_(torch.cat([a[q, skill].T for q in range(n_splits)], dim=1))  # (r, in)
                lora.lora_b.copy_(torch.cat([b[q, skill].T for q in range(n_splits)], dim=0))  # (out, r)
    return reference, ours.eval(), block


@pytest.mark.parametrize("n_splits", [1, 4], ids=["poly", "mhr"])
def test_outputs_equal_peft_poly(n_splits: int) -> None:
    reference, ours, block = _peft_and_ours(n_splits)
    ids = tokens(batch=3)
    task_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        expected = reference.base_model(input_ids=ids, task_ids=task_ids).logits  # PolyModel routes by task_ids
        base = ours(input_ids=ids).logits
    with ak.use(ours, block, task_ids=task_ids) as routing:
        out = logits(ours, ids)
    error = (out - expected).abs().max().item()
    print(f"poly n_splits={n_splits}: max |ours - peft| = {error:.2e}")
    assert error < 1e-5
    assert (out - base).abs().max() > 1e-3  # the routed update is really there
    weights = next(iter(routing.weights["poly"].values()))
    assert weights.shape == (3, n_splits, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, n_splits))


def test_training_samples_relaxed_bernoulli_weights_and_sigmoid_sampling_is_deterministic() -> None:
    model = make_tiny("bert")
    block = poly_tools.attach_poly(model, "poly", ak.LoRA(r=2), ["query"], n_tasks=2, n_skills=3, n_splits=2)
    for child in block.children:
        randomize(model, child)
    ak.train_only(model, ["poly", *block.children])
    model.train()
    ids = tokens()
    with ak.use(model, block, task_ids=[0, 1]) as routing:
        model(input_ids=ids).logits.pow(2).sum().backward()
    weights = next(iter(routing.weights["poly"].values()))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))
    assert weights.std() > 0.01  # a relaxed Bernoulli sample, not the near-uniform sigmoid of the init
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert len(grads) == 2 * (1 + 3 * 2)  # 2 query layers x (router logits + 3 skills x (A, B))
    sigmoid = make_tiny("bert")
    block = poly_tools.attach_poly(sigmoid, "poly", ak.LoRA(r=2), ["query"], n_tasks=2, n_skills=3, sampling="sigmoid")
    for child in block.children:
        randomize(sigmoid, child)
    sigmoid.eval()
    with ak.use(sigmoid, block, task_ids=[0, 1]):
        expected = logits(sigmoid, ids)
    for module in sigmoid.modules():  # training mode on the routers only (the base keeps dropout off)
        if isinstance(module, ak.compose.poly.PolyRouter):
            module.train()
    with ak.use(sigmoid, block, task_ids=[0, 1]):
        torch.testing.assert_close(logits(sigmoid, ids), expected, atol=0, rtol=0)


def test_task_route_errors_are_one_line() -> None:
    model = make_tiny("bert")
    block = poly_tools.attach_poly(model, "poly", ak.LoRA(r=2), ["query"], n_tasks=2, n_skills=2)
    ids = tokens()
    cases = [
        (lambda: logits_with(model, block, ids, [0, 2]), "poly at 'bert.encoder.layer.0.attention.self.query': "
                                                          "task id 2 is out of range; this router has 2 task"),
        (lambda: logits_with(model, block, ids, [-1, 0]), "task id -1 is out of range"),
        (lambda: logits_with(model, block, ids, None), "pass task_ids= to use"),
        (lambda: ak.compose.Poly(n_splits=0), "n_splits must be a positive integer, got 0"),
        (lambda: ak.compose.Poly(sampling="gumbel"), "sampling must be one of"),
        (lambda: ak.attach(make_tiny("bert"), "p", ak.compose.Poly(n_splits=3), ["query"]),
         "n_splits=3 does not divide the in features (32)"),
        (lambda: ak.attach(make_tiny("bert"), "p", ak.compose.Poly(), ["LayerNorm"]), "cannot route"),
        (lambda: poly_tools.attach_poly(make_tiny("bert"), "p", ak.IA3(), ["query"], n_tasks=1),
         "skills must be a LoRA"),
    ]
    for make, message in cases:
        with pytest.raises((AdapterKitError, SpecError, TargetError, ValueError)) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value)
    ak.attach(model, "odd", ak.LoRA(r=4), ["query"])
    with pytest.raises(AdapterKitError, match="skill 'odd' has rank 4 and scale 4.0"):
        logits_with(model, ak.Mix("poly_skill0", "odd", name="poly"), ids, [0, 1])
    ak.attach(model, "bias", ak.BitFit(), ["query"])
    with pytest.raises(AdapterKitError, match="skill 'bias' is a bitfit, not a LoRA"):
        logits_with(model, ak.Mix("poly_skill0", "bias", name="poly"), ids, [0, 1])
    ak.attach(model, "half", ak.LoRA(r=2), ["layer.0.attention.self.query"])
    with pytest.raises(AdapterKitError, match=r"skills \['half'\] are not attached here"):
        logits_with(model, ak.Mix("poly_skill0", "half", name="poly"), ids, [0, 1])


def logits_with(model: torch.nn.Module, block: ak.Mix, ids: torch.Tensor, task_ids: list[int] | None
                ) -> torch.Tensor:
    with ak.use(model, block, task_ids=task_ids):
        return logits(model, ids)


def _trained_poly(n_splits: int) -> tuple[torch.nn.Module, ak.Mix]:
    model = make_tiny("bert")
    block = poly_tools.attach_poly(model, "poly", ak.LoRA(r=2), ["query", "value"], n_tasks=3, n_skills=4,
                                   n_splits=n_splits)
    for index, name in enumerate(["poly", *block.children]):
        randomize(model, name, scale=0.5 if name == "poly" else 0.05, seed=index)
    return model.eval(), block


@pytest.mark.parametrize("n_splits", [1, 4])
def test_mhr_mu_is_one_plain_lora_equal_to_uniform_or_task_routing(n_splits: int) -> None:
    model, block = _trained_poly(n_splits)
    ids = tokens()
    poly_tools.mhr_mu(model, block, "mu")  # uniform 1 / m: independent of the trained routing
    with torch.no_grad():  # equal logits make the routing exactly uniform (up to peft's 1e-12)
        for _, _, host in placements(model, "poly"):
            host.adapter("poly").module_logits.zero_()
    with ak.use(model, block, task_ids=[0, 2]):
        uniform = logits(model, ids)
    assert isinstance(placements(model, "mu")[0][2].adapter("mu").spec, ak.LoRA)
    with ak.use(model, "mu"):
        torch.testing.assert_close(logits(model, ids), uniform, atol=1e-6, rtol=0)
    ak.merge(model, "mu")  # a plain LoRA: mergeable
    with ak.use(model, "mu"):  # merged: in the base weights
        torch.testing.assert_close(logits(model, ids), uniform, atol=1e-5, rtol=0)


def test_mhr_mu_with_a_task_equals_that_tasks_routing() -> None:
    model, block = _trained_poly(4)
    ids = tokens()
    with ak.use(model, block, task_ids=[1, 1]):
        expected = logits(model, ids)
    poly_tools.mhr_mu(model, block, "task1", task=1)
    with ak.use(model, "task1"):
        out = logits(model, ids)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with ak.use(model, block, task_ids=[0, 0]):
        assert (logits(model, ids) - out).abs().max() > 1e-4  # another task's routing really differs


def test_mhr_z_trains_only_a_new_routing_row_over_frozen_skills() -> None:
    model, block = _trained_poly(4)
    ids = tokens()
    with ak.use(model, block, task_ids=[0, 2]):
        before = logits(model, ids)
    new = poly_tools.mhr_z(model, block, "poly_new")
    assert new.children == block.children and new.name == "poly_new"
    count = ak.train_only(model, "poly_new")
    assert count == 4 * (1 * 4 * 4)  # 4 modules x one task x (4 heads x 4 skills)
    model.train()
    with ak.use(model, new, task_ids=[0, 0]):
        model(input_ids=ids).logits.pow(2).sum().backward()
    changed = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert changed and all("poly_new" in n for n in changed)
    model.eval()
    with ak.use(model, block, task_ids=[0, 2]):
        torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)  # the multi-task model is intact
    with pytest.raises(AdapterKitError, match="task id 1 is out of range; this router has 1 task"):
        logits_with(model, new, ids, [0, 1])


def test_task_routing_table_has_every_task() -> None:
    model, block = _trained_poly(2)
    table = poly_tools.task_routing(model, "poly")
    assert len(table) == 4
    for weights in table.values():
        assert weights.shape == (3, 2, 4)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2))
    with pytest.raises(AdapterKitError, match="is a lora, not a poly router"):
        poly_tools.task_routing(model, "poly_skill0")


def test_multitask_classifier_learns_with_a_poly_block() -> None:
    from adapterkit.train.multitask import MultiTaskClassifier

    torch.manual_seed(0)
    encoder = make_tiny("bert").bert
    block = poly_tools.attach_poly(encoder, "poly", ak.LoRA(r=4), ["query", "value"], n_tasks=2, n_skills=3, n_splits=2)
    ak.train_only(encoder, ["poly", *block.children])
    model = MultiTaskClassifier(encoder, {"a": 2, "b": 3}, block=block, dropout=0.0)
    ids, mask = tokens(batch=6), torch.ones(6, 8, dtype=torch.long)
    task_ids, labels = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 2, 1, 0, 1, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(ids, mask, task_ids, labels)
        assert out.loss is not None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]  # (relaxed-Bernoulli routing samples keep the loss noisy)
    start = {p: host.adapter("poly").module_logits for p, _, host in placements(encoder, "poly")}
    assert all(logits_.abs().max() > 1e-2 for logits_ in start.values())  # the routing moved off its 1e-3 init
    assert out.logits.shape == (6, 3) and torch.isinf(out.logits[0, 2])  # task a has 2 labels: the third is -inf

"""Set up Poly / MHR, and adapt them to a new task with few examples: MHR-z and MHR-mu.

Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task Generalization", https://arxiv.org/abs/2211.03831:

* ``attach_poly``: m LoRA skills and one Poly router on the same modules; returns the ``Mix`` block that runs them.
* ``mhr_z``: a fresh one-task router over the frozen skills (train only it: ``ak.train_only(model, name)``).
* ``mhr_mu``: collapse the skills into one plain LoRA, A = sum_s w_s A_s and B = sum_s w_s B_s per head, with
  w_s = 1 / m (MHR-mu) or a trained task's routing weights; the result is an ordinary LoRA: train, merge, export.
* ``task_routing``: each router's eval-mode weights for every task, (T, h, m) per module (for plots).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.compose.poly import Poly, PolyRouter, mix_factors
from adapterkit.core.blocks import Learned, Mix
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import attach, placements
from adapterkit.inject.select import Targets
from adapterkit.methods.lora import LoRA


def attach_poly(model: nn.Module, name: str, skill: LoRA, targets: Targets, n_tasks: int, n_skills: int = 4,
                n_splits: int = 1, sampling: str = "relaxed_bernoulli") -> Mix:
    """Attach skills ``{name}_skill0 ..`` (LoRAs from ``skill``) and the router ``name``; return their block.

    Each skill's A is re-drawn Kaiming-uniform per head (fan-in = in / n_splits), as peft and mttl initialise
    their (split, skill) blocks; B stays zero, so the model starts as the base model. ``skill=LoRA(r, alpha=1.0)``
    gives peft's 1 / r scale.
    """
    if not isinstance(skill, LoRA):
        raise AdapterKitError(f"attach_poly({name!r}): skills must be a LoRA spec, got {type(skill).__name__}")
    spec = Poly(n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, sampling=sampling)
    paths = attach(model, name, spec, targets)  # checks the targets (Linear, splits divide) before any skill
    exact = [f"re:{re.escape(p)}" for p in paths]
    names = [f"{name}_skill{i}" for i in range(n_skills)]
    for each in names:
        attach(model, each, skill, exact)
        for _, _, host in placements(model, each):
            _init_per_head(host.adapter(each).lora_a, n_splits)
    return Mix(*names, name=name)


def _init_per_head(a: Tensor, heads: int) -> None:
    """Kaiming-uniform (a = sqrt 5) on each (r, in / heads) block, as nn.Linear would for that fan-in."""
    with torch.no_grad():
        for block in a.chunk(heads, dim=1):
            bound = 1.0 / math.sqrt(block.shape[1])  # kaiming_uniform_(a=sqrt 5) on fan-in d: U(-1/sqrt d, 1/sqrt d)
            block.uniform_(-bound, bound)


def _routers(model: nn.Module, block: Learned) -> list[tuple[str, PolyRouter, list[Any]]]:
    """(path, router, skills) for each module the block's router is on."""
    if not isinstance(block, Learned):
        raise AdapterKitError(f"expected the Mix block of a Poly router, got {type(block).__name__}")
    found = []
    for path, _, host in placements(model, block.name):
        router = host.adapter(block.name)
        if not isinstance(router, PolyRouter):
            raise AdapterKitError(f"{block.name!r} at {path!r} is a {router.spec.method}, not a poly router")
        skills: list[Any] = [host._modules.get(child) for child in block.children]
        missing = [c for c, s in zip(block.children, skills) if s is None]
        if missing:
            raise AdapterKitError(f"{block.name!r} at {path!r}: skills {missing} are not attached there")
        found.append((path, router, skills))
    return found


def mhr_z(model: nn.Module, block: Learned, name: str) -> Mix:
    """MHR-z: attach a fresh one-task router ``name`` (Z ~ U(-1e-3, 1e-3)) over ``block``'s skills.

    Train it alone (``ak.train_only(model, name)``) with ``use(model, returned_block, task_ids=[0] * batch)``;
    the skills and the multi-task router are left as they are.
    """
    routers = _routers(model, block)
    old = routers[0][1].spec
    spec = Poly(n_tasks=1, n_skills=old.n_skills, n_splits=old.n_splits, sampling=old.sampling)
    attach(model, name, spec, [f"re:{re.escape(path)}" for path, _, _ in routers])
    return Mix(*block.children, name=name)


def mhr_mu(model: nn.Module, block: Learned, name: str, task: int | None = None) -> str:
    """MHR-mu: attach a plain LoRA ``name`` equal to ``block`` with uniform weights 1 / m (``task=None``), or
    with task ``task``'s eval-mode routing; returns ``name``.

    With uniform weights every head mixes alike, so A_mu = mean_s A_s and B_mu = mean_s B_s exactly.
    """
    routers = _routers(model, block)
    skill_spec = routers[0][2][0].spec
    attach(model, name, skill_spec, [f"re:{re.escape(path)}" for path, _, _ in routers])
    made = {path: host.adapter(name) for path, _, host in placements(model, name)}
    with torch.no_grad():
        for path, router, skills in routers:
            spec = router.spec
            if task is None:
                weights = torch.full((1, spec.n_splits, spec.n_skills), 1.0 / spec.n_skills)
            else:
                weights = _eval_weights(router, torch.tensor([task]), path)
            lora_a = skills[0].lora_a
            a_mix, b_mix = mix_factors(skills, weights.to(lora_a.device), lora_a)  # (1, r, in), (1, out, r)
            made[path].lora_a.copy_(a_mix[0])
            made[path].lora_b.copy_(b_mix[0])
    return name


def _eval_weights(router: PolyRouter, ids: Tensor, path: str) -> Tensor:
    was = router.training
    router.eval()  # the deterministic sigmoid weights, not a relaxed-Bernoulli sample
    try:
        return router.task_weights(ids, f" at {path!r}")
    finally:
        router.train(was)


def task_routing(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Eval-mode routing weights of every task, per module of router ``name``: path -> (T, h, m)."""
    table = {}
    for path, _, host in placements(model, name):
        router = host.adapter(name)
        if not isinstance(router, PolyRouter):
            raise AdapterKitError(f"{name!r} at {path!r} is a {router.spec.method}, not a poly router")
        with torch.no_grad():
            table[path] = _eval_weights(router, torch.arange(router.spec.n_tasks), path).cpu()
    return table

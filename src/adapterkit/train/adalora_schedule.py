"""AdaLoRA's training-time part (Zhang et al. 2023, https://arxiv.org/abs/2303.10512): the rank allocator and the
orthogonality penalty, as peft's ``RankAllocator`` and ``AdaLoraModel.forward`` compute them.

They are callbacks of the training loop, not part of the adapter's forward: ``train.loop.run_training`` finds them
through the spec (``AdaLoRA.training_hooks``, see ``loop.training_hooks``) and calls them itself. Any other loop
uses them like this (peft's order: the allocator reads the gradients after the optimizer step, before they are
cleared; ``step`` counts optimizer steps from 0)::

    allocator = RankAllocator(model, "a", total_steps=len(loader) * epochs)  # unless the spec sets total_step
    for step, batch in enumerate(batches):
        loss = model(**batch).loss + allocator.extra_loss(model)  # orth_reg_weight * mean ||AA^T - I|| + ...
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(model, step)  # scores, budget, masks E (a bool buffer keeps the pattern)
        optimizer.zero_grad()

The schedule, with T = total steps: steps <= tinit keep every triplet; a step t below T - tfinal updates the scores
(EMA of |w * grad| with beta1, EMA of its deviation with beta2; a triplet's score is its E entry's plus the means of
its A row and B column) and, every deltaT steps, keeps the ``budget(t)`` best triplets over all layers,
budget(t) = int((b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT), b0 = init_r * layers,
bT = target_r * layers; the step T - tfinal allocates bT for good and later steps re-apply that mask. The scores
live here, not in the adapters: a resumed run starts them afresh (the kept mask is in the adapters' saved state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.core.tree import placements
from adapterkit.methods.adalora import AdaLoRA, AdaLoRALinear


class RankAllocator:
    """Budget schedule, importance scores and masking for AdaLoRA adapter ``name`` of ``model``; also the loop's
    training hooks (``extra_loss``: the orthogonality penalty; ``after_step``: ``update_and_allocate``)."""

    def __init__(self, model: nn.Module, name: str, total_steps: int | None = None) -> None:
        self.layers: list[tuple[str, AdaLoRALinear]] = [(p, h.adapter(name)) for p, _, h in placements(model, name)]
        odd = [p for p, layer in self.layers if not isinstance(layer, AdaLoRALinear)]
        if odd:
            raise AdapterKitError(f"rank allocation: adapter {name!r} at {odd[0]} is not an AdaLoRA adapter")
        spec: AdaLoRA = self.layers[0][1].spec
        if any(layer.spec != spec for _, layer in self.layers):
            raise SpecError(f"rank allocation: adapter {name!r} has several AdaLoRA specs; one schedule needs one")
        total = spec.total_step or total_steps
        if not total:
            raise SpecError(f"{spec.method}: adapter {name!r} has no total_step; set it in the spec or pass "
                            "total_steps (the number of optimizer steps of the run)")
        spec.check_schedule(total)
        self.name, self.spec, self.total = name, spec, int(total)
        self.init_budget = sum(layer.lora_a.shape[0] for _, layer in self.layers)
        self.target_budget = spec.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed sensitivities and uncertainties (peft does after the final allocation)."""
        self.exp_avg_ipt: dict[tuple[int, str], Tensor] = {}
        self.exp_avg_unc: dict[tuple[int, str], Tensor] = {}

    # -- the loop's hooks ---------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """orth_reg_weight * mean over the A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F (None at 0)."""
        if self.spec.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer in self.layers:
            for cov in (layer.lora_a @ layer.lora_a.t(), layer.lora_b.t() @ layer.lora_b):  # (r, r)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.spec.orth_reg_weight * (torch.stack(terms).sum() / len(terms))

    def after_step(self, model: nn.Module, step: int) -> None:
        self.update_and_allocate(model, step)

    # -- the schedule -------------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether this step re-allocates)."""
        tinit, tfinal, total = self.spec.tinit, self.spec.tfinal, self.total
        if step <= tinit:
            return self.init_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        left = 1 - (step - tinit) / (total - tfinal - tinit)  # 1 -> 0 over the budgeting phase
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % self.spec.deltaT == 0

    def update_and_allocate(self, model: nn.Module, step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """Call after ``optimizer.step()`` and before ``zero_grad`` at every optimizer step (0-based). Returns the
        budget and, when this step allocated, the kept triplets per module path (peft's ``rank_pattern``)."""
        edge = self.total - self.spec.tfinal
        if step < edge:
            self.update_ipt()
            budget, allocate = self.budget_schedule(step)
            return budget, (self.mask_to_budget(budget) if allocate else None)
        if step == edge:  # the final allocation; its mask is kept from here on
            pattern = self.mask_to_budget(self.target_budget)
            self.reset_ipt()
            return self.target_budget, pattern
        with torch.no_grad():  # the optimizer may have moved pruned entries: zero them again
            for _, layer in self.layers:
                layer.lora_e.masked_fill_(~layer.rank_mask[:, None], 0.0)
        return self.target_budget, None

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Smooth every entry's sensitivity |w * grad| (beta1) and its uncertainty |ipt - smoothed| (beta2)."""
        beta1, beta2 = self.spec.beta1, self.spec.beta2
        for key, param in self._tensors():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            ipt = (param * grad).abs()
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(param)
                self.exp_avg_unc[key] = torch.zeros_like(param)
            avg = self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * ipt
            self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (ipt - avg).abs()

    def scores(self) -> list[Tensor]:
        """Per layer, the (r,) triplet scores: E's entry score plus the mean entry scores of A's row and B's column."""
        out = []
        for index, _ in enumerate(self.layers):
            score = {part: self.exp_avg_ipt[index, part] * self.exp_avg_unc[index, part] for part in "aeb"}
            out.append(score["e"].view(-1) + (score["a"].mean(dim=1) + score["b"].mean(dim=0)))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of all but the ``budget`` best-scored triplets (ties at the threshold go too, as in
        peft) and record the kept ones in each adapter's ``rank_mask``; returns them per module path."""
        if not self.exp_avg_ipt:  # no step scored yet (a run resumed at the final allocation): keep the masks
            return self.rank_pattern()
        scores = self.scores()
        cut = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(scores), cut).values.item() if cut > 0 else float("-inf")
        for (_, layer), score in zip(self.layers, scores, strict=True):
            keep = score > threshold
            layer.lora_e.masked_fill_(~keep[:, None], 0.0)
            layer.rank_mask.copy_(keep)
        return self.rank_pattern()

    def rank_pattern(self) -> dict[str, list[bool]]:
        """The triplets each module keeps, by module path."""
        return {path: layer.rank_mask.tolist() for path, layer in self.layers}

    def _tensors(self) -> list[tuple[tuple[int, str], nn.Parameter]]:
        return [((i, part), getattr(layer, f"lora_{part}")) for i, (_, layer) in enumerate(self.layers)
                for part in "aeb"]

"""LLaVA-MoLE: a sparse mixture of LoRA experts, top-1 per token (Chen, Jie & Ma 2024,
https://arxiv.org/abs/2401.16160); the learned part of ``Route``.

At each adapted module a router scores the token's input x (d,) against K experts and only the chosen expert runs:

    p = softmax(W_r x)                    W_r: (K, d)
    k* = argmax_k p_k                     (top_k > 1: the k largest, their p re-normalised to sum to 1)
    y = W x + p_{k*} * delta_{k*}(x)      scaling by p_{k*} lets the task loss train the router (Switch Transformer)

Load balancing (Switch Transformer, https://arxiv.org/abs/2101.03961), reported as the auxiliary loss
"load_balance" of every module and forward, times ``balance``:

    L_aux = K * sum_k f_k * P_k           f_k: fraction of tokens sent to k, P_k: mean router probability of k

Tokens are grouped by expert (a stable sort, then one slice per expert), and each expert runs only on its own
tokens, so the cost is one expert per token plus the K x d router, not K experts masked. The paper routes once per
FFN block for gate, up and down together; here each adapted module has its own router on its own input (attach
to the FFN projections for the paper's placement), which needs no cross-module state. With
``use(..., token_mask=attention_mask)`` (as ``MultiTaskClassifier`` passes it) padding tokens are left out of f_k
and P_k; without it every token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require


@register("mole")
@dataclass(frozen=True)
class MoLE(AdapterSpec):
    """Spec of a sparse top-k router over ``experts`` adapters."""

    role = "route"
    experts: int = 4  # K, the number of children of the Route block
    top_k: int = 1  # experts run per token
    balance: float = 1.0  # weight the loss is reported with (0: not reported); the trainer scales all aux losses
    router_std: float = 0.02  # std of the router's Gaussian init (the paper does not give it)

    def __post_init__(self) -> None:
        require(isinstance(self.experts, int) and self.experts > 0, f"mole: experts must be a positive integer, "
                f"got {self.experts!r}")
        require(isinstance(self.top_k, int) and 0 < self.top_k <= self.experts,
                f"mole: top_k must be in 1..experts ({self.experts}), got {self.top_k!r}")
        require(self.balance >= 0, f"mole: balance must be >= 0, got {self.balance}")
        require(self.router_std > 0, f"mole: router_std must be > 0, got {self.router_std}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"mole cannot route at {path} ({type(base).__name__}): the router reads a Linear's "
                              "input features")

    def build(self, base: nn.Module) -> nn.Module:
        return MoLERouter(self, base)


class MoLERouter(nn.Module):
    """The router of one module: picks the top-k experts per token and runs each only on its tokens."""

    def __init__(self, spec: MoLE, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.experts
        like = tensor(base, "weight")
        features = layer_info(base).in_features
        self.router = nn.Parameter(torch.empty(spec.experts, features, dtype=master_dtype(like), device=like.device))
        nn.init.normal_(self.router, std=spec.router_std)

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        """``out`` plus each token's chosen experts' changes, weighted by their router probabilities."""
        k, experts = self.spec.top_k, self.spec.experts
        flat_x = x.reshape(-1, x.shape[-1])  # (N, d)
        flat_out = out.reshape(-1, out.shape[-1])  # (N, out)
        probs = F.linear(flat_x, as_compute(self.router, flat_x)).float().softmax(-1)  # (N, K)
        top_p, top_i = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        if self.spec.balance > 0:  # over real tokens only when use(..., token_mask=) gave the attention mask
            real = call.real_tokens(x)
            chosen = top_i[:, 0] if real is None else top_i[real, 0]
            call.add_loss("load_balance", self.spec.balance * switch_loss(probs if real is None else probs[real],
                                                                          chosen))
        used = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # (N, K): the weights applied, zero elsewhere
        call.record(used.reshape(*x.shape[:-1], experts))
        # group the (token, expert) assignments by expert: one stable sort, then a contiguous slice per expert
        order = top_i.reshape(-1).argsort(stable=True)  # (N * k,)
        tokens = order // k  # token of each sorted assignment
        gates = top_p.reshape(-1)[order].to(out.dtype)  # (N * k,)
        counts = torch.bincount(top_i.reshape(-1), minlength=experts).tolist()
        result = flat_out.clone()
        start = 0
        for branch, count in zip(branches, counts):
            if count:
                rows = tokens[start : start + count]
                # a parallel adapter (LoRA) never reads the base output: skip gathering it
                parallel = getattr(branch.adapter, "site", None) is Site.PARALLEL
                delta = branch.change(flat_x.index_select(0, rows),
                                      flat_out[:count] if parallel else flat_out.index_select(0, rows))  # (n_e, out)
                if delta is not None:
                    result.index_add_(0, rows, delta * gates[start : start + count, None])
            start += count
        return result.reshape(out.shape)


def switch_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """L_aux = K * sum_k f_k P_k for router probabilities ``probs`` (N, K) and top-1 choices ``chosen`` (N,);
    equals 1 when both are uniform."""
    experts = probs.shape[-1]
    share = torch.bincount(chosen, minlength=experts).to(probs.dtype) / max(chosen.numel(), 1)  # f_k (K,)
    return experts * (share * probs.mean(0)).sum()

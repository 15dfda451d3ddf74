"""MoSA: Mixture of Sparse Adapters, "split & merge" (Zhang et al. 2023, https://arxiv.org/abs/2312.02923).

A bottleneck adapter A(h) = U act(D h + d) + u is split into E experts that start as copies of it. Every entry of a
split matrix is given to exactly one expert by a random partition (disjoint masks M_1..M_E that cover the matrix;
the reference code's quantile bands of a random score). Expert i may change only its own entries:

    W_i = W_0 + M_i * P,        P: one dense tensor holding every expert's sparse update (disjoint supports)

In training, each forward draws one expert per split matrix uniformly at random (independently for D and U, as the
reference code does per block), so a step updates one sparse copy. After training the experts are merged by the
paper's "add" rule, their mean, which is one dense adapter of the original size:

    W_merged = (1/E) sum_i W_i = W_0 + P / E          (the union of the sparse updates, scaled by 1/E)

The adapter runs in merged form in eval mode, and ``merged_bottleneck`` returns it as a plain ``seq_bn`` adapter
(spec + state) for storage and serving. Split "up" (the paper's hierarchical default, SHARE=down) splits only the
up-projection and trains D densely; "all" splits both, and keeps D's init W_0 as a buffer (U starts at 0, so its
W_0 is implicit). Biases are dense and shared (the reference code gives each expert its own full bias and averages
them; one shared bias is what that average trains towards, and keeps the merged size exact).

Placement is the sequential bottleneck's (``seq_bn``): y = f(x) + s A(f(x)), or LN(x + s A(LN(x))) on a post-norm
target, so MoSA compares with a standard adapter of the same size in the same place. Expert draws use torch's
global generator (seeded by the training seed; saved and restored with training checkpoints, so a resumed run draws
the same experts). The optional consistency loss needs two forward passes with independent draws; it is a function
of their logits the training loop adds explicitly (``consistency_loss``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import require
from adapterkit.methods.bottleneck import SeqBottleneck, SequentialAdapter

SPLITS = ("up", "all")  # "up": hierarchical (D shared and dense); "all": D and U both split


@register("mosa")
@dataclass(frozen=True)
class MoSA(SeqBottleneck):
    """Spec of a mixture of sparse adapters: the bottleneck fields, plus E experts, the split and the mask seed."""

    experts: int = 4  # E
    split: str = "up"  # one of SPLITS
    seed: int = 0  # seeds the random partition into masks

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.experts, int) and self.experts >= 2,
                f"mosa: experts must be an integer >= 2, got {self.experts!r}")
        require(self.split in SPLITS, f"mosa: split must be one of {SPLITS}, got {self.split!r}")
        require(isinstance(self.seed, int) and self.seed >= 0, f"mosa: seed must be an integer >= 0, got {self.seed!r}")
        require(self.init == "zero_up", f"mosa: init must be 'zero_up' (experts are copies of an adapter whose "
                                        f"up-projection starts at 0), got {self.init!r}")

    def build(self, base: nn.Module) -> nn.Module:
        return SparseMixture(self, base)

    def dense_spec(self) -> SeqBottleneck:
        """The plain sequential bottleneck the experts merge into."""
        shared = {f.name: getattr(self, f.name) for f in fields(SeqBottleneck)}
        return SeqBottleneck(**shared)


def _salt(base: nn.Module) -> int:
    # per-layer mask seed from the base weights, so layers get different partitions yet a reload gets the same
    sample = next(base.parameters()).detach().reshape(-1)[:64].to("cpu", torch.float64).numpy().tobytes()
    return int(hashlib.sha256(sample).hexdigest()[:8], 16)


class SparseMixture(nn.Module):
    """E sparse copies of a sequential bottleneck sharing one dense parameter set; merged (mean) in eval mode."""

    site = Site.OUTPUT

    def __init__(self, spec: MoSA, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.adapter = SequentialAdapter(spec, base)  # its block's split weights hold P, the union of updates
        self.split_names = ("up.weight",) if spec.split == "up" else ("down.weight", "up.weight")
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + _salt(base))
        block = self.adapter.block
        for name in self.split_names:
            weight = block.get_parameter(name)
            # a random permutation dealt round-robin: disjoint, covering, and (near) equal-sized masks
            owner = (torch.randperm(weight.numel(), generator=generator) % spec.experts).to(torch.uint8)
            self.register_buffer(f"owner_{name.split('.')[0]}", owner.view(weight.shape).to(weight.device),
                                 persistent=False)  # (out, in): expert of each entry, rebuilt from the seed
        self.register_buffer("down_init", None)
        if spec.split == "all":
            self.down_init = block.down.weight.detach().clone()  # W_0 of D; P_D starts at 0
            with torch.no_grad():
                block.down.weight.zero_()

    def owner(self, name: str) -> Tensor:
        """(out, in) expert index of every entry of split matrix ``name`` ("down.weight" or "up.weight")."""
        return self.get_buffer(f"owner_{name.split('.')[0]}")

    def expert_weights(self, choice: dict[str, int]) -> dict[str, Tensor]:
        """Split weights of the copy that uses expert ``choice[name]`` for each split matrix: W_0 + M_i * P."""
        block = self.adapter.block
        out = {}
        for name in self.split_names:
            masked = block.get_parameter(name) * (self.owner(name) == choice[name])
            out[name] = masked + self.down_init if name == "down.weight" else masked
        return out

    def merged_weights(self) -> dict[str, Tensor]:
        """Split weights of the merged adapter: the mean of the E copies, W_0 + P / E."""
        block = self.adapter.block
        out = {}
        for name in self.split_names:
            mean = block.get_parameter(name) / self.spec.experts
            out[name] = mean + self.down_init if name == "down.weight" else mean
        return out

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.training:
            choice = {n: int(torch.randint(self.spec.experts, (1,))) for n in self.split_names}
            weights = self.expert_weights(choice)
        else:
            weights = self.merged_weights()
        # the sequential adapter's own forward, with its split weights replaced (no second copy of that code)
        return functional_call(self.adapter, {f"block.{n}": w for n, w in weights.items()}, (x, base_out))


@torch.no_grad()
def merged_bottleneck(adapter: SparseMixture) -> tuple[SeqBottleneck, dict[str, Tensor]]:
    """(spec, state dict) of the plain ``seq_bn`` adapter equal to ``adapter`` merged: what is stored and served."""
    state = {k: v.clone() for k, v in adapter.adapter.state_dict().items()}
    for name, weight in adapter.merged_weights().items():
        state[f"block.{name}"] = weight.clone()
    return adapter.spec.dense_spec(), state


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """The paper's regulariser between two passes with independent expert draws (each side a stop-gradient target):

        1/2 [ KL(p_a || sg p_b) + KL(p_b || sg p_a) ],   p = softmax(logits), averaged over the batch
    """
    log_a, log_b = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)  # (B, classes)
    kl_ab = F.kl_div(log_b.detach(), log_a, log_target=True, reduction="batchmean")  # KL(p_a || sg p_b)
    kl_ba = F.kl_div(log_a.detach(), log_b, log_target=True, reduction="batchmean")  # KL(p_b || sg p_a)
    return 0.5 * (kl_ab + kl_ba)

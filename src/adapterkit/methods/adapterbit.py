"""AdapterBit: bottleneck adapters plus bias tuning (BitFit), as one spec (Hu et al. 2024, PSELDNets,
https://arxiv.org/abs/2411.06399; BitFit: Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199).

On each target f with bias b (a Linear / Conv1D, or a LayerNorm ending a post-norm sub-layer):

    f'(x) = f(x) + delta_b                                   the target's bias, tuned (BitFit)
    y     = f'(x) + s A(f'(x)),  A(h) = W_up GELU(W_down h)   the paper's adapter after the target (SpatialAdapter)
    on a post-norm target:  y = LN'(x + s A(LN'(x))),  LN' = LN with bias b + delta_b   (as seq_bn re-enters the norm)

Defaults are the paper's: s = 0.1, hidden = 0.5 d (reduction factor 2), GELU, W_up = 0 (identity at start).
Placement semantics: the biases tuned are those of the modules the adapter is attached to, since an adapter lives
on its target and nothing else (the paper trains every bias of the network; on BERT, target each sub-layer's end,
e.g. ``attention.output.dense`` and ``output.dense``, for its two adapter positions and their biases, and add
``BitFit`` on the other layers if every bias should train). Not mergeable: the bottleneck is non-linear (its bias
part alone would merge). The code is the existing ``SequentialAdapter`` and BitFit's ``BiasDelta``, composed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.methods.bitfit import BiasDelta, BitFit
from adapterkit.methods.bottleneck import SeqBottleneck, SequentialAdapter


@register("adapterbit")
@dataclass(frozen=True)
class AdapterBit(SeqBottleneck):
    """Spec of AdapterBit: the bottleneck fields with the paper's defaults; the target's bias trains too."""

    reduction_factor: float = 2.0  # hidden = 0.5 d
    activation: str = "gelu"
    scaling: float = 0.1

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind not in ("linear", "norm") or not isinstance(getattr(base, "bias", None), Tensor):
            raise TargetError(f"adapterbit cannot adapt {path} ({type(base).__name__}): needs a Linear, Conv1D or "
                              "LayerNorm with a bias")
        self._size(base, path, 1)

    def build(self, base: nn.Module) -> nn.Module:
        return AdapterWithBias(self, base)


class AdapterWithBias(nn.Module):
    """A sequential bottleneck after the target, fed and followed by the target's tuned bias."""

    site = Site.OUTPUT

    def __init__(self, spec: AdapterBit, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.bias = BiasDelta(BitFit(), base)
        self.adapter = SequentialAdapter(spec, base)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        assert base_out is not None  # an OUTPUT adapter always sees the base output
        shifted = base_out + self.bias(x, base_out)  # f'(x) = f(x) + delta_b
        out = self.adapter(x, shifted)
        # the post-norm path re-runs the norm with its frozen bias: add delta_b to that output as well
        return out + self.bias(x, out) if self.adapter._norm is not None else out

"""Convolutional bottleneck adapters for CNNs (Conv-Adapter, Chen et al. 2022, https://arxiv.org/abs/2208.07463;
the bottleneck of Houlsby et al. 2019, https://arxiv.org/abs/1902.00751, on feature maps).

On a feature map h: (B, C, H, W), with 1x1 convolutions (a per-pixel Linear over channels):

    A(h) = Up(act(Down(h))),        Down: C -> C/rf (1x1, bias),   Up: C/rf -> C_out (1x1, bias, zero at init)

    sequential ("seq_conv_bottleneck"):  y = f(x) + s A(f(x))   on the output of a conv, a BatchNorm2d (the BN after
                                                                 a conv) or a block; same size in and out
    parallel ("par_conv_bottleneck"):    y = f(x) + s A(x)      beside a module, reading its input: C_in -> C_out;
                                                                 beside a Conv2d, Down takes the conv's kernel, stride,
                                                                 padding and dilation (groups 1) so A(x) lines up with
                                                                 f(x) (a 1x1 conv: Down is 1x1), as LoRA's A does

Conv-Adapter's own Down is a depthwise k x k convolution and its scale a learned per-channel vector; here Down is
1x1 (kxk only where a parallel adapter must match a spatial conv) and s a fixed number, the Houlsby / He et al.
bottleneck on feature maps. Init "zero_up" (Up = 0) starts as the base model; "normal" (N(0, 0.02) on both, biases
zero) does not. The parallel form beside a module other than a Conv2d (a BatchNorm2d, a stride-1 block) keeps the
spatial size: a block holding a strided convolution is refused (target the convolution itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.layers import tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec
from adapterkit.methods.bottleneck import ACTIVATIONS, OnOutput, check_bottleneck_fields

INITS = ("zero_up", "normal")


def channels(base: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a Conv2d, a BatchNorm2d, or a block (its first and last Conv2d); 0 if none."""
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.BatchNorm2d):
        return base.num_features, base.num_features
    convs = [m for path, m in base.named_modules() if isinstance(m, nn.Conv2d) and HOST_ATTR not in path.split(".")]
    return (convs[0].in_channels, convs[-1].out_channels) if convs else (0, 0)  # adapters' own convs skipped


@dataclass(frozen=True)
class _ConvBottleneckSpec(AdapterSpec):
    reduction_factor: float = 16.0  # hidden channels = channels / reduction_factor
    hidden: int | None = None  # explicit hidden channels; overrides reduction_factor
    activation: str = "relu"  # one of bottleneck.ACTIVATIONS
    init: str = "zero_up"  # "zero_up" (identity at start) or "normal"
    scaling: float = 1.0  # s, the output scale

    def __post_init__(self) -> None:
        check_bottleneck_fields(self, INITS)

    @property
    def starts_as_identity(self) -> bool:
        """Only the zero_up init leaves the model unchanged at attach time."""
        return self.init == "zero_up"

    def hidden_for(self, size: int) -> int:
        return self.hidden or max(1, round(size / self.reduction_factor))

    def _check_size(self, base: nn.Module, path: str, which: int) -> None:
        """``which``: 0 checks the input channels (Down's input, parallel), 1 the output (sequential)."""
        size = channels(base)[which]
        if size <= 0:
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Conv2d, a "
                              "BatchNorm2d or a block of Conv2d layers (feature maps (B, C, H, W))")
        hidden = self.hidden_for(size)
        if hidden > size:
            raise TargetError(f"{self.method}: hidden size {hidden} exceeds the {size} channels of {path}")


class ConvBottleneck(nn.Module):
    """Down (C_in -> hidden; 1x1 unless a geometry is given) / activation / Up (hidden -> C_out, 1x1)."""

    def __init__(self, spec: _ConvBottleneckSpec, size_in: int, size_out: int, like: Tensor,
                 geometry: nn.Conv2d | None = None) -> None:
        super().__init__()
        hidden = spec.hidden_for(size_in)
        dtype = master_dtype(like)
        kh, kw = geometry.kernel_size if geometry is not None else (1, 1)
        self.stride, self.padding, self.dilation = ((geometry.stride, geometry.padding, geometry.dilation)
                                                    if geometry is not None else ((1, 1), (0, 0), (1, 1)))
        self.down = nn.Conv2d(size_in, hidden, (kh, kw), dtype=dtype, device=like.device)
        self.act = ACTIVATIONS[spec.activation]()
        self.up = nn.Conv2d(hidden, size_out, 1, dtype=dtype, device=like.device)
        with torch.no_grad():
            tensor(self.down, "bias").zero_()
            tensor(self.up, "bias").zero_()
            if spec.init == "normal":
                self.down.weight.normal_(0.0, 0.02)
                self.up.weight.normal_(0.0, 0.02)
            else:
                self.up.weight.zero_()

    def forward(self, h: Tensor) -> Tensor:
        down = F.conv2d(h, as_compute(self.down.weight, h), as_compute(tensor(self.down, "bias"), h),  # type: ignore[call-overload]
                        self.stride, self.padding, self.dilation)  # (B, hidden, H', W')
        up = as_compute(self.up.weight, h), as_compute(tensor(self.up, "bias"), h)
        return F.conv2d(self.act(down), *up)  # (B, C_out, H', W')


def _like(base: nn.Module) -> Tensor:
    found = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
    return found if found is not None else torch.empty(0)


@register("seq_conv_bottleneck")
@dataclass(frozen=True)
class SeqConvBottleneck(_ConvBottleneckSpec):
    """Sequential bottleneck on a feature map: y = f(x) + s A(f(x))."""

    def check_target(self, base: nn.Module, path: str) -> None:
        self._check_size(base, path, 1)

    def build(self, base: nn.Module) -> nn.Module:
        return SequentialConvAdapter(self, base)


class SequentialConvAdapter(OnOutput):
    """y = f(x) + s A(f(x)) on the module's (B, C, H, W) output (no norm re-entry: BatchNorm2d is no LayerNorm)."""

    def __init__(self, spec: SeqConvBottleneck, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        size = channels(base)[1]
        self.block = ConvBottleneck(spec, size, size, _like(base))
        self._on(base)

    def change(self, h: Tensor) -> Tensor:
        return self.block(h) * self.spec.scaling


@register("par_conv_bottleneck")
@dataclass(frozen=True)
class ParConvBottleneck(_ConvBottleneckSpec):
    """Parallel bottleneck beside a module, reading its input: y = f(x) + s A(x)."""

    def check_target(self, base: nn.Module, path: str) -> None:
        self._check_size(base, path, 0)
        if not isinstance(base, nn.Conv2d):
            strided = next((name for name, m in base.named_modules()
                            if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)), None)
            if strided is not None:
                raise TargetError(f"{self.method}: {path} changes the spatial size (strided conv {strided}); "
                                  "target the convolution itself")

    def build(self, base: nn.Module) -> nn.Module:
        return ParallelConvAdapter(self, base)


class ParallelConvAdapter(nn.Module):
    """Delta s A(x) added to the module's output."""

    site = Site.PARALLEL

    def __init__(self, spec: ParConvBottleneck, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        size_in, size_out = channels(base)
        geometry = base if isinstance(base, nn.Conv2d) else None
        self.block = ConvBottleneck(spec, size_in, size_out, _like(base), geometry)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        return self.block(x) * self.spec.scaling

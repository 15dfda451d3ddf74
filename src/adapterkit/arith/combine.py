"""Combine attached adapters into a new LoRA adapter, each combination type defined as peft 0.21.2's
``LoraModel.add_weighted_adapter`` defines it, so the same sources, weights, density and seed give the same result."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adapterkit.arith.factors import attach_factors
from adapterkit.core.errors import NameInUseError, SpecError
from adapterkit.core.host import Host
from adapterkit.core.layers import is_conv1d, layer_info, read_weight
from adapterkit.core.protocol import Mergeable
from adapterkit.core.tree import hosts, names_in
from adapterkit.methods.lora import LoRALinear
from adapterkit.ops import merge_math
from adapterkit.ops.lowrank import truncated_svd

FACTOR_HOWS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # mix LoRA factors, equal ranks
SVD_HOWS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # mix deltas, re-compress
HOWS = ("cat", *FACTOR_HOWS, *SVD_HOWS)
_DENSITY_HOWS = tuple(h for h in HOWS if h.split("_")[0] in ("ties", "dare", "magnitude"))

# (path, base module, host, [(source index, adapter)]) for each module at least one source adapts
_Site = tuple[str, nn.Module, Host, list[tuple[int, nn.Module]]]


def combine(model: nn.Module, sources: Sequence[str], weights: Sequence[float], how: str, name: str,
            density: float | None = None, majority_sign_method: str = "total", rank: int | None = None,
            seed: int = 0) -> list[str]:
    """Attach a new LoRA adapter ``name`` combining the attached adapters ``sources`` with ``weights``.

    With s_k each source's own scale (alpha / r, rsLoRA alpha / sqrt r) and w_k its weight:

    * ``cat``: A = concat_k(w_k s_k A_k), B = concat_k(B_k); the delta is exactly sum_k w_k s_k B_k A_k, at the
      sum of the sources' ranks.
    * ``linear`` (and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): peft's factor-level mix, for
      sources of one rank r: A = mix_k(sign_k sqrt|w_k s_k| A_k), B = mix_k(sqrt|w_k s_k| B_k), rank r. For
      ``linear`` the delta B A = sum_{j,k} sqrt|w_j s_j| sign_k sqrt|w_k s_k| B_j A_k is NOT the weighted delta sum:
      it has cross terms B_j A_k (j != k), and equals it only for one source. Use ``cat`` or ``svd`` for the sum.
    * ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the deltas are
      mixed (weighted sum, TIES, DARE, magnitude pruning) in float64, then compressed to the best rank-``rank``
      LoRA (truncated SVD). Any mergeable adapter works here by its delta, merge(W) - W (DoRA, IA3, ...).

    TIES elects signs on the pruned, unweighted tensors; DARE draws its keep-masks from a generator seeded with
    ``seed``, one mask per source and module in model order (A masks before B masks for the factor types), in the
    base layer's stored layout (GPT-2's Conv1D: (in, out)): exactly the draws peft makes from the global RNG after
    ``torch.manual_seed(seed)``. A negative weight subtracts that source (task arithmetic negation).

    The new adapter adapts the union of the sources' modules; a source absent at a module counts as zero there
    (it is left out of that module's mix, as peft does). One source is always ``linear``, as in peft. Each new LoRA
    has alpha = r, so its delta is exactly the product of its factors (peft copies the first source's rsLoRA flag
    onto the combined adapter, which then scales its product by sqrt(r); adapterkit does not).

    Args:
        model: The model the sources are attached to.
        sources: Names of attached adapters.
        weights: One weight per source.
        how: One of ``HOWS``.
        name: Name of the new adapter (not in use).
        density: Fraction kept by pruning, in (0, 1]; required by the ties / dare / magnitude_prune types.
        majority_sign_method: "total" (sign of the sum) or "frequency" (sign of the sign count), for TIES.
        rank: Rank of the result; required by the svd types, capped at min(out, in) per module.
        seed: Seed of the DARE keep-masks.

    Returns:
        The module paths of the new adapter.

    Raises:
        SpecError: bad arguments, unequal ranks for a factor type, or a source that is not a LoRA (factor types),
            not mergeable (svd types) or on a layer that is not Linear / Conv1D.
        NameInUseError: a source that is not attached, or ``name`` already in use.
    """
    sources, weights = list(sources), [float(w) for w in weights]
    _check_args(sources, weights, how, density, majority_sign_method, rank)
    held = hosts(model)
    attached = names_in(held)
    missing = [s for s in sources if s not in attached]
    if missing:
        raise NameInUseError(f"combine: no adapter named {missing[0]!r} on this model (attached: {attached})")
    if name in attached:
        raise NameInUseError(f"combine: adapter name {name!r} is already attached; detach it first or pick another")
    sites: list[_Site] = []
    for path, module, host in held:
        present = [(k, host.adapter(s)) for k, s in enumerate(sources) if s in host.names()]
        if present:
            if layer_info(module).kind != "linear":
                raise SpecError(f"combine: {path} is a {type(module).__name__}; combining handles Linear / Conv1D "
                                "layers only")
            sites.append((path, module, host, present))
    all_lora = all(isinstance(a, LoRALinear) for *_, present in sites for _, a in present)
    if len(sources) == 1 and all_lora:
        how = "linear"  # as peft: a single source is a weighted copy whatever the type
    generator = torch.Generator().manual_seed(seed)
    keep = 1.0 if density is None else density
    if how in SVD_HOWS:
        assert rank is not None  # checked by _check_args
        factors = {path: _delta_mix(how, path, module, host, present, sources, weights, keep,
                                    majority_sign_method, rank, generator)
                   for path, module, host, present in sites}
    else:
        _check_lora(how, sites, sources)
        factors = {path: _factor_mix(how, present, weights, keep, majority_sign_method, generator)
                   for path, _, _, present in sites}
    return attach_factors(model, name, factors)


def _check_args(sources: list[str], weights: list[float], how: str, density: float | None, method: str,
                rank: int | None) -> None:
    if how not in HOWS:
        raise SpecError(f"combine: unknown combination type {how!r}; expected one of {HOWS}")
    if not sources:
        raise SpecError("combine: give at least one source adapter")
    if len(weights) != len(sources):
        raise SpecError(f"combine: {len(sources)} sources need {len(sources)} weights, got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise SpecError(f"combine: weights must be finite numbers, got {weights}")
    if density is not None and not 0 < density <= 1:
        raise SpecError(f"combine: density must be in (0, 1], got {density}")
    if density is None and how in _DENSITY_HOWS:
        raise SpecError(f"combine: {how!r} prunes: give density in (0, 1]")
    if method not in merge_math.SIGN_METHODS:
        raise SpecError(f"combine: majority_sign_method must be one of {merge_math.SIGN_METHODS}, got {method!r}")
    if how in SVD_HOWS and rank is None:
        raise SpecError(f"combine: {how!r} compresses the mixed delta: give rank (a positive integer)")
    if rank is not None and (how not in SVD_HOWS or not isinstance(rank, int) or rank < 1):
        raise SpecError(f"combine: rank must be a positive integer and applies to {SVD_HOWS} only, got {rank!r} "
                        f"for {how!r}")


def _check_lora(how: str, sites: list[_Site], sources: list[str]) -> None:
    """Factor types mix LoRA factors: every source a LoRA, and (all but cat) all of one rank, as peft."""
    ranks: set[int] = set()
    for path, _, _, present in sites:
        for k, adapter in present:
            if not isinstance(adapter, LoRALinear):
                raise SpecError(f"combine({how!r}): source {sources[k]!r} at {path} is {type(adapter).__name__}, not "
                                f"a LoRA; its factors cannot be mixed: use an svd type {SVD_HOWS}")
            ranks.add(int(adapter.lora_a.shape[0]))
    if how != "cat" and len(ranks) > 1:
        raise SpecError(f"combine({how!r}): sources have ranks {sorted(ranks)}; {how} needs one rank: use cat or an "
                        "svd type for different ranks")


def _factor_mix(how: str, present: list[tuple[int, nn.Module]], weights: list[float], density: float,
                method: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, A) of one module from its LoRA sources' factors."""
    loras = [(weights[k], a) for k, a in present if isinstance(a, LoRALinear)]
    a_in = [lora.lora_a.detach().double() for _, lora in loras]
    b_in = [lora.lora_b.detach().double() for _, lora in loras]
    scaled = [w * lora.scale for w, lora in loras]
    if how == "cat":
        return torch.cat(b_in, dim=1), torch.cat([a * s for a, s in zip(a_in, scaled, strict=True)])
    # the sign goes on A only: on both sides it would cancel in B A
    a_w = [math.sqrt(abs(s)) if s >= 0 else -math.sqrt(abs(s)) for s in scaled]
    b_w = [math.sqrt(abs(s)) for s in scaled]
    mixed = []
    for tensors, ws in ((a_in, a_w), (b_in, b_w)):  # peft's order: every A mask is drawn before any B mask
        masks = _masks(how, tensors, density, generator, transposed=False)
        mixed.append(merge_math.mix(how, tensors, ws, density, masks, method))
    return mixed[1], mixed[0]


def _masks(how: str, tensors: list[Tensor], density: float, generator: torch.Generator,
           transposed: bool) -> list[Tensor | None] | None:
    """DARE's keep-masks in the stored layout (``transposed``: drawn (in, out), returned (out, in))."""
    if not how.startswith("dare") or density >= 1:
        return None  # peft draws nothing at density 1
    masks: list[Tensor | None] = []
    for t in tensors:
        shape = t.shape[::-1] if transposed else t.shape
        mask = merge_math.random_mask(shape, density, generator, t.device)
        masks.append(mask.t() if transposed else mask)
    return masks


def _delta_mix(how: str, path: str, module: nn.Module, host: Host, present: list[tuple[int, nn.Module]],
               sources: list[str], weights: list[float], density: float, method: str, rank: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, A) of one module: its sources' float64 deltas mixed, then truncated to ``rank``."""
    if how == "svd":  # a weighted sum needs one delta at a time, not all of them at once (16x less memory at 16)
        total: Tensor | None = None
        for k, adapter in present:
            delta = _delta(how, path, module, host, sources[k], adapter).mul_(weights[k])
            total = delta if total is None else total.add_(delta)
        assert total is not None  # every site has a source
        b, a, _ = truncated_svd(total, rank)
        return b, a
    deltas = [_delta(how, path, module, host, sources[k], a) for k, a in present]
    base_how = how.removesuffix("_svd")
    masks = _masks(base_how, deltas, density, generator, transposed=is_conv1d(module))
    mixed = merge_math.mix(base_how, deltas, [weights[k] for k, _ in present], density, masks, method)
    b, a, _ = truncated_svd(mixed, rank)
    return b, a


def _delta(how: str, path: str, module: nn.Module, host: Host, source: str, adapter: nn.Module) -> Tensor:
    """A source's weight delta at one module, canonical (out, in) layout, float64."""
    if isinstance(adapter, LoRALinear):  # exact from the factors, whatever the base weight holds
        return (adapter.lora_b.detach().double() @ adapter.lora_a.detach().double()) * adapter.scale
    if not isinstance(adapter, Mergeable):
        raise SpecError(f"combine({how!r}): source {source!r} ({type(adapter).__name__} at {path}) cannot be "
                        "merged, so it has no weight delta")
    if host.merged:  # a delta read through merge needs the bare base weight (DoRA's depends on it)
        raise SpecError(f"combine({how!r}): {path} has {host.merged} merged into its weight; unmerge first")
    weight, bias = read_weight(module)
    w64, b64 = weight.double(), None if bias is None else bias.double()
    with torch.no_grad():
        new_w, new_b = adapter.merge(w64, b64)
    if new_b is not None and (b64 is None or not torch.equal(new_b, b64)):
        raise SpecError(f"combine({how!r}): source {source!r} changes {path}'s bias when merged; a LoRA cannot "
                        "hold a bias change")
    return new_w.double() - w64

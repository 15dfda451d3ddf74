"""The Adapter contract: the only thing the host, the interpreter and the engines call.

An adapter is an ``nn.Module`` with a ``site`` and ``forward(x, base_out)``:

* ``Site.PARALLEL`` -- returns a delta added to the base module's output (low-rank updates, parallel adapters,
  bias offsets).
* ``Site.OUTPUT``   -- returns the new output, computed from the base output (sequential adapters, output
  scaling, weight re-normalisation).
* ``Site.INPUT``    -- returns the new input the base module sees (input scaling).

Mergeable adapters also implement ``merge(weight, bias)`` and ``unmerge(weight, bias)``: pure functions from the
base layer's (weight, bias) in (out, in, ...) layout to the merged ones and back. DESIGN.md sketched a single
``delta_weight()``; that cannot express a re-normalised weight (W' = m * V / ||V||) or a scaling that also
scales the bias exactly,
so the contract is the pair of maps, and ``delta_weight()`` stays an optional extra for low-rank methods.

Adapters whose stored form is not their ``state_dict`` (k-bit codes, binary masks, the surviving rows of a
pruned layer) also implement ``packed_state()`` and ``load_packed(state)`` (the ``Packed`` protocol): save writes
``packed_state()`` instead of the state dict, and load hands the stored tensors to ``load_packed``, which
rebuilds the float tensors so that the loaded adapter computes exactly what the saved one did, and raises
ValueError (one line, naming the tensor) for anything missing, mis-shaped or corrupted.

PARALLEL adapters may implement ``add_into(x, out) -> out``: ``out + forward(x, out)`` written into ``out`` itself
(the ``AddsInto`` protocol). The plain path calls it where the base output may be overwritten (Linear, Conv,
Embedding outputs, which autograd does not keep): a low-rank delta then goes straight into the output by one
accumulating matmul, with no delta-sized tensor allocated, written and read back.

``Site.CALL`` adapters act on the whole call of their base module, for methods that change what the module is called
with rather than one tensor (the ``WrapsCall`` protocol): ``before(module, args, kwargs)`` returns the new
``(args, kwargs)`` (prompt tuning prepends learned embeddings and widens the attention mask and labels; prefix
tuning hands the model a KV cache holding learned keys and values), and ``after(module, args, kwargs, output)``
returns the new output (strips the virtual positions from the logits; adds a gated prompt attention to an attention
block's output). They run on their own adapters only: a Select or a composition block refuses them.

OUTPUT adapters whose output is ``finish(stream + delta)`` (a sequential adapter that re-enters a post-norm) may
implement ``parts(x, base_out) -> (stream, delta, finish)``: combiners that mix adapter outputs before the residual
and the norm (AdapterFusion, ScaLearn) read it through ``Branch.parts``; without it a branch splits as
``(base_out, change, identity)``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


class Site(enum.Enum):
    """Where an adapter acts on its base module."""

    PARALLEL = "parallel"
    OUTPUT = "output"
    INPUT = "input"
    CALL = "call"


@runtime_checkable
class Adapter(Protocol):
    """Every method's module meets this."""

    site: Site

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        """Delta (PARALLEL), new output (OUTPUT) or new input (INPUT; base_out is None)."""
        ...


@runtime_checkable
class AddsInto(Protocol):
    """PARALLEL adapters that can add their delta into the base output in place."""

    def add_into(self, x: Tensor, out: Tensor) -> Tensor:
        """``out + delta``, computed into ``out`` (returned)."""
        ...


@runtime_checkable
class WrapsCall(Protocol):
    """CALL adapters: rewrite the base module's call and then its output."""

    def before(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The (args, kwargs) the base module runs with."""
        ...

    def after(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        """The output the caller sees (``args`` / ``kwargs`` are the rewritten ones)."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    """Adapters that can be folded into the base weights exactly."""

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Base (weight, bias) -> merged (weight, bias)."""
        ...

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Merged (weight, bias) -> base (weight, bias)."""
        ...


@runtime_checkable
class Combiner(Protocol):
    """The learned part of a block (Fuse, Scale, Gate, Route, TaskRoute), attached like an adapter.

    Its spec's ``role`` names the block kind it serves. ``combine`` gets the base module's input and output, one
    ``Branch`` per child of the block (call ``branch(x, out)`` for that child's output, ``branch.change(x, out)``
    for its change, read ``branch.adapter`` for its parameters) and the ``Call`` (task ids, reporting of weights
    and auxiliary losses, per-call scratch state). It returns the new output. Optional: ``branches`` (the number
    of children it was built for, checked when the block is used) and ``session(model, plan)``, a context manager
    entered once per ``use`` block for model-level work such as a scoring pass.
    """

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        """The output of this module with the block's children combined."""
        ...


@runtime_checkable
class Resizable(Protocol):
    """Adapters whose tensor sizes depend on training, not on the spec (a sparse diff keeps K entries chosen by
    training). Loading calls ``resize`` with the saved tensors before copying them in."""

    def resize(self, state: Mapping[str, Tensor]) -> None:
        """Re-allocate to the saved tensors' shapes; raise ValueError (one line) if they are inconsistent."""
        ...


@runtime_checkable
class Packed(Protocol):
    """Adapters that store a compact form (bit-packed codes, kept rows) instead of their state dict."""

    def packed_state(self) -> dict[str, Tensor]:
        """The tensors to store, keyed by name (packed ones built with ops/bitpack.py)."""
        ...

    def load_packed(self, state: dict[str, Tensor]) -> None:
        """Rebuild the adapter from ``packed_state()``'s output; ValueError naming the tensor if it cannot."""
        ...

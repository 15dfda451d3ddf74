"""adapterkit: parameter-efficient, modular adaptation of pretrained PyTorch models.

    import adapterkit as ak
    ak.attach(model, "sst2", ak.LoRA(r=8, alpha=16), targets=["query", "value"])
    ak.train_only(model, "sst2", also=["classifier"])
    ak.save(model, "runs/sst2")                     # with the classifier trained beside it

The top level holds the verbs, the blocks, the errors and the most used method specs. Every method is in
``ak.methods`` (``ak.methods.LowBit``, ``ak.methods.available()``), every combiner of a ``Mix`` block in
``ak.compose`` (``ak.compose.Fusion``); Poly / MHR helpers are in ``adapterkit.train.poly_tools``.
"""

import importlib as _importlib
import warnings as _warnings
from typing import Any as _Any

from adapterkit import compose, methods  # the namespaces; importing them registers every combiner and method
from adapterkit.api import activate, adapters, use
from adapterkit.arith.combine import combine
from adapterkit.arith.convert import to_lora
from adapterkit.core.blocks import Average, Mix, Parallel, Select, Stack, block_from_dict
from adapterkit.core.context import Routing
from adapterkit.core.errors import (
    AdapterKitError,
    NameInUseError,
    SpecError,
    StateError,
    TargetError,
    UnknownMethodError,
)
from adapterkit.core.registry import spec_from_dict
from adapterkit.inject.engine import attach, detach, train_only
from adapterkit.inject.quantize import quantize_base
from adapterkit.inject.record import read
from adapterkit.inject.select import explain
from adapterkit.inject.state import load, save
from adapterkit.merge.merging import is_merged, merge, unmerge
from adapterkit.methods.bitfit import BitFit
from adapterkit.methods.bottleneck import ParBottleneck, SeqBottleneck
from adapterkit.methods.dora import DoRA
from adapterkit.methods.ia3 import IA3
from adapterkit.methods.lora import LoRA

__version__ = "0.1.0"

__all__ = [
    # verbs
    "activate", "adapters", "attach", "detach", "explain", "is_merged", "load", "merge", "quantize_base", "read",
    "save", "train_only", "unmerge", "use", "block_from_dict", "spec_from_dict",
    # adapter arithmetic (arith/: a new LoRA from several adapters, or from any mergeable one)
    "combine", "to_lora",
    # composition blocks and what learned blocks report
    "Average", "Mix", "Parallel", "Select", "Stack", "Routing",
    # errors
    "AdapterKitError", "NameInUseError", "SpecError", "StateError", "TargetError", "UnknownMethodError",
    # the most used methods (all of them: ak.methods), and the namespaces
    "BitFit", "DoRA", "IA3", "LoRA", "ParBottleneck", "SeqBottleneck", "compose", "methods",
]

# Names of the first release, kept working for one more with a DeprecationWarning: name -> (module, attribute,
# what to write instead).
_MOVED: dict[str, tuple[str, str, str]] = {
    **{old: ("adapterkit.core.blocks", old, "ak.Mix(..., name=...) (the combiner decides what is learned)")
       for old in ("Fuse", "Scale", "Gate", "Route", "TaskRoute")},
    **{old: ("adapterkit.compose", old, f"ak.compose.{old}") for old in ("Fusion", "ScaLearn", "MixDA", "XLoRA",
                                                                          "MoLE", "Poly")},
    **{old: ("adapterkit.methods", old, f"ak.methods.{old}") for old in ("AdapterBit", "LTSFT", "MoSA", "LowBit",
                                                                          "MaskTuning", "SPLoRA")},
    **{old: ("adapterkit.train.poly_tools", old, f"adapterkit.train.poly_tools.{old}")
       for old in ("attach_poly", "mhr_mu", "mhr_z", "task_routing")},
    "combiners": ("adapterkit.core.registry", "combiners", "ak.compose.available()"),
    "spec_class": ("adapterkit.core.registry", "spec_class", "adapterkit.core.registry.spec_class"),
}


def __getattr__(name: str) -> _Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")
    module, attribute, instead = _MOVED[name]
    _warnings.warn(f"ak.{name} is deprecated and goes in the next release; use {instead}", DeprecationWarning,
                   stacklevel=2)
    return getattr(_importlib.import_module(module), attribute)

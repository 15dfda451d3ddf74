"""adapterkit: parameter-efficient, modular adaptation of pretrained PyTorch models.

    import adapterkit as ak
    ak.attach(model, "sst2", ak.LoRA(r=8, alpha=16), targets=["query", "value"])
    ak.train_only(model, "sst2", also=["classifier"])
    ak.save(model, "runs/sst2", modules=("classifier",))
"""

from adapterkit import compose as _compose  # noqa: F401  (registers every combiner)
from adapterkit import methods as _methods  # noqa: F401  (registers every method)
from adapterkit.api import activate, adapters, use
from adapterkit.compose.fusion import Fusion
from adapterkit.compose.mixda import MixDA
from adapterkit.compose.mole import MoLE
from adapterkit.compose.poly import Poly
from adapterkit.compose.scalearn import ScaLearn
from adapterkit.compose.xlora import XLoRA
from adapterkit.core.blocks import (
    Average,
    Fuse,
    Gate,
    Parallel,
    Route,
    Scale,
    Select,
    Stack,
    TaskRoute,
    block_from_dict,
)
from adapterkit.core.context import Routing
from adapterkit.core.errors import (
    AdapterKitError,
    NameInUseError,
    SpecError,
    StateError,
    TargetError,
    UnknownMethodError,
)
from adapterkit.core.registry import combiners, methods, spec_class, spec_from_dict
from adapterkit.inject.engine import attach, detach, train_only
from adapterkit.inject.quantize import quantize_base
from adapterkit.inject.record import read
from adapterkit.inject.select import explain
from adapterkit.inject.state import load, save
from adapterkit.merge.merging import is_merged, merge, unmerge
from adapterkit.methods.adapterbit import AdapterBit
from adapterkit.methods.bitfit import BitFit
from adapterkit.methods.bottleneck import ParBottleneck, SeqBottleneck
from adapterkit.methods.dora import DoRA
from adapterkit.methods.ia3 import IA3
from adapterkit.methods.lora import LoRA
from adapterkit.methods.lowbit import LowBit
from adapterkit.methods.lt_sft import LTSFT
from adapterkit.methods.mask_tuning import MaskTuning
from adapterkit.methods.mosa import MoSA
from adapterkit.methods.splora import SPLoRA
from adapterkit.train.poly_tools import attach_poly, mhr_mu, mhr_z, task_routing

__version__ = "0.1.0"

__all__ = [
    "AdapterKitError", "Average", "BitFit", "DoRA", "Fuse", "Gate", "IA3", "LoRA", "NameInUseError", "ParBottleneck",
    "Parallel", "Route", "Routing", "Scale", "SeqBottleneck", "Select", "SpecError", "Stack", "StateError",
    "TargetError", "TaskRoute", "UnknownMethodError", "activate", "adapters", "attach", "block_from_dict",
    "combiners", "detach", "explain", "is_merged", "load", "merge", "methods", "read", "save", "spec_class",
    "spec_from_dict", "train_only", "unmerge", "use",
    "AdapterBit", "LTSFT", "MoSA",
    "LowBit", "MaskTuning", "SPLoRA",
    # Poly / MHR (compose/poly.py, train/poly_tools.py)
    "Poly", "attach_poly", "mhr_mu", "mhr_z", "task_routing",
    "MoLE", "XLoRA",
    "Fusion", "MixDA", "ScaLearn",
    "quantize_base",  # QLoRA: a 4-bit base (inject/quantize.py; bitsandbytes imported on first use)
]

"""Test-time adaptation on an unlabeled stream of domains: an online loop (each batch: the method adapts and
predicts), reset modes, per-domain accuracy from labels held apart, resumable state; the methods ``Source`` (no
adaptation, or BN adaptation), ``Tent``, ``ViDA`` and ``Hebbian`` (NHL).

    from adapterkit.train import tta
    stream, labels = tta.TestStream.from_labelled([("noise-5", noisy), ("blur-5", blurred)], batch_size=64,
                                                  rounds=3)
    method = tta.ViDA(targets=POINTWISE)                       # two adapters on the pointwise convolutions
    result = tta.run_tta(method, model, stream, labels, reset="never", out="runs/vida")   # resume=True continues
    result.accuracy()                                          # domain -> accuracy per round
"""

from adapterkit.train.tta.hebbian import Hebbian
from adapterkit.train.tta.loop import RESETS, TTAResult, run_tta
from adapterkit.train.tta.method import Source, TTAMethod
from adapterkit.train.tta.stream import Domain, TestStream
from adapterkit.train.tta.tent import Tent
from adapterkit.train.tta.vida import ViDA

METHODS = {"source": Source, "tent": Tent, "vida": ViDA, "nhl": Hebbian}

__all__ = ["METHODS", "RESETS", "Domain", "Hebbian", "Source", "TTAMethod", "TTAResult", "Tent", "TestStream", "ViDA",
           "run_tta"]

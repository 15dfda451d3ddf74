"""Conformance cases for SNNK adapter layers: the paper's Houlsby placement on BERT (both output denses), a
post-norm target with a kernel layer of its own width, and the exp feature map on a pre-norm block."""

from adapterkit.methods.snnk import SNNK

CASES = {
    "snnk": [("bert", SNNK(features=8), ["output.dense"]),
             ("bert", SNNK(features=16, hidden=8, leak=0.1, seed=2), ["output.LayerNorm"]),
             ("llama", SNNK(features=8, feature_map="exp"), ["mlp"])],
}

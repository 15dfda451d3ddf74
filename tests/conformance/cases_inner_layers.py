"""Conformance cases of inner adaptor layers (IAA): a gated trainable copy after chosen decoder layers."""

from adapterkit.methods.inner_layers import InnerLayers

CASES = {"inner_layers": [("llama", InnerLayers(), [r"re:model\.layers\.(0|1)"]),
                          ("gpt2", InnerLayers(), [r"re:transformer\.h\.1"]),
                          ("bert", InnerLayers(), [r"re:bert\.encoder\.layer\.0"])]}

"""Conformance cases for the convolutional bottleneck adapters, on the tiny CNN (tests/tiny_cnn.py). Sequential: on a
1x1 conv's output, on the BatchNorm after the strided conv, and on a whole inverted-residual block; parallel: beside
a 1x1 conv and a strided 3x3 conv (Down takes the conv's geometry), beside the depthwise conv and the 3-channel stem
with the non-identity "normal" init, and beside a BatchNorm2d."""

from adapterkit.methods.conv_bottleneck import ParConvBottleneck, SeqConvBottleneck

CASES = {
    "seq_conv_bottleneck": [("cnn", SeqConvBottleneck(reduction_factor=4), ["block.project", "bn1"]),
                            ("cnn", SeqConvBottleneck(hidden=2, activation="gelu", scaling=0.5), ["block"])],
    "par_conv_bottleneck": [("cnn", ParConvBottleneck(reduction_factor=4), ["block.expand", "down"]),
                            ("cnn", ParConvBottleneck(hidden=2, init="normal"), ["block.depthwise", "stem"]),
                            ("cnn", ParConvBottleneck(hidden=4, activation="silu"), ["bn0"])],
}

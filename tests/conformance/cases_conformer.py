"""Conformance cases for the conformer-convolution adapters. The contract runs tokens() of length 8 and the store
suite (tests/serve/test_store_methods.py) of length 6, so every kernel is <= 6; decoders (gpt2, llama) use
padding="causal". Sequential: BERT's attention output dense (PETL-AST's sequential MHSA), a post-norm LayerNorm (the
adapter re-enters the norm) and Llama's attention and MLP; parallel: BERT beside the attention core and the FFN's
first half (d_out = 4d), GPT-2's MLP with the repository's own init (not identity at start), Llama beside the
attention with a per-token LayerNorm and an even causal kernel."""

from adapterkit.methods.conformer import ParConformer, SeqConformer

CASES = {
    "seq_conformer": [("bert", SeqConformer(reduction_factor=4, kernel_size=3), ["attention.output.dense"]),
                      ("bert", SeqConformer(hidden=4, kernel_size=5, norm="layer"), ["output.LayerNorm"]),
                      ("llama", SeqConformer(hidden=4, kernel_size=3, padding="causal"), ["self_attn", "mlp"])],
    "par_conformer": [("bert", ParConformer(reduction_factor=8, kernel_size=5), ["attention.self", "intermediate"]),
                      ("gpt2", ParConformer(hidden=4, kernel_size=5, padding="causal", init="petl_ast"), ["mlp"]),
                      ("llama", ParConformer(hidden=2, kernel_size=6, padding="causal", norm="layer"),
                       ["self_attn"])],
}

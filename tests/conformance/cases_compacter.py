"""Conformance cases of Compacter: both BERT placements (Compacter on the projections before the residual, Compacter++
on the FFN's post-norm, the rule shared), per-layer rules with full B_i on Llama's MLP, GPT-2's MLP with dropout."""

from adapterkit.methods.compacter import Compacter

CASES = {"compacter": [("bert", Compacter(reduction_factor=4), ["output.dense"]),
                       ("bert", Compacter(reduction_factor=4, phm_dim=2, phm_rank=2),
                        [r"re:.*layer\.\d+\.output\.LayerNorm"]),
                       ("llama", Compacter(reduction_factor=4, phm_rank=None, rule="layer"), ["mlp"]),
                       ("gpt2", Compacter(reduction_factor=2, dropout=0.1, activation="relu"), ["mlp"])]}

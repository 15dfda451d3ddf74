"""Conformance cases of LoKr: factored and full w2, decompose_both (factored w1), a decompose_factor, Conv1D."""

from adapterkit.methods.lokr import LoKr

CASES = {"lokr": [("bert", LoKr(r=2), ["query", "value", "intermediate.dense"]),
                  ("llama", LoKr(r=1, decompose_both=True), ["q_proj", "up_proj"]),
                  ("llama", LoKr(r=8, decompose_factor=4), ["k_proj", "down_proj"]),
                  ("gpt2", LoKr(r=2), ["c_attn"])]}

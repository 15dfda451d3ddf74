"""Conformance cases of VeRA: layers of several widths (the shared projections are sliced), GPT-2's Conv1D."""

from adapterkit.methods.vera import VeRA

CASES = {"vera": [("bert", VeRA(r=8), ["query", "value", "intermediate.dense"]),
                  ("gpt2", VeRA(r=4, d_initial=0.5, seed=5), ["c_attn", "c_fc"]),
                  ("llama", VeRA(r=4, dropout=0.1), ["q_proj", "k_proj", "down_proj"])]}

"""Conformance cases of LoHa: Linear layers and GPT-2's Conv1D."""

from adapterkit.methods.loha import LoHa

CASES = {"loha": [("bert", LoHa(r=4), ["query", "value"]),
                  ("llama", LoHa(r=2, alpha=4.0), ["q_proj", "k_proj", "down_proj"]),
                  ("gpt2", LoHa(r=2), ["c_attn"])]}

"""Conformance cases of OFT: one block, r blocks, peft's Neumann series, GPT-2's Conv1D."""

from adapterkit.methods.oft import OFT

CASES = {"oft": [("bert", OFT(), ["query", "value"]),
                 ("llama", OFT(r=4, block_size=0), ["q_proj", "down_proj"]),
                 ("gpt2", OFT(block_size=8, cayley="neumann"), ["c_attn"])]}

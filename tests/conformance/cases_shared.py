"""Conformance cases of shared adapters: a sequential bottleneck re-entering each post-norm, LoRA (mergeable: every
placement merges the same delta) on BERT and on GPT-2's Conv1D, a parallel bottleneck beside Llama's MLPs."""

from adapterkit.methods.bottleneck import ParBottleneck, SeqBottleneck
from adapterkit.methods.lora import LoRA
from adapterkit.methods.shared import Shared

CASES = {"shared": [("bert", Shared(SeqBottleneck(reduction_factor=4)), ["output.LayerNorm"]),
                    ("bert", Shared(LoRA(r=4)), ["query", "value"]),
                    ("gpt2", Shared(LoRA(r=2)), ["c_attn"]),
                    ("llama", Shared(ParBottleneck(hidden=8)), ["mlp"])]}

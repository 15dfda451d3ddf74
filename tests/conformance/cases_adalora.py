"""Conformance cases of AdaLoRA: BERT's Linear layers, GPT-2's Conv1D, Llama's projections with dropout."""

from adapterkit.methods.adalora import AdaLoRA

CASES = {"adalora": [("bert", AdaLoRA(init_r=6, target_r=3), ["query", "value"]),
                     ("gpt2", AdaLoRA(init_r=4, target_r=2, total_step=100, tinit=10, tfinal=20), ["c_attn"]),
                     ("llama", AdaLoRA(init_r=4, target_r=1, alpha=16.0, dropout=0.1), ["q_proj", "down_proj"])]}

"""Conformance cases of Hyperformer. The contract's forwards pass no task ids, so every case has one task (n_tasks
= 1: a call without ids is task 0; several tasks without ids are an error, tests/methods/test_hyperformer.py):
two positions per BERT layer (attention and FFN output norms), the conditional norm with the code's init on Llama's
MLPs, a small hypernetwork on GPT-2."""

from adapterkit.methods.hyperformer import Hyperformer

CASES = {"hyperformer": [("bert", Hyperformer(reduction_factor=4, positions=2), ["output.LayerNorm"]),
                         ("llama", Hyperformer(hidden=8, norm="conditional", init="normal", activation="relu"),
                          ["mlp"]),
                         ("gpt2", Hyperformer(hidden=4, task_dim=8, hyper_hidden=16, projected_dim=4), ["mlp"])]}

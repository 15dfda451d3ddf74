"""Conformance cases for Hydra: a biased BERT dense pair (the bias goes through the sequential branch), GPT-2's
Conv1D and bias-free Llama projections."""

from adapterkit.methods.hydra import Hydra

CASES = {
    "hydra": [("bert", Hydra(r_par=2, r_seq=4), ["output.dense"]),
              ("gpt2", Hydra(r_par=2, r_seq=2, init="xavier"), ["c_attn", "c_proj"]),
              ("llama", Hydra(init="gaussian", scale=0.5), ["o_proj", "down_proj"])],
}

"""Conformance cases of the methods that rewrite the model's call (no targets: they place themselves)."""

from adapterkit.methods.p_tuning import PTuning
from adapterkit.methods.prefix_tuning import PrefixTuning
from adapterkit.methods.prompt_tuning import PromptTuning

CASES = {"prompt_tuning": [("bert", PromptTuning(n_tokens=3), None),
                           ("llama", PromptTuning(n_tokens=4, init="text", init_ids=(5, 6)), None)],
         "p_tuning": [("gpt2", PTuning(n_tokens=3), None), ("llama", PTuning(n_tokens=2, encoder="lstm"), None)],
         "prefix_tuning": [("bert", PrefixTuning(n_tokens=3), None),
                           ("llama", PrefixTuning(n_tokens=2, projection="mlp", hidden=8), None),
                           ("gpt2", PrefixTuning(n_tokens=4), None)]}

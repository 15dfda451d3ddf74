"""Conformance cases of adaption prompts (they place themselves on the top attention modules: no targets)."""

from adapterkit.methods.adaption_prompt import AdaptionPrompt

CASES = {"adaption_prompt": [
    ("llama", AdaptionPrompt(adapter_len=3, layers=1), None),
    ("llama", AdaptionPrompt(adapter_len=2, gate="scalar"), None),
    ("gpt2", AdaptionPrompt(adapter_len=2, layers=2, attention="attn", q_proj="c_attn", k_proj="c_attn",
                            v_proj="c_attn", o_proj="c_proj"), None),
]}

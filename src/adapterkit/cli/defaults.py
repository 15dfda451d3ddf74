"""Default targets per method for the command line, found by the module names a model actually has.

The library asks for explicit targets; the CLI picks a sensible placement so `adapterkit train` runs with
no arguments on BERT-, GPT-2- and Llama-style models.
"""

from __future__ import annotations

from torch import nn

from adapterkit.core.errors import TargetError

# For each method, candidate target lists tried in order; the first whose every entry matches is used.
CANDIDATES: dict[str, list[list[str]]] = {
    "lora": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]],
    "dora": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]],
    "ia3": [["key", "value"], ["k_proj", "v_proj"], ["c_attn"]],
    # Pfeiffer placement: after each FFN (the post-norm of a BERT layer, or the mlp block of a pre-norm model)
    "seq_bn": [[r"re:.*layer\.\d+\.output\.LayerNorm"], ["mlp"]],
    "par_bn": [["mlp"]],
    "lowbit": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]],  # its default base is LoRA
    "mask_tuning": [["query", "key", "value"], ["q_proj", "k_proj", "v_proj"], ["c_attn"]],  # R-AMT: attention
    "splora": [["intermediate.dense"], ["c_fc"], ["up_proj"]],  # FFN channels, the ones shrink() can remove
    "bitfit": [["query", "key", "value", "dense", "LayerNorm"], ["c_attn", "c_proj", "c_fc", "ln_1", "ln_2"]],
}


def default_targets(model: nn.Module, method: str) -> list[str]:
    """The first candidate list fully present in ``model``; an error naming ``--targets`` otherwise."""
    from adapterkit.inject.select import select

    for candidate in CANDIDATES.get(method, []):
        try:
            for target in candidate:
                select(model, [target])
        except ValueError:
            continue
        return candidate
    raise TargetError(f"no default targets for method {method!r} on this model; pass --targets")

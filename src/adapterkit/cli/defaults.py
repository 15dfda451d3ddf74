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
    "adalora": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]],
    "ia3": [["key", "value"], ["k_proj", "v_proj"], ["c_attn"]],
    # Pfeiffer placement: after each FFN (the post-norm of a BERT layer, or the mlp block of a pre-norm model)
    "seq_bn": [[r"re:.*layer\.\d+\.output\.LayerNorm"], ["mlp"]],
    "par_bn": [["mlp"]],
    "lowbit": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"], ["q", "v"]],  # its default base is LoRA
    "mask_tuning": [["query", "key", "value"], ["q_proj", "k_proj", "v_proj"], ["c_attn"]],  # R-AMT: attention
    "splora": [["intermediate.dense"], ["c_fc"], ["up_proj"]],  # FFN channels, the ones shrink() can remove
    "bitfit": [["query", "key", "value", "dense", "LayerNorm"], ["c_attn", "c_proj", "c_fc", "ln_1", "ln_2"]],
    "vera": [["query", "value"], ["q_proj", "v_proj"], ["c_attn"]],
    "loha": [["query", "value"], ["q_proj", "v_proj"]],
    "lokr": [["query", "value"], ["q_proj", "v_proj"]],
    "oft": [["query", "value"], ["q_proj", "v_proj"]],
    # Hydra and SNNK: the papers' placement, on each attention output and FFN output projection
    "hydra": [["output.dense"], ["o_proj", "down_proj"], ["c_proj"]],
    "snnk": [["output.dense"], ["o_proj", "down_proj"], ["c_proj"]],
    # Compacter: Houlsby's two places (use --targets 're:.*layer\.\d+\.output\.LayerNorm' for Compacter++);
    # conformer adapters: PETL-AST's best, beside / after the FFN; Hyperformer and shared adapters: Pfeiffer's
    "compacter": [["output.dense"], ["mlp"]],
    "seq_conformer": [[r"re:.*layer\.\d+\.output\.dense"], ["mlp"]],
    "par_conformer": [["intermediate"], ["mlp"]],
    "hyperformer": [[r"re:.*layer\.\d+\.output\.LayerNorm"], ["mlp"]],
    "shared": [[r"re:.*layer\.\d+\.output\.LayerNorm"], ["mlp"]],
}


# Causal LMs (supervised fine-tuning): LoRA-style methods on every projection of attention and MLP, the placement
# the QLoRA paper found necessary to match full fine-tuning; tried before CANDIDATES, which remain the fallback.
_ALL_PROJECTIONS = [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],  # no gated MLP
                    ["c_attn", "c_proj", "c_fc"]]  # GPT-2 (Conv1D)
CAUSAL_LM_CANDIDATES: dict[str, list[list[str]]] = {
    "lora": _ALL_PROJECTIONS, "dora": _ALL_PROJECTIONS, "vera": _ALL_PROJECTIONS, "adalora": _ALL_PROJECTIONS,
    "loha": _ALL_PROJECTIONS[:2], "lokr": _ALL_PROJECTIONS[:2]}  # peft cannot export LoHa/LoKr on Conv1D


def default_targets(model: nn.Module, method: str, causal_lm: bool = False) -> list[str]:
    """The first candidate list fully present in ``model``; an error naming ``--targets`` otherwise.

    ``causal_lm`` tries the causal-LM placements first (all seven projections for LoRA and DoRA).
    """
    from adapterkit.inject.select import select

    lists = (CAUSAL_LM_CANDIDATES.get(method, []) if causal_lm else []) + CANDIDATES.get(method, [])
    for candidate in lists:
        try:
            for target in candidate:
                select(model, [target])
        except ValueError:
            continue
        return candidate
    raise TargetError(f"no default targets for method {method!r} on this model; pass --targets")

"""Inner adaptor layers (IAA): the gated block against a hand-wired model in float64, gate 1 against the model with
the layer really inserted into its layer list (IAA's form), generate with a KV cache equal to decoding the whole
sequence (Llama, Mistral's sliding-window cache layers, GPT-2's tuple outputs; two blocks, two adapters; beam
search), a user-made lazy cache, gradient checkpointing, half precision, the parameter count on SmolLM2's sizes,
and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.inner_layers import InnerLayers
from tests.conftest import make_tiny, randomize, tokens
from tests.methods.test_adaption_prompt import _greedy_without_cache, make

TARGETS = {"llama": r"re:model\.layers\.(0|1)", "mistral": r"re:model\.layers\.0", "gpt2": r"re:transformer\.h\.0",
           "bert": r"re:bert\.encoder\.layer\.1"}


def _blocks(model, name: str = "a") -> list:
    return [host.adapter(name) for _, _, host in placements(model, name)]


class _Gated(nn.Module):
    """The reference wiring, written without adapterkit: h = layer(x, ...); h + g * (block(h, ...) - h)."""

    def __init__(self, layer: nn.Module, block: nn.Module, gate: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.block, self.gate = layer, block, gate

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        b = self.block(h, *args, **kwargs)
        new = h + self.gate * ((b[0] if isinstance(b, tuple) else b) - h)
        return (new, *out[1:]) if isinstance(out, tuple) else new


def _layers(model) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gated_block_equals_the_hand_wired_model_in_float64(kind) -> None:
    model = make_tiny(kind).double()
    ak.attach(model, "a", InnerLayers(), TARGETS[kind])
    randomize(model, "a", scale=0.3)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    reference = make_tiny(kind).double()
    for (path, _, _), block in zip(placements(model, "a"), _blocks(model), strict=True):
        index = int(path.rsplit(".", 1)[1])
        layers = _layers(reference)
        layers[index] = _Gated(layers[index], copy.deepcopy(block.block), block.gate.detach().clone())
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits  # its blocks share indices
        with ak.use(model):
            bare = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert (got - bare).abs().max() > 1e-2


def test_gate_one_is_the_model_with_the_layer_inserted() -> None:
    """IAA's form: the block's output replaces the hidden states, as one more decoder layer in the list would."""
    model = make_tiny("llama").double()
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.0")
    randomize(model, "a", scale=0.3)
    (block,) = _blocks(model)
    with torch.no_grad():
        block.gate.fill_(1.0)
    inserted = make_tiny("llama").double()
    extra = copy.deepcopy(block.block)
    extra.self_attn.layer_idx = 2
    inserted.model.layers.insert(1, extra)
    inserted.config.num_hidden_layers = 3
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, inserted(input_ids=ids).logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_generate_with_cache_equals_the_full_sequence(kind, pad) -> None:
    model = make(kind)
    ak.attach(model, "a", InnerLayers(), TARGETS[kind])
    randomize(model, "a", scale=0.3)
    model.generation_config.eos_token_id = None
    ids = tokens(length=5)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        full = _greedy_without_cache(model, ids, mask, 6)
        with ak.use(model):
            bare = _greedy_without_cache(model, ids, mask, 6)
    assert torch.equal(out.sequences, full)
    assert not torch.equal(full, bare)  # the blocks change what is generated
    layers = model.config.num_hidden_layers + len(_blocks(model))
    assert len(out.past_key_values.layers) == layers  # one cache layer more per block, after the model's own
    assert all(layer.keys.shape[-2] == out.past_key_values.layers[0].keys.shape[-2]
               for layer in out.past_key_values.layers)


def test_beam_search_reorders_the_blocks_cache_too() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", InnerLayers(), TARGETS["llama"])
    randomize(model, "a", scale=0.3)
    model.generation_config.eos_token_id = None
    ids = tokens(length=5)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        full = model.generate(input_ids=ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant) -> None:
    """The block is a checkpointed layer too: it gets the hidden states positionally, as checkpointing needs."""
    grads = []
    for checkpointing in (False, True):
        model = make_tiny("llama")
        ak.attach(model, "a", InnerLayers(), TARGETS["llama"])
        randomize(model, "a", scale=0.3)
        ak.train_only(model, "a")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        grads.append([p.grad for block in _blocks(model) for p in block.parameters()])
    assert all(g is not None for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)


def test_two_adapters_and_a_user_made_lazy_cache() -> None:
    """Blocks of two adapters on one layer take distinct cache layers; a DynamicCache() grown lazily works too."""
    model = make_tiny("llama")
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.0")
    ak.attach(model, "b", InnerLayers(), r"re:model\.layers\.(0|1)")
    randomize(model, "a", scale=0.3)
    randomize(model, "b", scale=0.3, seed=4)
    ids = tokens(length=7)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache = DynamicCache()
        first = model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True).logits
        rest = model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, atol=1e-5, rtol=0)
    assert len(cache.layers) == 2 + 3 and all(layer.keys.shape[-2] == 7 for layer in cache.layers)


def test_half_precision_base_keeps_float32_masters() -> None:
    model = make_tiny("llama").to(torch.bfloat16)
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.1")
    randomize(model, "a", scale=0.3)
    ak.train_only(model, "a")
    (block,) = _blocks(model)
    assert all(p.dtype == torch.float32 for p in block.parameters())
    out = model(input_ids=tokens(), labels=tokens())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert block.block.mlp.down_proj.weight.grad.dtype == torch.float32
    assert block.block.mlp.down_proj.weight.grad.abs().sum() > 0


def test_costs_one_decoder_layer_per_block_on_smollm2_sizes() -> None:
    """SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 kv heads (head size 64)."""
    config = LlamaConfig(vocab_size=100, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.1")
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    attention = 2 * 576 * 576 + 2 * 576 * 192
    assert layer == attention + 3 * 576 * 1536 + 2 * 576 == 3_540_096
    assert ak.train_only(model, "a") == layer + 576 == 3_540_672


def test_base_hosts_are_not_copied_into_the_block() -> None:
    model = make_tiny("llama")
    ak.attach(model, "lora", ak.LoRA(r=2), ["q_proj"])
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.1")
    (block,) = _blocks(model)
    assert not any("adapterkit" in n for n, _ in block.block.named_modules())
    assert not block.block.self_attn.q_proj._forward_hooks
    assert ak.train_only(model, "a") == sum(p.numel() for p in make_tiny("llama").model.layers[0].parameters()) + 32


def test_bad_input_gets_one_line() -> None:
    model = make_tiny("llama")
    with pytest.raises(TargetError, match=r"model.layers.0.self_attn.q_proj \(Linear\) holds no attention with a "
                                          "layer_idx; the targets must be decoder layers"):
        ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.0\.self_attn\.q_proj")
    with pytest.raises(TargetError, match="holds no attention with a layer_idx"):
        ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.0\.self_attn")
    with pytest.raises(TargetError, match=r"model.layers \(ModuleList\) spans layers \[0, 1\]"):
        ak.attach(model, "a", InnerLayers(), r"re:model\.layers")
    assert ak.adapters(model) == []
    ak.attach(model, "a", InnerLayers(), r"re:model\.layers\.1")
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(AdapterKitError, match="cannot add a layer for the inserted blocks to a StaticCache"):
        model(input_ids=tokens(), past_key_values=static, use_cache=True)

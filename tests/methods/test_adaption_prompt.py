"""Adaption prompts (LLaMA-Adapter): outputs, losses and gradients equal peft's ``adaption_prompt`` for the same
prompts and gates on Llama (GQA), Mistral (GQA) and GPT-2; per-head gates against a float64 hand computation;
generate with a KV cache equals greedy decoding of the whole sequence; one-line errors."""

from __future__ import annotations

import pytest
import torch
from peft import AdaptionPromptConfig, TaskType, get_peft_model

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.adaption_prompt import AdaptionPrompt
from tests.conftest import make_tiny, tokens

N, L = 3, 2
GPT2 = {"attention": "attn", "q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn"}


def make(kind: str, seed: int = 0) -> torch.nn.Module:
    """make_tiny's models, plus a Mistral of the tiny Llama's sizes (grouped-query attention, 2 kv heads)."""
    if kind != "mistral":
        return make_tiny(kind, seed)
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def _ours(kind: str, gate: str = "scalar", **fields) -> tuple[torch.nn.Module, list]:
    model = make(kind)
    names = GPT2 | {"o_proj": ""} if kind == "gpt2" else {}  # peft adds GPT-2's prompt part without c_proj
    ak.attach(model, "a", AdaptionPrompt(adapter_len=N, layers=L, gate=gate, **(names | fields)))
    return model, [host.adapter("a") for _, _, host in placements(model, "a")]


def _theirs(kind: str) -> tuple[torch.nn.Module, list]:
    target = "attn" if kind == "gpt2" else "self_attn"
    model = get_peft_model(make(kind), AdaptionPromptConfig(task_type=TaskType.CAUSAL_LM, adapter_len=N,
                                                            adapter_layers=L, target_modules=target))
    return model, [m for m in model.modules() if hasattr(m, "adaption_gate")]


def _same_weights(ours: list, theirs: list, gate: str) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mine, peft in zip(ours, theirs, strict=True):
            value = torch.rand(1, generator=generator) + 0.5
            mine.gate.copy_(value.expand_as(mine.gate))  # per-head gates all equal to peft's one gate
            peft.adaption_gate.copy_(value)
            peft.adaption_prompt.copy_(mine.prompt.unsqueeze(0))


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = tokens(length=7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on the first row
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("gate", ["scalar", "head"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_outputs_losses_and_gradients_equal_peft(kind, gate) -> None:
    ours, mine = _ours(kind, gate)
    theirs, peft = _theirs(kind)
    _same_weights(mine, peft, gate)
    ak.train_only(ours, "a")
    ids, mask, labels = _batch(kind)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        base = make(kind)(input_ids=ids, attention_mask=mask).logits
    assert (got.logits - base).abs().max() > 1e-3  # the prompts change the output: the comparison can fail
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    got.loss.backward()
    want.loss.backward()
    for a, b in zip(mine, peft, strict=True):
        torch.testing.assert_close(a.prompt.grad, b.adaption_prompt.grad[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.gate.grad.sum(), b.adaption_gate.grad[0], atol=1e-5, rtol=0)
    assert all(p.grad is None for n, p in ours.named_parameters() if "adapterkit" not in n)


def test_per_head_gates_follow_the_equation_in_float64() -> None:
    """attn'(x) = attn(x) + W_o concat_h[g_h softmax(RoPE(W_q x)_h (W_k P)_h^T / sqrt(d_h)) (W_v P)_h] per head."""
    model = make_tiny("llama").double()
    ak.attach(model, "a", AdaptionPrompt(adapter_len=N, layers=1))
    (path, attn, host), = placements(model, "a")
    adapter = host.adapter("a")
    with torch.no_grad():
        adapter.gate.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64))
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(5).unsqueeze(0).expand(2, -1)
    cos, sin = model.model.rotary_emb(x, positions)
    with torch.no_grad():
        got = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        with ak.use(model):
            base = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        q = (x @ attn.q_proj.weight.T).view(2, 5, 4, 8).transpose(1, 2)
        half = torch.cat([-q[..., 4:], q[..., :4]], -1)
        q = q * cos.unsqueeze(1) + half * sin.unsqueeze(1)
        k = (adapter.prompt @ attn.k_proj.weight.T).view(N, 2, 8).transpose(0, 1)  # (2 kv heads, n, 8)
        v = (adapter.prompt @ attn.v_proj.weight.T).view(N, 2, 8).transpose(0, 1)
        heads = []
        for h in range(4):
            w = torch.softmax(q[:, h] @ k[h // 2].T / 8 ** 0.5, -1) * adapter.gate[h]  # head h reads kv head h // 2
            heads.append(w @ v[h // 2])
        want = base + torch.cat(heads, -1) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - base)[..., :].abs().max() > 1e-3


def _greedy_without_cache(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decoding over the whole sequence every step, positions numbered from the mask as generate does."""
    seq, msk = ids, mask
    for _ in range(steps):
        pos = (msk.long().cumsum(-1) - 1).masked_fill(msk == 0, 1)
        step = model(input_ids=seq, attention_mask=msk, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = step.argmax(-1, keepdim=True)
        seq, msk = torch.cat([seq, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_cache_equals_the_full_sequence(kind, pad) -> None:
    model = make_tiny(kind)
    names = GPT2 | {"o_proj": "c_proj"} if kind == "gpt2" else {}
    ak.attach(model, "a", AdaptionPrompt(adapter_len=N, **names))
    with torch.no_grad():
        for _, _, host in placements(model, "a"):
            host.adapter("a").gate.fill_(3.0)  # a strong prompt, so a wrong cache path changes the tokens
    model.generation_config.eos_token_id = None
    ids = tokens(length=5)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = _greedy_without_cache(model, ids, mask, 6)
        with ak.use(model):
            bare = _greedy_without_cache(model, ids, mask, 6)
    assert torch.equal(cached, full)
    assert not torch.equal(full, bare)  # the prompts change what is generated


def test_places_itself_on_the_top_layers_and_counts() -> None:
    model = make_tiny("llama")
    assert ak.attach(model, "a", AdaptionPrompt(adapter_len=4, layers=1)) == ["model.layers.1.self_attn"]
    assert ak.attach(model, "b", AdaptionPrompt(adapter_len=4, gate="scalar")) == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert ak.train_only(model, "b") == 2 * (4 * 32 + 1)  # per layer: P (n, d) and one gate
    assert ak.train_only(model, "a") == 4 * 32 + 4  # one gate per head
    gpt2 = make_tiny("gpt2")
    assert ak.attach(gpt2, "a", AdaptionPrompt(layers=2, **GPT2, o_proj="c_proj")) == [
        "transformer.h.0.attn", "transformer.h.1.attn"]  # not "attn.c_attn": the whole last name must match


def test_bad_input_gets_one_line() -> None:
    model = make_tiny("llama")
    with pytest.raises(TargetError, match=r"layers=3 exceeds the 2 attention modules \('self_attn'\)"):
        ak.attach(model, "a", AdaptionPrompt(layers=3))
    with pytest.raises(TargetError, match=r"model.layers.1.mlp \(LlamaMLP\) has no child 'q_proj' \(q_proj\)"):
        ak.attach(model, "a", AdaptionPrompt(layers=1, attention="mlp"))
    with pytest.raises(TargetError, match=r"has no child 'out_proj' \(o_proj\)"):
        ak.attach(model, "a", AdaptionPrompt(o_proj="out_proj"))
    with pytest.raises(TargetError, match="no module of this GPT2LMHeadModel is named 'self_attn'"):
        ak.attach(make_tiny("gpt2"), "a", AdaptionPrompt())
    with pytest.raises(TargetError, match="three projections or one fused one"):
        ak.attach(model, "a", AdaptionPrompt(k_proj="q_proj"))
    with pytest.raises(TargetError, match="places itself"):
        ak.attach(model, "a", AdaptionPrompt(), targets=["self_attn"])
    with pytest.raises(SpecError, match="adapter_len must be a positive integer"):
        AdaptionPrompt(adapter_len=0)
    with pytest.raises(SpecError, match="layers must be > 0"):
        AdaptionPrompt(layers=0)
    with pytest.raises(SpecError, match="gate must be one of"):
        AdaptionPrompt(gate="tanh")
    with pytest.raises(SpecError, match="q_proj must be a module name"):
        AdaptionPrompt(q_proj="q-proj")
    assert ak.adapters(model) == []  # nothing was attached by the failed calls

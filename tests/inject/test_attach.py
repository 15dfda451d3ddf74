"""attach / explain / activate / use / train_only / detach on real architectures and toy modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.inject.engine import placements
from tests.conftest import logits, make_minilm, make_tiny, randomize, tokens


def test_three_real_architectures() -> None:
    cases = [(make_minilm(), ["query", "value"], 12, 30522),
             (make_tiny("gpt2"), ["c_attn"], 2, 100),
             (make_tiny("llama"), ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 100)]
    for model, targets, count, vocab in cases:
        ids = tokens(vocab=vocab)
        ref = logits(model, ids)
        plan = ak.explain(model, targets, ak.LoRA(r=4))
        assert len(plan.rows) == count and plan.adapter_params > 0
        assert ak.adapters(model) == []  # explain changes nothing
        paths = ak.attach(model, "a", ak.LoRA(r=4), targets)
        assert paths == [r.path for r in plan.rows]
        randomize(model, "a")
        assert not torch.allclose(logits(model, ids), ref)
        trainable = ak.train_only(model, "a")
        assert trainable == plan.adapter_params
        ak.detach(model)
        assert torch.equal(logits(model, ids), ref)


def test_target_kinds_suffix_regex_type_predicate() -> None:
    model = make_tiny("bert")
    by_suffix = [p for p, _ in ak.inject.select.select(model, ["query"])]
    by_regex = [p for p, _ in ak.inject.select.select(model, [r"re:.*layer\.0\..*query"])]
    by_type = ak.inject.select.select(model, nn.LayerNorm)
    by_predicate = ak.inject.select.select(model, lambda path, m: isinstance(m, nn.Linear) and m.out_features == 64)
    assert by_suffix == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert by_regex == by_suffix[:1]
    assert all(isinstance(m, nn.LayerNorm) for _, m in by_type) and len(by_type) == 5
    assert [p.split(".")[-2] for p, _ in by_predicate] == ["intermediate", "intermediate"]
    assert "query" in str(ak.explain(model, ["query"], ak.LoRA(r=2)))


def test_several_adapters_activate_and_use() -> None:
    model = make_tiny("bert")
    ids = tokens()
    base = logits(model, ids)
    ak.attach(model, "a", ak.LoRA(r=2), ["query"])
    ak.attach(model, "b", ak.IA3(), ["value"])
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    both = logits(model, ids)
    ak.activate(model, "a")
    only_a = logits(model, ids)
    with ak.use(model, "b"):
        only_b = logits(model, ids)
    with ak.use(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), only_a)  # use() restores the outer setup
    ak.activate(model)
    assert torch.equal(logits(model, ids), base)
    ak.activate(model, "a", "b")
    assert torch.equal(logits(model, ids), both)
    assert len({tuple(t.flatten().tolist()) for t in (base, only_a, only_b, both)}) == 4
    ak.detach(model, "a")
    assert ak.adapters(model) == ["b"]
    torch.testing.assert_close(logits(model, ids), only_b)


def test_train_only_with_a_head_and_saving_the_head(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    count = ak.train_only(model, "a", also=["classifier"])
    head = model.classifier
    assert count == 2 * 2 * (2 * 32 + 32 * 2) + head.weight.numel() + head.bias.numel()
    assert head.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
    with torch.no_grad():
        head.weight.add_(1.0)
    randomize(model, "a")
    ak.save(model, tmp_path / "ad", modules=("classifier",))
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh.classifier.weight, head.weight)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_merge_stacks_and_unmerges_in_any_order() -> None:
    model = make_tiny("bert")
    ids = tokens()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ak.attach(model, "a", ak.LoRA(r=2), ["query"])
    ak.attach(model, "b", ak.DoRA(r=2), ["query"])
    ak.attach(model, "c", ak.IA3(), ["query"])
    for name in ("a", "b", "c"):
        randomize(model, name)
    expected = logits(model, ids)
    for name in ("a", "b", "c"):
        ak.merge(model, name)
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    ak.unmerge(model, "a")  # the first merged: the others are undone and redone around it
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    ak.detach(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, base_state[key], atol=1e-6, rtol=1e-6)


def test_detach_keep_merged_bakes_the_adapter_in() -> None:
    model = make_tiny("llama")
    ids = tokens()
    ak.attach(model, "a", ak.LoRA(r=2), ["q_proj", "v_proj"])
    randomize(model, "a")
    expected = logits(model, ids)
    ak.merge(model, "a")
    ak.detach(model, keep_merged=True)
    assert ak.adapters(model) == []
    assert all(".adapterkit." not in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_adapter_names_may_shadow_module_attributes() -> None:
    model = make_tiny("bert")
    for name in ("train", "forward", "add"):
        ak.attach(model, name, ak.LoRA(r=2), ["query"])
    assert ak.adapters(model) == ["train", "forward", "add"]
    assert [type(h.adapter("train")).__name__ for _, _, h in placements(model, "train")] == ["LoRALinear"] * 2
    model.train()  # still the nn.Module method
    assert model.training


def test_generate_still_works_with_an_adapter() -> None:
    model = make_tiny("gpt2")
    ak.attach(model, "a", ak.LoRA(r=2), ["c_attn"])
    randomize(model, "a")
    out = model.generate(tokens(batch=1, length=4), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype) -> None:
    model = make_tiny("llama").to(dtype)
    ak.attach(model, "a", ak.LoRA(r=2), ["q_proj"])
    ak.attach(model, "b", ak.DoRA(r=2), ["k_proj"])
    ak.attach(model, "c", ak.IA3(), ["v_proj"])
    ak.attach(model, "d", ak.SeqBottleneck(hidden=4), ["mlp"])
    ak.attach(model, "e", ak.LoRA(r=2), ["embed_tokens"])
    for name in ("a", "b", "c", "d", "e"):
        randomize(model, name)
        for param in placements(model, name)[0][2].adapter(name).parameters():
            assert param.dtype == torch.float32  # float32 masters on a low-precision base
    out = logits(model, tokens())
    assert out.dtype == dtype and torch.isfinite(out).all()
    ak.train_only(model, ["a", "b", "c", "d", "e"])
    model.train()
    model(input_ids=tokens()).logits.float().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_explain_leaves_the_random_stream_alone() -> None:
    model = make_tiny("bert")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ak.explain(model, ["query"], ak.LoRA(r=2))
    assert torch.equal(torch.rand(3), expected)

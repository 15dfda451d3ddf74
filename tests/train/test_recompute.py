"""Gradient checkpointing policies: "full" and "selective" give the loss and adapter gradients of no checkpointing.

The model is wide enough (hidden 160 > ``CHEAP_INNER``) that the selective policy keeps the base projections'
outputs, the case where an in-place adapter add would corrupt the kept value.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.train.recompute import CHEAP_INNER, checkpoint_kwargs


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=160, intermediate_size=320,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=160, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=320,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _loss_and_grads(kind: str, policy: str | None) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(kind)
    assert model.config.hidden_size > CHEAP_INNER
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["query", "value", "output.dense"]
    torch.manual_seed(1)
    ak.attach(model, "a", ak.LoRA(r=4), targets)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)  # B = 0 would hide a wrong delta
    ak.train_only(model, "a")
    model.train()
    if policy:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(policy))
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = ids if kind == "llama" else torch.tensor([0, 1, 0])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointed_gradients_equal_plain_ones(kind: str, policy: str) -> None:
    plain_loss, plain = _loss_and_grads(kind, None)
    loss, grads = _loss_and_grads(kind, policy)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        checkpoint_kwargs("partial")

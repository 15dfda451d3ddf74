"""MixDA's two stages on a small random BERT with the MiniLM tokenizer: what trains, and the old-knowledge loss."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import minilm_dir
from torch import nn

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import placements
from adapterkit.train.data import TextTable
from adapterkit.train.loop import TrainConfig
from adapterkit.train.mixda import old_knowledge_hooks, train_domain, train_task

FFN_OUT = [r"re:.*layer\.1\.output\.dense"]
SUBLAYERS = ["bert.encoder.layer.1.output"]


def _setup() -> tuple[nn.Module, object]:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    ak.attach(model, "dom", ak.ParBottleneck(reduction_factor=4, scaling=1.0, activation="gelu"), FFN_OUT)
    ak.attach(model, "gate", ak.compose.MixDA(domains=1, hidden=8), FFN_OUT)
    return model, AutoTokenizer.from_pretrained(minilm_dir())


def _table(rows: int) -> TextTable:
    words = ["good film", "bad plot", "great acting", "dull and long", "a fine cast", "weak ending"]
    return TextTable([words[i % len(words)] + f" {i}" for i in range(rows)], None, [i % 2 for i in range(rows)])


def _snapshot(model: nn.Module, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for _, _, h in placements(model, name) for p in h.adapter(name).parameters()]


def _changed(before: list[torch.Tensor], model: nn.Module, name: str) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, _snapshot(model, name)))


def test_old_knowledge_loss_is_zero_when_the_gate_keeps_the_ffn_and_positive_otherwise() -> None:
    model, tokenizer = _setup()
    model.eval()
    ids = tokenizer(["a movie"], return_tensors="pt")["input_ids"]
    gate = placements(model, "gate")[0][2].adapter("gate")
    for ffn_logit, zero in ((50.0, True), (0.0, False)):
        with torch.no_grad():
            gate.mlp[-1].bias.copy_(torch.tensor([0.0, ffn_logit]))  # (domain, FFN)
            gate.mlp[-1].weight.zero_()
        losses: list[torch.Tensor] = []
        handles = old_knowledge_hooks(model, SUBLAYERS, losses)
        with ak.use(model, ak.Mix("dom", name="gate")), torch.no_grad():
            model(input_ids=ids)
        for handle in handles:
            handle.remove()
        assert len(losses) == 1
        assert (losses[0].item() < 1e-10) == zero  # a half-weighted FFN output moves the layer's output


def test_old_knowledge_hooks_refuse_a_module_that_is_not_an_ffn_output() -> None:
    model, _ = _setup()
    with pytest.raises(AdapterKitError, match="'bert.encoder.layer.1.intermediate' is not an FFN output"):
        old_knowledge_hooks(model, ["bert.encoder.layer.1.intermediate"], [])


def test_stage_one_trains_domain_and_gate_stage_two_task_and_gate_only() -> None:
    model, tokenizer = _setup()
    config = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_length=16)
    base = [p.detach().clone() for n, p in model.bert.named_parameters() if "adapterkit" not in n]
    dom, gate = _snapshot(model, "dom"), _snapshot(model, "gate")
    result = train_domain(model, tokenizer, ["dom"], "gate", _table(8), _table(12), SUBLAYERS, config)
    assert len(result["history"]["old"]) == 2 and all(v >= 0 for v in result["history"]["old"])
    assert _changed(dom, model, "dom") and _changed(gate, model, "gate")
    ak.attach(model, "task", ak.SeqBottleneck(reduction_factor=4), [r"re:.*layer\.\d+\.output\.LayerNorm"])
    dom, gate, task = _snapshot(model, "dom"), _snapshot(model, "gate"), _snapshot(model, "task")
    result = train_task(model, tokenizer, ["dom"], "gate", "task", _table(8), _table(4), config)
    assert 0.0 <= result["dev_accuracy"] <= 100.0
    assert not _changed(dom, model, "dom") and _changed(gate, model, "gate") and _changed(task, model, "task")
    after = [p for n, p in model.bert.named_parameters() if "adapterkit" not in n]
    assert all(torch.equal(a, b) for a, b in zip(base, after))  # the base model never trains

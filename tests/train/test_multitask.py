"""Multi-task classification: per-task heads on mixed batches, the block's auxiliary losses, real training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.compose.test_blocks import SoftMix
from tests.conftest import randomize, tokens
from transformers import BertConfig, BertModel

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from adapterkit.train.data import TextTable
from adapterkit.train.loop import TrainConfig
from adapterkit.train.multitask import MultiTaskClassifier, train_multitask


def _encoder() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def test_each_row_is_scored_by_its_own_head() -> None:
    model = MultiTaskClassifier(_encoder(), {"two": 2, "three": 3}).eval()
    ids, mask = tokens(batch=4), torch.ones(4, 8, dtype=torch.long)
    task_ids, labels = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 0, 0])
    out = model(ids, mask, task_ids, labels)
    pooled = model.pooled(ids, mask)
    assert torch.isinf(out.logits[[0, 3], 2]).all() and torch.isfinite(out.logits[[1, 2]]).all()
    torch.testing.assert_close(out.logits[1], model.heads["three"](pooled[1]))
    expected = (F.cross_entropy(model.heads["two"](pooled[[0, 3]]), labels[[0, 3]], reduction="sum")
                + F.cross_entropy(model.heads["three"](pooled[[1, 2]]), labels[[1, 2]], reduction="sum")) / 4
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(AdapterKitError, match=r"task ids must lie in 0..1 \(two, three\)"):
        model(ids, mask, torch.tensor([0, 1, 2, 0]))


def test_the_blocks_auxiliary_loss_is_added_with_its_weight() -> None:
    encoder = _encoder()
    for index, name in enumerate(("a", "b")):
        ak.attach(encoder, name, ak.LoRA(r=4), ["query"])
        randomize(encoder, name, seed=index)
    ak.attach(encoder, "mix", SoftMix(), ["query"])
    ids, mask = tokens(), torch.ones(2, 8, dtype=torch.long)
    task_ids, labels = torch.tensor([0, 0]), torch.tensor([1, 0])
    plain = MultiTaskClassifier(encoder, {"t": 2}, block=ak.Mix("a", "b", name="mix"), aux_weight=0.0).eval()
    weighted = MultiTaskClassifier(encoder, {"t": 2}, block=ak.Mix("a", "b", name="mix"), aux_weight=0.5).eval()
    weighted.heads.load_state_dict(plain.heads.state_dict())
    base, out = plain(ids, mask, task_ids, labels), weighted(ids, mask, task_ids, labels)
    assert base.loss is not None and out.loss is not None
    torch.testing.assert_close(out.loss - base.loss, 0.5 * out.routing.aux_loss())
    assert sorted(out.routing.weights["mix"]) == ["encoder.layer.0.attention.self.query",
                                                  "encoder.layer.1.attention.self.query"]


class _Tokenizer:
    """Whitespace tokens "t<k>" -> id k: enough for a synthetic task on the tiny encoder."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=64):
        return {"input_ids": [[int(w[1:]) for w in t.split()][:max_length] for t in texts]}


def _synthetic(seed: int, rows: int, flip: bool) -> TextTable:
    # label: does token 7 occur? ("flip" swaps the answer: only per-task heads can get both tasks right)
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(rows):
        words = torch.randint(10, 100, (8,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            words[int(torch.randint(0, 8, (), generator=g))] = 7
        texts.append(" ".join(f"t{int(w)}" for w in words))
        labels.append(1 - label if flip else label)
    return TextTable(texts, None, labels)


def test_training_on_mixed_batches_learns_each_task_with_its_head() -> None:
    encoder = _encoder()
    ak.attach(encoder, "shared", ak.LoRA(r=8, alpha=16), ["query", "value", "dense"])
    ak.train_only(encoder, "shared")
    model = MultiTaskClassifier(encoder, {"plain": 2, "flip": 2}, dropout=0.0)
    tasks = {"plain": (_synthetic(0, 256, False), _synthetic(1, 128, False)),
             "flip": (_synthetic(2, 256, True), _synthetic(3, 128, True))}
    result = train_multitask(model, _Tokenizer(), tasks, TrainConfig(epochs=4, lr=1e-2, batch_size=32, seed=0))
    assert result["steps"] == 64
    assert min(result["dev_accuracy"].values()) > 90.0, result["dev_accuracy"]
    assert sum(result["history"]["loss"][-5:]) < sum(result["history"]["loss"][:5])
    with pytest.raises(AdapterKitError, match="must match the model's heads"):
        train_multitask(model, _Tokenizer(), {"flip": tasks["flip"], "plain": tasks["plain"]}, TrainConfig())

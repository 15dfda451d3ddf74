"""``use`` belongs to the model it was given: two adapted models in one thread never see each other's setup; a
merged adapter is never silently part of a setup that leaves it out; training under Select gets real gradients."""

from __future__ import annotations

import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from tests.conftest import logits, make_tiny, randomize, tokens


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher, student = make_tiny("llama"), make_tiny("llama")
    for model, seed in ((teacher, 1), (student, 2)):
        ak.attach(model, "a", ak.LoRA(r=4), ["q_proj", "v_proj"])
        ak.attach(model, "b", ak.SeqBottleneck(hidden=8), ["mlp"])
        randomize(model, "a", seed=seed)
        randomize(model, "b", seed=seed + 10)
        ak.activate(model, "b")
    return teacher, student


@pytest.mark.parametrize("setup", [(), ("a",), ("a", "b")], ids=["base", "a", "a+b"])
def test_a_use_block_leaves_every_other_model_alone(setup) -> None:
    teacher, student = _pair()
    ids = tokens()
    alone = logits(student, ids)
    with ak.use(teacher, *setup):
        inside = logits(student, ids)
        with ak.use(student, "a"):  # nested, on the other model: its own setup, the teacher's stays
            both = logits(student, ids), logits(teacher, ids)
        teacher_inside = logits(teacher, ids)
    assert torch.equal(inside, alone)
    with ak.use(student, "a"):
        assert torch.equal(both[0], logits(student, ids))
    assert torch.equal(both[1], teacher_inside)


def test_select_and_blocks_leave_other_models_alone() -> None:
    teacher, student = _pair()
    ids = tokens()
    alone = logits(student, ids)
    with ak.use(teacher, ak.Select(["a", None])):
        assert torch.equal(logits(student, ids), alone)
    with ak.use(teacher, ak.Stack("a", "b")):
        assert torch.equal(logits(student, ids), alone)


def test_a_sub_module_scope_covers_only_that_sub_module() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=4), ["q_proj"])
    randomize(model, "a")
    ids = tokens()
    with ak.use(model):
        base = logits(model, ids)
    full = logits(model, ids)
    with ak.use(model.model.layers[0]):  # layer 0 runs the base, layer 1 keeps its active adapter
        half = logits(model, ids)
    assert not torch.equal(half, base) and not torch.equal(half, full)


def test_threads_keep_their_own_setups() -> None:
    teacher, student = _pair()
    ids = tokens()
    expected = logits(student, ids)
    seen: list[torch.Tensor] = []
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ak.use(student, "a"):
            started.set()
            release.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    started.wait(5)
    seen.append(logits(student, ids))  # the other thread's block does not reach this one
    release.set()
    other.join()
    assert torch.equal(seen[0], expected)


def test_a_merged_adapter_is_never_silently_left_in_or_out() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=4), ["q_proj", "v_proj"])
    randomize(model, "a")
    ids = tokens()
    with ak.use(model):
        base = logits(model, ids)
    with_a = logits(model, ids)
    ak.merge(model, "a")
    with ak.use(model, "a"):  # merged and asked for: the merged weights are it
        torch.testing.assert_close(logits(model, ids), with_a, atol=1e-5, rtol=0)
    for setup in [(), (ak.Select(["a", None]),), (ak.Parallel("a"),)]:
        with pytest.raises(AdapterKitError, match="'a' is merged into the base weights") as info:
            with ak.use(model, *setup):
                pass
        assert "\n" not in str(info.value)
    ak.unmerge(model, "a")
    with ak.use(model):
        torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec,targets", [(ak.LoRA(r=4), ["q_proj", "v_proj"]),
                                          (ak.SeqBottleneck(hidden=8), ["mlp"]),
                                          (ak.IA3(position="input"), ["down_proj"])],
                         ids=["lora", "seq_bn", "ia3-input"])
def test_training_under_select_gets_each_rows_gradients(spec, targets) -> None:
    model = make_tiny("llama")
    for name in ("a", "b"):
        ak.attach(model, name, spec, targets)
        randomize(model, name, seed=ord(name))
    ak.train_only(model, ["a", "b"])
    ids = tokens(batch=3)
    with ak.use(model, ak.Select(["a", "b", None])):
        model(input_ids=ids).logits.float().pow(2).sum().backward()
    under_select = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for row, name in enumerate(["a", "b"]):  # the reference: each row alone with its own adapter (row 2: none)
        with ak.use(model, name):
            model(input_ids=ids[row:row + 1]).logits.float().pow(2).sum().backward()
    for key, grad in under_select.items():
        torch.testing.assert_close(grad, model.get_parameter(key).grad, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in under_select.values())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_backward_after_the_use_block_recomputes_its_setup(reentrant: bool) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    def model_with(checkpointing: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        for name in ("a", "b"):
            ak.attach(model, name, ak.LoRA(r=2), ["query", "value"])
            randomize(model, name, seed=ord(name))
        ak.train_only(model, ["a", "b"])
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        return model.train()

    ids = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = model_with(checkpointing)
        with ak.use(model, "a"):  # as a Trainer's compute_loss would: the loss in the block ...
            loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()  # ... backward after it, where checkpointing recomputes the layers
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        if ".b." in name or name.endswith(".b"):
            assert grads[1][name] is None or grads[1][name].abs().max() == 0  # "b" did not run
        else:
            torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)

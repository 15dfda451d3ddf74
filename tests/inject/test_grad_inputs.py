"""Gradient checkpointing over a frozen base: every adapter weight gets the gradient it gets without checkpointing,
reentrant or not, whatever the order of train_only and gradient_checkpointing_enable; the hook acts only while
checkpointing is on and is gone once the last adapter is detached."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import adapterkit as ak
from adapterkit.inject.grad_inputs import InputGrads, disable_input_grads, has_input_grads


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _batch(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = ids if "CausalLM" in type(model).__name__ else torch.tensor([0, 1, 1])
    return {"input_ids": ids, "labels": labels}


def _adapter_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and ".adapterkit." in n
            and p.grad is not None}


def _lora_b_nonzero(model: nn.Module) -> None:
    with torch.no_grad():  # lora_b starts at zero, which would hide lora_a's gradient
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))


def _adapted(build) -> nn.Module:
    model = build()  # seeded: the same base and the same LoRA init at every call
    targets = ["q_proj", "v_proj"] if "Llama" in type(model).__name__ else ["query", "value"]
    ak.attach(model, "a", ak.LoRA(r=2), targets)
    _lora_b_nonzero(model)
    return model


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("order", ["train_only_first", "checkpointing_first"])
def test_every_adapter_weight_gets_its_gradient_under_checkpointing(build, reentrant, order) -> None:
    plain = _adapted(build)
    ak.train_only(plain, "a")
    plain.train()
    batch = _batch(plain)
    expected = _adapter_grads(plain, batch)  # without checkpointing
    model = _adapted(build)
    kwargs = {"use_reentrant": reentrant}
    if order == "checkpointing_first":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        ak.train_only(model, "a")
    else:
        ak.train_only(model, "a")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    assert model.is_gradient_checkpointing
    got = _adapter_grads(model, batch)
    adapter_params = [n for n, _ in model.named_parameters() if ".adapterkit." in n]
    assert len(adapter_params) == 2 * 2 * 2 and sorted(got) == sorted(adapter_params)  # 2 layers x 2 targets x A, B
    assert sorted(expected) == sorted(got)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5)


def test_without_the_hook_reentrant_checkpointing_trains_nothing() -> None:
    """The defect the hook fixes, reproduced: the first segment's input needs no grad, so no adapter gets one."""
    model = _bert()
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    ak.train_only(model, "a")
    disable_input_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(**_batch(model)).loss.backward()


def _embedding_output_requires_grad(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    seen: list[bool] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen[0]


def test_the_hook_acts_only_while_checkpointing_in_training_with_grad() -> None:
    model = _bert()
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    ak.train_only(model, "a")
    batch = _batch(model)
    model.train()
    assert not _embedding_output_requires_grad(model, batch)  # checkpointing off: untouched
    model.gradient_checkpointing_enable()
    assert _embedding_output_requires_grad(model, batch)
    model.eval()
    assert not _embedding_output_requires_grad(model, batch)
    model.train()
    with torch.no_grad():
        assert not _embedding_output_requires_grad(model, batch)
    model.gradient_checkpointing_disable()
    assert not _embedding_output_requires_grad(model, batch)


def _our_hooks(model: nn.Module) -> int:
    return sum(isinstance(h, InputGrads) for m in model.modules() for h in m._forward_hooks.values())


def test_one_hook_however_often_train_only_runs_and_none_after_the_last_detach() -> None:
    model = _bert()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = {path: dict(m._forward_hooks) for path, m in model.named_modules()}
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    ak.attach(model, "b", ak.LoRA(r=2), ["query"])
    ak.train_only(model, "a")
    ak.train_only(model, ["a", "b"], also=["classifier"])
    assert _our_hooks(model) == 1 and has_input_grads(model)
    ak.detach(model, "a")
    assert _our_hooks(model) == 1  # "b" still trains
    ak.detach(model, "b")
    assert not has_input_grads(model)
    assert {path: dict(m._forward_hooks) for path, m in model.named_modules()} == hooks_before
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())


def test_detach_of_everything_removes_the_hook_of_a_copied_model() -> None:
    import copy

    model = _bert()
    ak.attach(model, "a", ak.LoRA(r=2), ["query", "value"])
    ak.train_only(model, "a")
    twin = copy.deepcopy(model)
    hook = next(h for h in twin.get_input_embeddings()._forward_hooks.values() if isinstance(h, InputGrads))
    assert all(any(f is m for m in twin.modules()) for f in hook.flagged)  # reads the copy's flags, not the original's
    ak.detach(twin)
    assert not has_input_grads(twin) and has_input_grads(model)


class _Plain(nn.Module):
    """A non-transformers model checkpointed with torch.utils.checkpoint in its own forward."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))
        self.reentrant = reentrant

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.reentrant:
            x.requires_grad_()  # the documented recipe for reentrant checkpointing over a frozen base
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x.sum()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_plain_torch_checkpointing_trains_every_adapter_weight(reentrant) -> None:
    torch.manual_seed(0)
    model = _Plain(reentrant)
    ak.attach(model, "a", ak.LoRA(r=2), [nn.Linear])
    _lora_b_nonzero(model)
    ak.train_only(model, "a")
    assert not has_input_grads(model)  # no get_input_embeddings: left alone
    model(torch.tensor([[1, 2, 3]])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())

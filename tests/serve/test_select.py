"""Select: one adapter per example in one batch equals running each example alone with its adapter."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.ops.gathered import gathered_lora, segments, stack_factors
from tests.conftest import make_tiny, randomize, tokens


def _llama_with_adapters():
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=2), ["q_proj", "v_proj", "down_proj"])
    ak.attach(model, "b", ak.LoRA(r=8, scaling="rslora"), ["q_proj", "o_proj"])  # mixed ranks and targets
    ak.attach(model, "c", ak.LoRA(r=4), ["q_proj", "v_proj", "down_proj"])
    for i, name in enumerate("abc"):
        randomize(model, name, scale=0.2, seed=i)
    return model


def _alone(model, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    rows = []
    for row, name in zip(ids, names):
        with ak.use(model, *([name] if name else [])):
            rows.append(model(input_ids=row[None]).logits[0])
    return torch.stack(rows)


@torch.no_grad()
def test_mixed_batch_equals_each_example_alone() -> None:
    model = _llama_with_adapters()
    names = ["b", None, "a", "c", "a", None, "b", "c"]
    ids = tokens(batch=len(names), length=10)
    with ak.use(model, ak.Select(names)):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, _alone(model, ids, names), atol=1e-5, rtol=1e-5)
    with ak.use(model):
        base = model(input_ids=ids).logits
    assert torch.equal(mixed[1], base[1]) or torch.allclose(mixed[1], base[1], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("names", [["c", "a", "b"], ["a", "b", "a", "b"], ["a", "a", "b"]])
def test_beam_rows_repeat_their_example_adapter(names: list[str]) -> None:
    """A batch of k rows per example (beam search's layout) uses each example's adapter on its k rows, through the
    grouped path (equal groups, sorted or not) and the gathered one (unequal groups)."""
    model = _llama_with_adapters()
    for name in "abc":  # equal ranks: every slot's factors stack without padding
        ak.detach(model, name)
        ak.attach(model, name, ak.LoRA(r=4), ["q_proj", "v_proj", "down_proj"])
        randomize(model, name, scale=0.2, seed=ord(name))
    ids = tokens(batch=len(names), length=7).repeat_interleave(2, dim=0)  # 2 beams per example
    with ak.use(model, ak.Select(names)):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, _alone(model, ids, [n for n in names for _ in range(2)]), atol=1e-5,
                               rtol=1e-5)


@torch.no_grad()
def test_other_methods_fall_back_per_adapter() -> None:
    model = make_tiny("llama")
    ak.attach(model, "lora", ak.LoRA(r=4), ["q_proj"])
    ak.attach(model, "dora", ak.DoRA(r=2), ["q_proj"])
    ak.attach(model, "ia3_in", ak.IA3(position="input"), ["down_proj"])
    ak.attach(model, "bn", ak.SeqBottleneck(hidden=4), ["mlp"])
    for name in ("lora", "dora", "ia3_in", "bn"):
        randomize(model, name, scale=0.2)
    names = ["bn", "lora", None, "ia3_in", "dora", "lora"]
    ids = tokens(batch=len(names), length=6)
    with ak.use(model, ak.Select(names)):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, _alone(model, ids, names), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_with_per_example_adapters() -> None:
    model = make_tiny("gpt2")
    ak.attach(model, "x", ak.LoRA(r=4), ["c_attn", "c_fc"])
    ak.attach(model, "y", ak.LoRA(r=2), ["c_attn"])
    randomize(model, "x", scale=0.5, seed=1)
    randomize(model, "y", scale=0.5, seed=2)
    names = ["x", "y", None, "x"]
    ids = tokens(batch=4, length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with ak.use(model, ak.Select(names)):
        together = model.generate(ids, **kwargs)
    for row, name in enumerate(names):
        with ak.use(model, *([name] if name else [])):
            assert torch.equal(model.generate(ids[row:row + 1], **kwargs)[0], together[row])


@torch.no_grad()
def test_classifier_rows() -> None:
    model = make_tiny("bert")
    ak.attach(model, "p", ak.LoRA(r=2), ["query", "value"])
    ak.attach(model, "q", ak.LoRA(r=3), ["query"])
    randomize(model, "p", scale=0.3)
    randomize(model, "q", scale=0.3, seed=4)
    names = ["q", "p", "p", None]
    ids = tokens(batch=4)
    with ak.use(model, ak.Select(names)):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, _alone(model, ids, names), atol=1e-5, rtol=1e-5)


def test_gathered_lora_against_float64_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen)) for r in (1, 3, 2)]
    x = torch.randn(7, 4, 6, generator=gen)
    slots = torch.tensor([2, 0, 3, 1, 1, 0, 3])  # 3 = the zero slot
    a_stack, b_stack = stack_factors([*pairs], x)
    got = gathered_lora(x, a_stack, b_stack, slots)
    for row, slot in enumerate(slots.tolist()):
        expected = torch.zeros(4, 5, dtype=torch.float64)
        if slot < 3:
            a, b = pairs[slot]
            expected = x[row].double() @ a.double().T @ b.double().T
        torch.testing.assert_close(got[row].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots,identity", [
    ([0, 1, 2, 3], True),  # each row its own slot, in order: a view of the stacks, nothing moved
    ([3, 1, 0, 2], False),  # the same, shuffled: rows placed by slot, run grouped, put back
    ([1, 1, 0, 0, 2, 2], False),  # two rows per slot
    ([0, 0, 1], False),  # unequal groups: padded to the largest
    ([0, 2], True),  # slots not contiguous: the used slots' stacks picked, rows as they are
    ([3, 0, 0, 0, 2, 0], False),  # very unequal, with rows of no adapter (slot 3)
])
@pytest.mark.parametrize("tokens_per_row", [1, 4])
def test_grouped_rows_equal_the_gathered_path(slots: list[int], identity: bool, tokens_per_row: int) -> None:
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen)) for r in (1, 3, 2)]
    x = torch.randn(len(slots), tokens_per_row, 6, generator=gen)
    a_stack, b_stack = stack_factors([*pairs], x)  # slot 3 = no adapter (zeros)
    index = torch.tensor(slots)
    groups = segments(index)
    assert groups is not None and (groups.dest is None) == identity
    from adapterkit.ops.gathered import _grouped

    flat = x.reshape(len(slots), -1, 6)
    torch.testing.assert_close(_grouped(flat, a_stack, b_stack, groups),
                               gathered_lora(x, a_stack, b_stack, index), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gathered_lora(x, a_stack, b_stack, index, groups),
                               gathered_lora(x, a_stack, b_stack, index), atol=1e-6, rtol=1e-6)


def test_select_errors_and_json() -> None:
    model = _llama_with_adapters()
    with pytest.raises(ak.NameInUseError, match="no adapter named 'zz'"):
        with ak.use(model, ak.Select(["a", "zz"])):
            pass
    ak.merge(model, "a")
    with pytest.raises(ak.AdapterKitError, match="merged"):
        with ak.use(model, ak.Select(["a", None])):
            pass
    with pytest.raises(ak.SpecError):
        ak.Select([])
    block = ak.Select(["a", None, "b"])
    from adapterkit.core.blocks import block_from_dict

    assert block_from_dict(block.to_dict()) == block
    with pytest.raises(ValueError, match="3 rows"):
        ak.unmerge(model, "a")
        with ak.use(model, ak.Select(["a", "b", "c"])), torch.no_grad():
            model(input_ids=tokens(batch=4))

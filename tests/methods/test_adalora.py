"""AdaLoRA against peft 0.21.2: the same weights give the same outputs and gradients (BERT Linear, GPT-2 Conv1D), the
orthogonality penalty is peft's, the rank allocator keeps the same triplets at every step on the same gradients, a
pruned adapter saves, loads, merges and travels through peft's format exactly, and the training loop runs the
schedule by itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.core.errors import SpecError
from adapterkit.inject.engine import placements
from adapterkit.interop.peft_tuners import export_peft_tuner, import_peft_tuner
from adapterkit.methods.adalora import AdaLoRA
from adapterkit.train.adalora_schedule import RankAllocator
from adapterkit.train.data import TextTable
from adapterkit.train.loop import TrainConfig, run_training, training_hooks
from tests.conftest import logits, make_tiny, tokens
from tests.methods.peft_pairs import check_parity, pair, tensor_pairs

peft = pytest.importorskip("peft")

BERT = ["query", "value"]


def _pair(kind: str, targets: list[str], seed: int = 0, **fields):
    """(base, ours, peft model) with identical random A, E, B (E random too, so the update is not zero)."""
    spec = AdaLoRA(**fields)
    config = peft.AdaLoraConfig(target_modules=targets, init_r=spec.init_r, target_r=spec.target_r,
                                lora_alpha=spec.alpha, tinit=spec.tinit, tfinal=spec.tfinal, deltaT=spec.deltaT,
                                beta1=spec.beta1, beta2=spec.beta2, orth_reg_weight=spec.orth_reg_weight,
                                total_step=spec.total_step or 10)
    base = make_tiny(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out note for GPT-2's Conv1D
        ours, theirs = pair(base, config, spec, targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (mine, peft_t) in tensor_pairs(ours, theirs):
            peft_t.add_(torch.randn(peft_t.shape, generator=generator) * 0.3)
            mine.copy_(peft_t)
    return base, ours, theirs


@pytest.mark.parametrize("kind,targets", [("bert", BERT), ("gpt2", ["c_attn", "c_fc"])])
def test_outputs_and_gradients_match_peft(kind, targets) -> None:
    base, ours, theirs = _pair(kind, targets, init_r=4, target_r=2, alpha=6.0)
    check_parity(base, ours, theirs)


def test_orthogonal_penalty_and_its_gradients_match_peft() -> None:
    _, ours, theirs = _pair("bert", BERT, init_r=4, target_r=2, orth_reg_weight=0.3, total_step=10)
    ids, labels = tokens(batch=3, length=12), torch.tensor([0, 2, 1])
    out = theirs.base_model(input_ids=ids, labels=labels)  # AdaLoraModel.forward adds the penalty to a loss
    peft_penalty = out.loss - F.cross_entropy(out.logits, labels)
    allocator = RankAllocator(ours, "a")
    mine = ours(input_ids=ids, labels=labels).loss + allocator.extra_loss(ours)
    penalty = allocator.extra_loss(ours)
    assert penalty is not None and penalty.item() > 0.1
    assert abs(penalty.item() - peft_penalty.item()) <= 1e-5
    out.loss.backward()
    mine.backward()
    for name, (ours_t, peft_t) in tensor_pairs(ours, theirs):
        torch.testing.assert_close(ours_t.grad, peft_t.grad, atol=1e-6, rtol=1e-4, msg=name)


def _train_both(ours, theirs, steps: int, allocator: RankAllocator) -> list[tuple[int, dict | None]]:
    """peft's loop on ``theirs``; ours gets peft's gradients and the same SGD step, then its own allocation. Checks
    that after every step both hold bit-identical A, E, B and keep the same triplets; returns our (budget, pattern)."""
    pairs = tensor_pairs(ours, theirs)
    opt_peft = torch.optim.SGD([p for _, (_, p) in pairs], lr=0.5)
    opt_ours = torch.optim.SGD([p for _, (p, _) in pairs], lr=0.5)
    results = []
    for step in range(steps):
        ids = tokens(batch=4, length=10, seed=step)
        labels = torch.tensor([0, 1, 2, step % 3])
        theirs.base_model(input_ids=ids, labels=labels).loss.backward()  # with peft's orthogonality penalty
        for _, (mine, peft_t) in pairs:
            mine.grad = peft_t.grad.clone()
        opt_peft.step()
        opt_ours.step()
        theirs.base_model.update_and_allocate(step)
        results.append(allocator.update_and_allocate(ours, step))
        for name, (mine, peft_t) in pairs:
            assert torch.equal(mine, peft_t), (step, name)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            peft_masks = {k.split(".lora_E")[0]: v for k, v in pattern.items()}
            assert peft_masks == allocator.rank_pattern(), step
        opt_peft.zero_grad()
        opt_ours.zero_grad()
    return results


def test_allocator_keeps_the_same_triplets_as_peft_at_every_step(tmp_path) -> None:
    fields = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    _, ours, theirs = _pair("bert", BERT, **fields)
    allocator = RankAllocator(ours, "a")
    peft_allocator = theirs.base_model.rankallocator
    assert (allocator.init_budget, allocator.target_budget) == (peft_allocator.init_bgt, peft_allocator.target_bgt)
    for step in range(16):
        assert allocator.budget_schedule(step) == peft_allocator.budget_schedule(step), step
    results = _train_both(ours, theirs, 14, allocator)
    budgets = [b for b, _ in results]
    assert budgets[:3] == [16, 16, 16] and budgets[9:] == [8] * 5 and budgets[3] < 16  # warm-up, cubic, final
    allocated = [step for step, (_, pattern) in enumerate(results) if pattern is not None]
    assert allocated == [4, 6, 8, 9]  # every deltaT steps in the budgeting phase, then the final one at T - tfinal
    kept = allocator.rank_pattern()
    assert sum(map(sum, kept.values())) == 8 and len({sum(v) for v in kept.values()}) > 1  # uneven ranks
    for path, _, host in placements(ours, "a"):
        adapter = host.adapter("a")
        assert adapter.rank() == sum(kept[path])
        assert torch.all(adapter.lora_e[~adapter.rank_mask] == 0)
        assert torch.all(adapter.lora_e[adapter.rank_mask] != 0)


def _pruned():
    """(ours, theirs) after a short run that pruned to target_r = 2 on average (peft and ours in step)."""
    _, ours, theirs = _pair("bert", BERT, init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8)
    _train_both(ours, theirs, 8, RankAllocator(ours, "a"))
    return ours, theirs


def test_pruned_adapter_saves_loads_and_merges_exactly(tmp_path) -> None:
    ours, _ = _pruned()
    ids = tokens(batch=3, length=12)
    expected = logits(ours, ids)
    masks = {p: h.adapter("a").rank_mask.clone() for p, _, h in placements(ours, "a")}
    assert not all(bool(m.all()) for m in masks.values())
    ak.save(ours, tmp_path / "ad")
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, ids), expected)
    for path, _, host in placements(fresh, "a"):
        assert torch.equal(host.adapter("a").rank_mask, masks[path])
    ak.merge(fresh, "a")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-5, rtol=1e-5)
    ak.unmerge(fresh, "a")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-6, rtol=1e-6)


def test_pruned_export_loads_in_peft_and_peft_s_save_imports(tmp_path) -> None:
    ours, theirs = _pruned()
    ids = tokens(batch=3, length=12)
    expected = logits(ours, ids)
    export_peft_tuner(ours, "a", tmp_path / "p")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(make_tiny("bert"), tmp_path / "p").eval()
    # every key is peft's; peft 0.21.2 reads an AdaLoRA rank_pattern's keys as LoRA rank patterns too and warns that
    # they match no module, for its own save_pretrained folders as well (checked below)
    odd = [str(w.message) for w in caught if "peft" in w.filename and "rank_pattern keys did not match" not in
           str(w.message)]
    assert not odd, odd
    assert loaded.peft_config["default"].rank_pattern  # peft holds only the kept triplets
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    back = make_tiny("bert")
    import_peft_tuner(back, tmp_path / "p", "b")
    torch.testing.assert_close(logits(back, ids), expected, atol=1e-6, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")  # peft's own folder: truncated tensors and its rank_pattern
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        peft.PeftModel.from_pretrained(make_tiny("bert"), tmp_path / "peft")
    mine = make_tiny("bert")
    import_peft_tuner(mine, tmp_path / "peft")
    with torch.no_grad():
        assert (logits(mine, ids) - theirs(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_unpruned_conv1d_export_loads_in_peft(tmp_path) -> None:
    _, ours, _ = _pair("gpt2", ["c_attn"], init_r=3, target_r=1)
    ids = tokens(batch=2, length=9)
    export_peft_tuner(ours, "a", tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make_tiny("gpt2"), tmp_path / "p").eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - logits(ours, ids)).abs().max().item() <= 1e-5


def test_bad_specs_and_schedules_are_one_line_errors() -> None:
    with pytest.raises(SpecError, match=r"target_r 5 must be in \[0, init_r = 4\]") as info:
        AdaLoRA(init_r=4, target_r=5)
    with pytest.raises(SpecError, match="tinit 5 \\+ tfinal 5 must be < total_step 10") as info2:
        AdaLoRA(tinit=5, tfinal=5, total_step=10)
    assert "\n" not in str(info.value) + str(info2.value)
    model = make_tiny("bert")
    ak.attach(model, "a", AdaLoRA(tinit=5, tfinal=5), BERT)
    with pytest.raises(SpecError, match="no total_step"):
        RankAllocator(model, "a")
    with pytest.raises(SpecError, match="must be < total_step 8"):  # the loop's total is checked the same way
        RankAllocator(model, "a", total_steps=8)


class _CharTokenizer:
    """Enough of a tokenizer for run_training: one id per character."""

    pad_token_id = 0

    def __call__(self, texts, pairs=None, truncation=True, max_length=64):
        return {"input_ids": [[1] + [2 + ord(c) % 97 for c in t][: max_length - 1] for t in texts]}


def test_training_loop_runs_the_schedule_with_its_own_total() -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", AdaLoRA(init_r=4, target_r=2, tinit=2, tfinal=3), BERT)
    ak.train_only(model, "a", also=["classifier"])
    hooks = training_hooks(model, 12)
    assert len(hooks) == 1 and isinstance(hooks[0], RankAllocator) and hooks[0].total == 12
    rows = [f"text number {i} " * (1 + i % 3) for i in range(48)]
    table = TextTable(rows, None, [i % 3 for i in range(48)])
    config = TrainConfig(epochs=1, batch_size=4, lr=5e-3, warmup=0.0, seed=0, head=["classifier"])
    history, _ = run_training(model, _CharTokenizer(), table, table, config)
    assert history["step"][-1] == 12
    kept = [h.adapter("a").rank_mask for _, _, h in placements(model, "a")]
    assert sum(int(m.sum()) for m in kept) == 2 * len(kept)  # the final allocation at step 12 - tfinal ran
    for _, _, host in placements(model, "a"):
        adapter = host.adapter("a")
        assert torch.all(adapter.lora_e[~adapter.rank_mask] == 0)  # and the last steps re-applied its mask
    frozen = copy.deepcopy(model)
    for param in frozen.parameters():
        param.requires_grad_(False)
    assert training_hooks(frozen, 12) == []  # an adapter that does not train gets no schedule


def test_sft_loop_runs_the_schedule_too() -> None:
    from adapterkit.train.sft import SFTConfig, run_sft
    from tests.train.test_sft import Tok, _data

    model = make_tiny("llama")
    ak.attach(model, "a", AdaLoRA(init_r=4, target_r=2, tinit=2, tfinal=3), ["q_proj", "v_proj"])
    ak.train_only(model, "a")
    config = SFTConfig(epochs=1, batch_size=2, lr=5e-3, seed=0, samples=0, grad_accum=2)
    trained = run_sft(model, Tok(), _data(24), _data(4, seed=1), config)
    assert trained["history"]["step"][-1] == 12
    kept = [h.adapter("a").rank_mask for _, _, h in placements(model, "a")]
    assert sum(int(m.sum()) for m in kept) == 2 * len(kept)  # the budget was reached inside run_sft

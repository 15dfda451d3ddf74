"""The SFT loop: log-probs through the output layer at labelled positions equal the full forward's (and HF's loss),
length-grouped batches, token-weighted loss under gradient accumulation, resume equality, dev loss, batched
greedy generation, and fit_sft with LoRA / DoRA / IA3 / QLoRA writing a complete run folder."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tests.conftest import make_smollm2, make_tiny

import adapterkit as ak
from adapterkit.train.sft import (
    Batch,
    SFTConfig,
    collate,
    dev_loss,
    fit_sft,
    generate,
    length_grouped,
    padding_share,
    run_sft,
    token_logprobs,
)
from adapterkit.train.sft_data import IGNORE, Tokenized


class Tok:
    """What the loop needs of a tokenizer when no samples are generated."""

    pad_token_id = 0
    eos_token_id = 1


def _data(n: int = 12, seed: int = 0) -> Tokenized:
    """Random sequences of varied length; the second half of each is the 'answer'."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        seq = [rng.randrange(2, 100) for _ in range(rng.randrange(4, 20))]
        half = len(seq) // 2
        ids.append(seq)
        labels.append([IGNORE] * half + seq[half:])
    return Tokenized(ids, labels, [f"row {i}" for i in range(n)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_labelled_positions_only_equal_the_full_forward_and_hf_loss(kind):
    model = make_tiny(kind)
    data = _data()
    batch = collate(data, list(range(6)), pad_id=0)
    logp, where = token_logprobs(model, batch)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1], -1)
        hf_loss = model(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels).loss
    expected = full[where[:, 0], where[:, 1]].gather(1, batch.labels[:, 1:][where[:, 0], where[:, 1]][:, None])[:, 0]
    assert logp.shape[0] == batch.tokens == sum(len([x for x in lab[1:] if x != IGNORE]) for lab in data.labels[:6])
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-logp.mean(), hf_loss, atol=1e-5, rtol=1e-5)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    lengths = [random.Random(i).randrange(5, 500) for i in range(1000)]
    plan = length_grouped(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for rows in plan for i in rows) == list(range(1000))
    assert all(len(rows) <= 8 for rows in plan)
    assert plan == length_grouped(lengths, 8, torch.Generator().manual_seed(0))  # seeded
    data = Tokenized([[1] * n for n in lengths], [[1] * n for n in lengths], [])
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    random_plan = [order[i:i + 8] for i in range(0, 1000, 8)]
    grouped, plain = padding_share(data, plan), padding_share(data, random_plan)
    assert grouped < 0.05 < 0.3 < plain


def _trained(config: SFTConfig, data: Tokenized, method=None, out=None, resume=False, seed=0):
    model = make_tiny("llama")
    torch.manual_seed(seed)
    ak.attach(model, "a", method or ak.LoRA(r=4), ["q_proj", "v_proj", "down_proj"])
    ak.train_only(model, "a")
    result = run_sft(model, Tok(), data, data, config, out=out, resume=resume)
    return model, result


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_gradient_accumulation_gives_the_same_token_weighted_update():
    data = _data(16)
    config = SFTConfig(batch_size=8, max_steps=2, lr=1e-2, samples=0)
    one, _ = _trained(config, data)
    two, _ = _trained(SFTConfig(batch_size=8, max_steps=2, lr=1e-2, samples=0, grad_accum=3), data)
    a, b = _adapter_state(one), _adapter_state(two)
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    data = _data(24)
    config = SFTConfig(batch_size=4, epochs=2, lr=1e-2, samples=0, checkpoint_every=2)
    whole, whole_result = _trained(config, data, out=tmp_path / "whole")
    from adapterkit.train import sft

    calls = {"n": 0}
    real = sft.token_logprobs

    def crash_on_the_fifth(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # after step 4's checkpoint
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(sft, "token_logprobs", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _trained(config, data, out=tmp_path / "cut")
    monkeypatch.setattr(sft, "token_logprobs", real)
    resumed, resumed_result = _trained(config, data, out=tmp_path / "cut", resume=True, seed=5)
    for key, value in _adapter_state(whole).items():
        torch.testing.assert_close(_adapter_state(resumed)[key], value, atol=0, rtol=0)
    assert resumed_result["history"]["loss"] == whole_result["history"]["loss"]
    assert resumed_result["history"]["dev_loss"] == whole_result["history"]["dev_loss"]


def test_dev_loss_is_token_weighted_over_labelled_tokens():
    model = make_tiny("llama")
    data = _data(7)
    scores = dev_loss(model, data, batch_size=3, pad_id=0)
    total, count = 0.0, 0
    for i in range(len(data)):  # each example alone, no padding
        batch = Batch(torch.tensor([data.ids[i]]), torch.ones(1, len(data.ids[i]), dtype=torch.long),
                      torch.tensor([data.labels[i]]))
        with torch.no_grad():
            loss = model(input_ids=batch.ids, labels=batch.labels).loss
        total += float(loss) * batch.tokens
        count += batch.tokens
    assert scores["tokens"] == count
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_training_lowers_the_loss():
    prompts = _data(8).ids
    data = Tokenized([p + [7, 8, 9, 7, 8, 9] for p in prompts], [[IGNORE] * len(p) + [7, 8, 9, 7, 8, 9]
                                                               for p in prompts], [])  # one answer to learn
    config = SFTConfig(batch_size=4, epochs=15, lr=2e-2, samples=0)
    model = make_tiny("llama")
    before = dev_loss(model, data, 8, 0)["loss"]
    ak.attach(model, "a", ak.LoRA(r=8), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ak.train_only(model, "a")
    result = run_sft(model, Tok(), data, data, config)
    # a tiny random model's logits are bounded (final norm, 0.02-scale output layer): ln(100) = 4.6 falls slowly
    assert result["history"]["dev_loss"][-1] < before - 0.3
    assert len(result["history"]["dev_loss"]) == 15 and result["stats"]["label_tokens"] > 0


def test_batched_greedy_generation_equals_one_prompt_at_a_time(smollm2_path):
    model, tok = make_smollm2()
    prompts = [tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("What is 2 + 2?", "Name a colour of the sky on a clear summer day, please.")]
    together = generate(model, tok, prompts, 8)
    alone = [generate(model, tok, [p], 8)[0] for p in prompts]
    assert together == alone and all(together)


@pytest.mark.parametrize("method, quantize", [(ak.LoRA(r=4), None), (ak.DoRA(r=4), None), (ak.IA3(), None),
                                              (ak.LoRA(r=4), "nf4")])
def test_fit_sft_writes_a_complete_run(tmp_path, method, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    data = _data(10)
    model = make_tiny("llama")
    config = SFTConfig(batch_size=4, max_steps=3, samples=0, quantize=quantize)
    metrics = fit_sft(model, Tok(), method, ["k_proj", "v_proj", "down_proj"], data, data, config, tmp_path,
                      {"model": "tiny", "data": "random"})
    for name in ("adapter/adapter.json", "metrics.json", "run.json", "training_curve.png"):
        assert (tmp_path / name).is_file(), name
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["task"] == "causal-lm" and record["config"]["quantize"] == quantize
    assert record["method"]["method"] == method.to_dict()["method"]
    assert metrics["steps"] == 3 and 0 <= metrics["padding_share"] < 1 and metrics["dev_loss"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["dev_perplexity"] == metrics["dev_perplexity"]


@pytest.mark.parametrize("setting", [{"gradient_checkpointing": True}, {"gradient_checkpointing": "selective"},
                                     {"precision": "bf16"}])
def test_memory_and_precision_options_train_the_same_adapter(setting):
    data = _data(8)
    plain, _ = _trained(SFTConfig(batch_size=4, max_steps=2, lr=1e-2, samples=0), data)
    other, result = _trained(SFTConfig(batch_size=4, max_steps=2, lr=1e-2, samples=0, **setting), data)
    tolerance = 2e-2 if setting.get("precision") == "bf16" else 1e-5  # bf16 rounds the compute, not the weights
    for key, value in _adapter_state(plain).items():
        torch.testing.assert_close(_adapter_state(other)[key], value, atol=tolerance, rtol=tolerance)
    assert all(v.dtype == torch.float32 for v in _adapter_state(other).values())
    assert other.model.gradient_checkpointing == bool(setting.get("gradient_checkpointing"))

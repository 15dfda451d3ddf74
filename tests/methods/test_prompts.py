"""Prompt tuning, P-tuning and prefix tuning: peft's outputs and losses for the same weights, generation with a KV
cache equal to running the whole sequence without one, and the one-line errors."""

from __future__ import annotations

import pytest
import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, SpecError, TargetError
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, tokens

N = 4


def _adapter(model, name: str = "p"):
    return placements(model, name)[0][2].adapter(name)


def _mask(ids: torch.Tensor, pad: int) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on the first row
    return mask


def _peft(kind: str, config_cls, **fields):
    task = TaskType.SEQ_CLS if kind == "bert" else TaskType.CAUSAL_LM
    return get_peft_model(make_tiny(kind), config_cls(task_type=task, num_virtual_tokens=N, **fields))


def _copy_prompt(ours, theirs) -> None:
    with torch.no_grad():
        theirs.embedding.weight.copy_(ours.prompt.weight)


def _copy_encoder(ours, theirs) -> None:
    """Our PromptEncoder's tensors into peft's (same layout: embedding, lstm_head, mlp_head)."""
    with torch.no_grad():
        theirs.embedding.weight.copy_(ours.prompt.embedding.weight)
        if ours.prompt.lstm is not None:
            theirs.lstm_head.load_state_dict(ours.prompt.lstm.state_dict())
        theirs.mlp_head.load_state_dict(ours.prompt.head.state_dict())


def _copy_prefix(ours, theirs) -> None:
    with torch.no_grad():
        theirs.embedding.weight.copy_(ours.embedding)
        if ours.mlp is not None:
            theirs.transform.load_state_dict(ours.mlp.state_dict())


CASES = [
    ("prompt", ak.methods.PromptTuning(n_tokens=N, init="random"), PromptTuningConfig, {}, _copy_prompt),
    ("ptuning-mlp", ak.methods.PTuning(n_tokens=N, hidden=16), PromptEncoderConfig,
     {"encoder_hidden_size": 16, "encoder_reparameterization_type": "MLP"}, _copy_encoder),
    ("ptuning-lstm", ak.methods.PTuning(n_tokens=N, encoder="lstm", hidden=8), PromptEncoderConfig,
     {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM", "encoder_dropout": 0.0}, _copy_encoder),
    ("prefix", ak.methods.PrefixTuning(n_tokens=N), PrefixTuningConfig, {}, _copy_prefix),
    ("prefix-mlp", ak.methods.PrefixTuning(n_tokens=N, projection="mlp", hidden=12), PrefixTuningConfig,
     {"prefix_projection": True, "encoder_hidden_size": 12}, _copy_prefix),
]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("case,spec,config_cls,fields,copy", CASES, ids=[c[0] for c in CASES])
def test_outputs_and_loss_equal_peft(kind, case, spec, config_cls, fields, copy) -> None:
    ours = make_tiny(kind)
    ak.attach(ours, "p", spec)
    theirs = _peft(kind, config_cls, **fields)
    copy(_adapter(ours), theirs.prompt_encoder["default"])
    ids = tokens()
    mask = _mask(ids, 0 if kind == "bert" else 2)
    labels = torch.tensor([0, 2]) if kind == "bert" else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
        want = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    expected = want.logits if kind == "bert" or case.startswith("prefix") else want.logits[:, N:]
    assert got.logits.shape == expected.shape  # prompt methods: the virtual positions are removed for the caller
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


def test_gradients_reach_only_the_prompt_and_equal_peft() -> None:
    ours = make_tiny("llama")
    ak.attach(ours, "p", ak.methods.PrefixTuning(n_tokens=N, projection="mlp", hidden=12))
    ak.train_only(ours, "p")
    theirs = _peft("llama", PrefixTuningConfig, prefix_projection=True, encoder_hidden_size=12)
    _copy_prefix(_adapter(ours), theirs.prompt_encoder["default"])
    ids = tokens()
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    mine = _adapter(ours)
    torch.testing.assert_close(mine.embedding.grad, theirs.prompt_encoder["default"].embedding.weight.grad,
                               atol=1e-6, rtol=0)
    assert all(p.grad is None for n, p in ours.named_parameters() if "adapterkit" not in n)


def _greedy_without_cache(model, ids, mask, steps: int, positions: bool = False) -> torch.Tensor:
    """Greedy decoding that runs the whole sequence every step (no KV cache)."""
    seq, msk = ids, mask
    for _ in range(steps):
        pos = (msk.long().cumsum(-1) - 1).masked_fill(msk == 0, 1) if positions else None
        step = model(input_ids=seq, attention_mask=msk, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = step.argmax(-1, keepdim=True)
        seq, msk = torch.cat([seq, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    return seq


GENERATE = [ak.methods.PromptTuning(n_tokens=3, init="random"), ak.methods.PTuning(n_tokens=3, encoder="lstm"),
            ak.methods.PrefixTuning(n_tokens=3), ak.methods.PrefixTuning(n_tokens=3, projection="mlp"),
            ak.methods.PrefixTuning(n_tokens=3, positions="kept")]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("spec", GENERATE, ids=lambda s: "-".join(str(v) for v in s.to_dict().values()))
def test_generate_with_cache_equals_the_full_sequence(kind, pad, spec) -> None:
    model = make_tiny(kind)
    ak.attach(model, "p", spec)
    model.generation_config.eos_token_id = None  # decode all steps: the reference does not stop at an end token
    ids = tokens(length=5)
    mask = _mask(ids, pad)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
        # generate numbers a GPT-2's left-padded rows from the mask; the prefix's keys carry no position, so the
        # reference must number them the same way (prompt methods let the model number the n + T positions)
        positions = spec.method == "prefix_tuning" and kind == "gpt2"
        full = _greedy_without_cache(model, ids, mask, 6, positions)
    assert torch.equal(cached, full)


def test_the_prompt_goes_in_once_per_sequence() -> None:
    """A manual decode loop over the returned cache gives the same logits as the whole sequence at once."""
    model = make_tiny("llama")
    ak.attach(model, "p", ak.methods.PromptTuning(n_tokens=N, init="random"))
    ids = tokens(length=6)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], past_key_values=first.past_key_values,
                     attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, atol=1e-5, rtol=0)


def test_save_load_and_detach() -> None:
    model = make_tiny("llama")
    ids = tokens()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    ak.attach(model, "p", ak.methods.PTuning(n_tokens=N))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        ak.save(model, folder, "p")
        other = make_tiny("llama")
        ak.load(other, folder)
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, adapted)
    ak.detach(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


def test_bad_input_gets_one_line() -> None:
    model = make_tiny("llama")  # 64 positions
    with pytest.raises(AdapterKitError, match="64 virtual tokens.*exceed the model's context of 64"):
        ak.attach(model, "p", ak.methods.PrefixTuning(n_tokens=64))
    ak.attach(model, "p", ak.methods.PrefixTuning(n_tokens=60))
    with pytest.raises(AdapterKitError, match=r"60 virtual tokens \+ 8 tokens exceed the model's context of 64"):
        model(input_ids=tokens())
    with pytest.raises(AdapterKitError, match="cannot run per example or inside a block"):
        with ak.use(model, ak.Select(["p", None])):
            pass
    model.train()
    model.gradient_checkpointing_enable()
    with pytest.raises(AdapterKitError, match="gradient checkpointing makes transformers drop the KV cache"):
        model(input_ids=tokens(length=2))
    model.gradient_checkpointing_disable()
    model.eval()
    with pytest.raises(TargetError, match="places itself"):
        ak.attach(model, "q", ak.methods.PromptTuning(n_tokens=2), targets=["q_proj"])
    with pytest.raises(SpecError, match="n_tokens must be a positive integer"):
        ak.methods.PromptTuning(n_tokens=0)
    with pytest.raises(SpecError, match="init='text' needs init_ids"):
        ak.methods.PromptTuning(init="text")
    with pytest.raises(TargetError, match=r"init_ids must lie in \[0, 100\)"):
        ak.attach(make_tiny("gpt2"), "p", ak.methods.PromptTuning(n_tokens=2, init="text", init_ids=(100,)))
    with pytest.raises(TargetError, match="no module of this Linear takes 'inputs_embeds'"):
        ak.attach(torch.nn.Linear(2, 2), "p", ak.methods.PromptTuning())


class _LMRows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(5, 40, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.ids[i]}


@pytest.mark.parametrize("spec", [ak.methods.PromptTuning(n_tokens=3), ak.methods.PrefixTuning(n_tokens=3)],
                         ids=lambda s: s.method)
def test_hf_trainer_trains_it_and_compute_metrics_sees_aligned_logits(tmp_path, spec) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = make_tiny("gpt2")
    ak.attach(model, "p", spec)
    ak.train_only(model, "p")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    shapes = []

    def metrics(pred) -> dict[str, float]:
        shapes.append((pred.predictions.shape, pred.label_ids.shape))
        return {"n": 0.0}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_LMRows(12), eval_dataset=_LMRows(4),
                      compute_metrics=metrics)
    trainer.train()
    trainer.evaluate()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert shapes == [((4, 8, 100), (4, 8))]  # per input token, as the labels: no virtual positions


def test_prefix_with_kept_positions_equals_adapterhub_prefix_tuning() -> None:
    """AdapterHub's prefix sits inside BERT's attention, so its real tokens keep positions 0..T-1."""
    adapters = pytest.importorskip("adapters")
    ours = make_tiny("bert")
    ak.attach(ours, "p", ak.methods.PrefixTuning(n_tokens=N, projection="mlp", hidden=12, positions="kept"))
    shifted = make_tiny("bert")
    ak.attach(shifted, "p", ak.methods.PrefixTuning(n_tokens=N, projection="mlp", hidden=12))
    mine = _adapter(ours)
    _adapter(shifted).load_state_dict(mine.state_dict())
    theirs = make_tiny("bert")
    adapters.init(theirs)
    theirs.add_adapter("p", config=adapters.PrefixTuningConfig(prefix_length=N, bottleneck_size=12))
    theirs.set_active_adapters("p")
    theirs.eval()
    prefix = dict(theirs.named_modules())["bert.encoder.layer.0.attention.self.prefix_tuning.pool.prefix_tunings.p"
                                          ".self_prefix"]
    with torch.no_grad():
        prefix.wte.weight.copy_(mine.embedding)
        prefix.control_trans.load_state_dict(mine.mlp.state_dict())
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding, BERT's
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = theirs(input_ids=ids, attention_mask=mask).logits
        other = shifted(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (other - want).abs().max() > 1e-4  # peft's shifted positions are another function


@pytest.mark.parametrize("reentrant", [True, False])
def test_prompt_tuning_under_gradient_checkpointing_gives_the_same_gradients(reentrant) -> None:
    model = make_tiny("llama")
    ak.attach(model, "p", ak.methods.PromptTuning(n_tokens=3))
    ak.train_only(model, "p")
    model.train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = _adapter(model).prompt.weight.grad.clone()
    _adapter(model).prompt.weight.grad = None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(_adapter(model).prompt.weight.grad, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", [ak.methods.PromptTuning(n_tokens=3), ak.methods.PrefixTuning(n_tokens=3)],
                         ids=lambda s: s.method)
def test_the_sft_loop_runs_the_whole_model_so_the_prompt_trains(spec) -> None:
    """The SFT loop's shortcut (decoder body + head on the labelled rows only) would skip the model's own call."""
    from adapterkit.train.sft import Batch, token_logprobs

    model = make_tiny("llama")
    ak.attach(model, "p", spec)
    ak.train_only(model, "p")
    ids = tokens()
    labels = ids.clone()
    labels[:, :3] = -100
    logp, _ = token_logprobs(model, Batch(ids, torch.ones_like(ids), labels))
    logits = model(input_ids=ids).logits[:, :-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0][labels[:, 1:] != -100]
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)
    (-logp.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_from_real_tokens_equals_the_model_reading_them_first(kind) -> None:
    """init="text": P is the model's own cache for those tokens, so the adapted model on x equals the bare model on
    [tokens ; x] at x's positions (a causal LM; peft's shifted positions are exactly that)."""
    start = (5, 17, 42)
    model = make_tiny(kind)
    base = make_tiny(kind)
    ak.attach(model, "p", ak.methods.PrefixTuning(n_tokens=3, init="text", init_ids=start))
    ids = tokens(length=6)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        whole = base(input_ids=torch.cat([torch.tensor([start] * 2), ids], 1)).logits[:, 3:]
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=0)
    mlp = make_tiny(kind)
    ak.attach(mlp, "p", ak.methods.PrefixTuning(n_tokens=1, projection="mlp", init="text", init_ids=(5,)))
    with torch.no_grad():  # the MLP starts at weight 0, bias = the mean real key/value: one token, that token's
        torch.testing.assert_close(mlp(input_ids=ids).logits,
                                   base(input_ids=torch.cat([torch.tensor([[5]] * 2), ids], 1)).logits[:, 1:],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_a_second_prefix_starts_from_the_bare_model_not_through_the_first(kind):
    """The real-token start runs the model once; an active prefix adapter must not take part (it used to add its
    own n virtual tokens to the cache, and the second prefix failed to build or started from the wrong values)."""
    model = make_tiny(kind)
    torch.manual_seed(0)  # the same random real tokens for both
    ak.attach(model, "a", ak.methods.PrefixTuning(n_tokens=4))
    torch.manual_seed(0)
    ak.attach(model, "b", ak.methods.PrefixTuning(n_tokens=4))  # "a" is active while "b" initialises
    first, second = _adapter(model, "a").state_dict(), _adapter(model, "b").state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key

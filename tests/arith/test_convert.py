"""Converting mergeable adapters to LoRA and extracting a LoRA from a fine-tune: exact where the rank allows, the
Eckart-Young tail otherwise, a plain LoRA that saves, loads, merges and exports to peft, one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.arith.convert import ConvertError, extract_lora, to_lora
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import read_weight
from adapterkit.core.tree import placements
from adapterkit.methods.lt_sft import keep_top_k
from tests.conftest import logits, make_tiny, randomize, tokens

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # (32, 32), (16, 32), (32, 64): full rank 32 covers all


def _outputs(model: nn.Module, name: str) -> torch.Tensor:
    with ak.use(model, name):
        return logits(model, tokens())


def _sparse(model: nn.Module) -> None:
    """An LT-SFT diff with 300 random entries over the targets (the attach starts dense and zero)."""
    ak.attach(model, "src", ak.methods.LTSFT(k=300), LLAMA_TARGETS)
    randomize(model, "src", scale=0.3)
    keep_top_k(model, "src")
    randomize(model, "src", scale=0.3, seed=4)


def _source(model: nn.Module, kind: str) -> None:
    if kind == "lt_sft":
        _sparse(model)
        return
    spec = {"dora": ak.DoRA(r=4, alpha=8), "ia3_out": ak.IA3(), "ia3_in": ak.IA3(position="input")}[kind]
    ak.attach(model, "src", spec, LLAMA_TARGETS)
    randomize(model, "src", scale=0.3)


def _reference_deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """merge(W) - W per module, from ak.merge on a copy (the merge path the library already tests for outputs)."""
    merged = copy.deepcopy(model)
    ak.merge(merged, name)
    deltas = {}
    for path, module in model.named_modules():
        if any(path.endswith(t) for t in LLAMA_TARGETS):
            after = read_weight(dict(merged.named_modules())[path])[0].double()
            deltas[path] = after - read_weight(module)[0].double()
    return deltas


@pytest.mark.parametrize("kind,spec,targets", [
    ("llama", ak.LoRA(r=4, alpha=8), LLAMA_TARGETS),
    ("llama", ak.LoRA(r=3, alpha=5, scaling="rslora"), LLAMA_TARGETS),
    ("gpt2", ak.LoRA(r=2, alpha=4), ["c_attn", "c_proj"]),  # Conv1D: the transposed layout
])
def test_a_lora_converts_exactly_at_its_rank_and_above(kind, spec, targets) -> None:
    model = make_tiny(kind)
    ak.attach(model, "src", spec, targets)
    randomize(model, "src", scale=0.3)
    source = _outputs(model, "src")
    for rank in (spec.r, spec.r + 3):
        errors = to_lora(model, "src", rank)
        assert len(errors) == len(ak.explain(model, targets, spec).rows)
        assert max(errors.values()) < 1e-6, errors
        torch.testing.assert_close(_outputs(model, f"src_lora{rank}"), source, atol=1e-5, rtol=1e-5)
    assert max(to_lora(model, "src", spec.r - 1, new_name="lower").values()) > 1e-3  # a real rank-r delta


@pytest.mark.parametrize("kind", ["dora", "ia3_out", "ia3_in", "lt_sft"])
def test_conversion_error_is_the_svd_tail_and_full_rank_is_exact(kind) -> None:
    model = make_tiny("llama")
    _source(model, kind)
    reference = _reference_deltas(model, "src")
    source = _outputs(model, "src")
    previous: dict[str, float] = {}
    for rank in (1, 2, 4, 32):
        errors = to_lora(model, "src", rank)
        assert set(errors) == set(reference)
        for path, delta in reference.items():
            sigma = torch.linalg.svdvals(delta)
            tail = float(sigma[rank:].norm() / sigma.norm())  # Eckart-Young: the best rank-r error
            assert errors[path] == pytest.approx(tail, abs=1e-5), (path, rank)
            assert errors[path] <= previous.get(path, 1.0) + 1e-12
        if rank == 1:
            assert min(errors.values()) > 1e-2  # these deltas are not rank 1: the test can fail
        previous = errors
    assert max(previous.values()) < 1e-6
    torch.testing.assert_close(_outputs(model, "src_lora32"), source, atol=1e-5, rtol=1e-5)
    ak.merge(model, "src")  # converting left the source's merge bookkeeping as it was: it still merges and back
    ak.activate(model)
    torch.testing.assert_close(logits(model, tokens()), source, atol=1e-5, rtol=1e-5)
    ak.unmerge(model, "src")
    torch.testing.assert_close(_outputs(model, "src"), source, atol=1e-6, rtol=1e-6)


def test_the_result_is_a_plain_lora_that_saves_loads_and_merges(tmp_path) -> None:
    model = make_tiny("llama")
    _source(model, "dora")
    to_lora(model, "src", 32, new_name="plain")
    want = _outputs(model, "src")
    assert all(type(host.adapter("plain").spec) is ak.LoRA for _, _, host in placements(model, "plain"))
    ak.save(model, tmp_path / "plain", "plain")
    fresh = make_tiny("llama")
    assert ak.load(fresh, tmp_path / "plain") == "plain"
    torch.testing.assert_close(_outputs(fresh, "plain"), want, atol=1e-5, rtol=1e-5)
    ak.merge(fresh, "plain")
    torch.testing.assert_close(logits(fresh, tokens()), want, atol=1e-5, rtol=1e-5)
    ak.unmerge(fresh, "plain")
    ak.detach(fresh, "plain")
    assert not torch.allclose(logits(fresh, tokens()), want, atol=1e-3)  # the conversion did change the model


@pytest.mark.parametrize("kind,spec,targets,rank", [
    ("llama", ak.DoRA(r=4, alpha=8), LLAMA_TARGETS, 20),  # ranks 20 / 16 / 20: peft's rank_pattern
    ("gpt2", ak.IA3(position="input"), ["c_attn", "c_proj"], 32),  # Conv1D with biases (unchanged by input IA3)
])
def test_peft_loads_the_exported_conversion_with_the_same_outputs(kind, spec, targets, rank, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from adapterkit.interop.peft_format import export_peft

    base = make_tiny(kind)
    model = copy.deepcopy(base)
    ak.attach(model, "src", spec, targets)
    randomize(model, "src", scale=0.2)
    to_lora(model, "src", rank, new_name="lora")
    export_peft(model, "lora", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, tokens()), _outputs(model, "lora"), atol=1e-5, rtol=1e-5)


def _low_rank_finetune(base: nn.Module, paths: list[str], rank: int) -> nn.Module:
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for path, module in tuned.named_modules():
            if path in paths:
                out_f, in_f = module.weight.shape
                u = torch.randn(out_f, rank, generator=generator) * 0.2
                module.weight.add_(u @ torch.randn(rank, in_f, generator=generator) * 0.2)
    return tuned


def test_extract_lora_recovers_a_low_rank_finetune_exactly_at_its_rank() -> None:
    base = make_tiny("llama")
    paths = [p for p, _ in base.named_modules() if p.endswith(("q_proj", "down_proj"))]
    tuned = _low_rank_finetune(base, paths, 3)
    errors = extract_lora(base, tuned, ["q_proj", "down_proj"], 3, "x")
    assert set(errors) == set(paths) and max(errors.values()) < 1e-6
    torch.testing.assert_close(_outputs(base, "x"), logits(tuned, tokens()), atol=1e-5, rtol=1e-5)
    lower = extract_lora(base, tuned, ["q_proj", "down_proj"], 2, "y")
    for path in paths:
        delta = read_weight(dict(tuned.named_modules())[path])[0].double() - \
            read_weight(dict(base.named_modules())[path])[0].double()
        sigma = torch.linalg.svdvals(delta)
        assert lower[path] == pytest.approx(float(sigma[2:].norm() / sigma.norm()), abs=1e-6)
        assert lower[path] > 1e-2


def test_extract_lora_reads_conv1d_in_the_canonical_layout() -> None:
    base = make_tiny("gpt2")
    paths = [p for p, _ in base.named_modules() if p.endswith("attn.c_attn")]  # Conv1D, weight stored (in, out)
    tuned = _low_rank_finetune(base, paths, 2)
    errors = extract_lora(base, tuned, ["c_attn"], 2, "x")
    assert set(errors) == set(paths) and max(errors.values()) < 1e-6
    torch.testing.assert_close(_outputs(base, "x"), logits(tuned, tokens()), atol=1e-5, rtol=1e-5)


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_sources_are_refused_in_one_line() -> None:
    model = make_tiny("llama")
    ak.attach(model, "seq", ak.SeqBottleneck(), ["mlp"])
    with pytest.raises(ConvertError) as exc:
        to_lora(model, "seq", 4)
    _one_line(exc, "not mergeable")
    ak.attach(model, "emb", ak.LoRA(r=2), ["embed_tokens"])
    with pytest.raises(ConvertError) as exc:
        to_lora(model, "emb", 4)
    _one_line(exc, "embed_tokens", "Linear / Conv1D")
    ak.attach(model, "m", ak.LoRA(r=2), ["q_proj"])
    randomize(model, "m")
    ak.merge(model, "m")
    with pytest.raises(ConvertError) as exc:
        to_lora(model, "m", 2)
    _one_line(exc, "merged", "unmerge it first")
    ak.unmerge(model, "m")
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ConvertError) as exc:
            to_lora(model, "m", rank)  # type: ignore[arg-type]
        _one_line(exc, "rank must be a positive integer")
    with pytest.raises(ConvertError, match="bias must be one of"):
        to_lora(model, "m", 2, bias="keep")
    with pytest.raises(AdapterKitError, match="no adapter named 'nope'"):
        to_lora(model, "nope", 2)
    to_lora(model, "m", 2, new_name="taken")
    with pytest.raises(AdapterKitError, match="taken"):
        to_lora(model, "m", 2, new_name="taken")
    assert "m_lora2" not in ak.adapters(model)  # failed conversions attach nothing


def test_a_bias_change_is_refused_or_counted_in_the_error() -> None:
    model = make_tiny("bert")  # BERT's Linear layers have biases (initialised to zero: give them values)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.1)
    ak.attach(model, "bf", ak.BitFit(), ["query"])
    randomize(model, "bf")
    with pytest.raises(ConvertError) as exc:
        to_lora(model, "bf", 4)
    _one_line(exc, "bias", "a LoRA cannot hold", "bias='drop'")
    assert to_lora(model, "bf", 4, bias="drop") == pytest.approx({p: 1.0 for p in to_lora(model, "bf", 1,
                                                                  new_name="again", bias="drop")})
    ak.attach(model, "ia3", ak.IA3(), ["value"])  # output scaling scales the bias too
    randomize(model, "ia3", scale=0.3)
    with pytest.raises(ConvertError, match="also changes its bias"):
        to_lora(model, "ia3", 4)
    dropped = to_lora(model, "ia3", 32, bias="drop")
    for path, _, host in placements(model, "ia3"):
        module = dict(model.named_modules())[path]
        weight, bias = read_weight(module)
        with torch.no_grad():
            new_w, new_b = host.adapter("ia3").merge(weight.double(), bias.double())
        share = float((new_b - bias).norm() ** 2 / ((new_w - weight).norm() ** 2 + (new_b - bias).norm() ** 2))
        assert dropped[path] == pytest.approx(share**0.5, rel=1e-6) and dropped[path] > 1e-3


def test_extract_lora_refuses_mismatched_models_in_one_line() -> None:
    base = make_tiny("llama")
    tuned = copy.deepcopy(base)
    del tuned.model.layers[1]
    with pytest.raises(ConvertError) as exc:
        extract_lora(base, tuned, ["q_proj"], 2, "x")
    _one_line(exc, "tuned model has no module 'model.layers.1.self_attn.q_proj'")
    tuned = copy.deepcopy(base)
    tuned.model.layers[0].self_attn.q_proj = nn.Linear(32, 20, bias=False)
    with pytest.raises(ConvertError) as exc:
        extract_lora(base, tuned, ["q_proj"], 2, "x")
    _one_line(exc, "(20, 32) in the tuned model, (32, 32) in the base")
    with pytest.raises(ConvertError) as exc:
        extract_lora(base, copy.deepcopy(base), ["input_layernorm"], 2, "x")
    _one_line(exc, "LlamaRMSNorm", "Linear / Conv1D")
    with pytest.raises(AdapterKitError, match="match no module"):
        extract_lora(base, copy.deepcopy(base), ["no_such"], 2, "x")
    bert = make_tiny("bert")
    changed = copy.deepcopy(bert)
    with torch.no_grad():
        changed.bert.encoder.layer[0].attention.self.query.bias.add_(0.1)
    with pytest.raises(ConvertError, match="also changes its bias"):
        extract_lora(bert, changed, ["query"], 2, "x")
    errors = extract_lora(bert, changed, ["query"], 2, "x", bias="drop")
    assert errors["bert.encoder.layer.0.attention.self.query"] == pytest.approx(1.0)
    assert errors["bert.encoder.layer.1.attention.self.query"] == 0.0  # unchanged module: zero delta, zero error
    assert ak.adapters(base) == [] and ak.adapters(bert) == ["x"]

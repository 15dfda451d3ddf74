"""peft's formats for VeRA, LoHa, LoKr and OFT: our exports load in peft (``PeftModel.from_pretrained``) with the
same outputs, peft's own ``save_pretrained`` folders import with peft's outputs, and bad folders are one-line
StateErrors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.core.errors import StateError
from adapterkit.interop.peft_tuners import export_peft_tuner, import_peft_tuner
from adapterkit.methods.loha import LoHa
from adapterkit.methods.lokr import LoKr
from adapterkit.methods.oft import OFT
from adapterkit.methods.vera import VeRA
from tests.conftest import logits, make_tiny, randomize, tokens
from tests.methods.peft_pairs import pair

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
SPECS = {"vera": VeRA(r=4, seed=3, d_initial=0.3), "loha": LoHa(r=2, alpha=3.0),
         "lokr": LoKr(r=1, decompose_both=True, decompose_factor=4), "oft": OFT(block_size=8),
         "oft-neumann": OFT(r=2, block_size=0, cayley="neumann")}


def _ours(spec, kind: str = "llama", targets=TARGETS):
    model = make_tiny(kind)
    ak.attach(model, "a", spec, targets)
    randomize(model, "a", scale=0.3)
    return model


@pytest.mark.parametrize("key", sorted(SPECS))
def test_export_loads_in_peft_with_the_same_outputs_and_imports_back(key, tmp_path) -> None:
    model = _ours(SPECS[key])
    ids = tokens(batch=3, length=10)
    expected = logits(model, ids)
    export_peft_tuner(model, "a", tmp_path / "p")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_tiny("llama"), tmp_path / "p").eval()
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]  # every key is peft's
    with torch.no_grad():
        got = theirs(input_ids=ids).logits
    assert (expected - logits(make_tiny("llama"), ids)).abs().max() > 1e-4
    assert (got - expected).abs().max().item() <= 1e-5
    back = make_tiny("llama")
    assert import_peft_tuner(back, tmp_path / "p", "b") == "b"
    assert torch.equal(logits(back, ids), expected)


def test_vera_export_on_gpt2_conv1d_loads_in_peft(tmp_path) -> None:
    model = _ours(VeRA(r=4), "gpt2", ["c_attn", "c_fc"])
    export_peft_tuner(model, "a", tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(make_tiny("gpt2"), tmp_path / "p").eval()
    ids = tokens()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - logits(model, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("config", [peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=9),
                                    peft.LoHaConfig(r=2, alpha=4, target_modules=TARGETS),
                                    peft.LoKrConfig(r=2, target_modules=TARGETS),
                                    peft.OFTConfig(oft_block_size=16, target_modules=TARGETS)],
                         ids=lambda c: c.peft_type.value)
def test_peft_save_pretrained_imports_with_peft_s_outputs(config, tmp_path) -> None:
    spec = {"VERA": VeRA(r=4, seed=9), "LOHA": LoHa(r=2, alpha=4.0), "LOKR": LoKr(r=2),
            "OFT": OFT(block_size=16, cayley="neumann")}[config.peft_type.value]
    _, theirs = pair(make_tiny("llama"), config, spec, TARGETS, scale=0.3)
    theirs.save_pretrained(tmp_path / "p")
    ours = make_tiny("llama")
    import_peft_tuner(ours, tmp_path / "p")
    assert ak.adapters(ours) == ["default"]
    ids = tokens()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - logits(ours, ids)).abs().max().item() <= 1e-5


def _exported(tmp_path, spec=None):
    folder = export_peft_tuner(_ours(spec or LoHa(r=2)), "a", tmp_path / "p")
    return folder, json.loads((folder / "adapter_config.json").read_text())


def _rewrite(folder, config=None, tensors=None) -> None:
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("change,match", [
    (lambda c, t: c.update(peft_type="LORA"), "peft_type 'LORA'"),
    (lambda c, t: c.update(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (lambda c, t: c.update(r="two"), "field r"),
    (lambda c, t: c.update(r=3), "has shape"),
    (lambda c, t: t.pop(next(iter(t))), "missing"),
    (lambda c, t: t.update({"base_model.model.model.layers.0.mlp.nope.hada_w1_a": torch.zeros(1)}), "does not have"),
    (lambda c, t: t.update({"base_model.model.x.lora_A.weight": torch.zeros(1)}), "not a loha tensor"),
    (lambda c, t: t.update({k: v * float("nan") for k, v in list(t.items())[:1]}), "non-finite"),
])
def test_bad_folders_are_one_line_errors_and_leave_the_model_alone(tmp_path, change, match) -> None:
    folder, config = _exported(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    change(config, tensors)
    _rewrite(folder, config, tensors)
    model = make_tiny("llama")
    with pytest.raises(StateError, match=match) as info:
        import_peft_tuner(model, folder)
    assert "\n" not in str(info.value) and ak.adapters(model) == []


def test_refused_options_corrupt_files_and_tampered_projections(tmp_path) -> None:
    folder, config = _exported(tmp_path, OFT(block_size=8))
    _rewrite(folder, {**config, "coft": True})
    with pytest.raises(StateError, match="coft is true; adapterkit cannot reproduce it"):
        import_peft_tuner(make_tiny("llama"), folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(StateError, match="not a valid safetensors file"):
        import_peft_tuner(make_tiny("llama"), folder)
    folder, _ = _exported(tmp_path / "v", VeRA(r=4))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 1e-3
    _rewrite(folder, tensors=tensors)
    model = make_tiny("llama")
    with pytest.raises(StateError, match="base_model.vera_A differs from the matrix projection_prng_key 0 draws"):
        import_peft_tuner(model, folder)
    assert ak.adapters(model) == []


def test_what_peft_cannot_hold_is_refused_at_export(tmp_path) -> None:
    with pytest.raises(StateError, match="Conv1D, which peft's loha cannot adapt"):
        export_peft_tuner(_ours(LoHa(r=2), "gpt2", ["c_attn"]), "a", tmp_path / "x")
    with pytest.raises(StateError, match="adapter 'a' is lora; this peft format holds"):
        export_peft_tuner(_ours(ak.LoRA(r=2)), "a", tmp_path / "y")
    model = copy.deepcopy(_ours(LoHa(r=2)))
    with pytest.warns(UserWarning, match="ignoring module_dropout=0.1"):
        folder, config = _exported(tmp_path / "z")
        _rewrite(folder, {**config, "module_dropout": 0.1})
        import_peft_tuner(model, folder, "b")

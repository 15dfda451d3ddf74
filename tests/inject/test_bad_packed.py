"""Bad packed files: a bit-packed tensor that is truncated, has a wrong bit count or a mask of the wrong shape gets a
one-line StateError naming the weights file and the tensor, even when the file's sha256 was rewritten to match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.ops.bitpack import pack
from tests.conftest import make_tiny, randomize

KEY = "adapter.bert.encoder.layer.0.attention.self.query."


def _saved(tmp_path: Path, spec) -> Path:
    model = make_tiny("bert")
    ak.attach(model, "a", spec, ["query", "value"])
    randomize(model, "a")
    return ak.save(model, tmp_path / "ad")


def _rewrite(folder: Path, edit) -> None:
    """Change the tensors and re-sign the file, as a buggy writer or a hand edit would: only the packed-tensor
    checks can catch it."""
    record, tensors = ak.read(folder)
    edit(tensors)
    blob = save_bytes(tensors)
    (folder / record["weights"]).write_bytes(blob)
    record["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "adapter.json").write_text(json.dumps(record))


def _load_error(folder: Path) -> str:
    with pytest.raises(ak.StateError) as exc:
        ak.load(make_tiny("bert"), folder)
    message = str(exc.value)
    assert "\n" not in message and str(folder) in message and ".safetensors" in message
    return message


def test_flipped_byte_in_a_packed_file_fails_the_checksum(tmp_path) -> None:
    folder = _saved(tmp_path, ak.methods.LowBit(ak.LoRA(r=4), bits=1))
    weights = next(folder.glob("adapter-*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ak.StateError, match="sha256"):
        ak.load(make_tiny("bert"), folder)


def test_truncated_packed_codes(tmp_path) -> None:
    folder = _saved(tmp_path, ak.methods.LowBit(ak.LoRA(r=4), bits=1))
    _rewrite(folder, lambda t: t.update({KEY + "lora_a.codes": t[KEY + "lora_a.codes"][:-1].clone()}))
    message = _load_error(folder)
    assert "lora_a.codes" in message and "truncated or corrupted" in message


def test_wrong_bit_count_in_packed_codes(tmp_path) -> None:
    folder = _saved(tmp_path, ak.methods.LowBit(ak.LoRA(r=4), bits=2))
    _rewrite(folder, lambda t: t.update({KEY + "lora_b.codes": pack(torch.zeros(32, 4, dtype=torch.long), 1)}))
    message = _load_error(folder)
    assert "lora_b.codes" in message and "stored with 1 bits, expected 2" in message


def test_mask_of_the_wrong_shape(tmp_path) -> None:
    folder = _saved(tmp_path, ak.methods.MaskTuning())
    _rewrite(folder, lambda t: t.update({KEY + "mask": pack(torch.ones(32, 31, dtype=torch.bool), 1)}))
    message = _load_error(folder)
    assert "tensor mask" in message and "(32, 31)" in message and "(32, 32)" in message


def test_missing_packed_tensor(tmp_path) -> None:
    folder = _saved(tmp_path, ak.methods.MaskTuning())
    _rewrite(folder, lambda t: t.pop(KEY + "mask"))
    assert "missing tensor 'mask'" in _load_error(folder)


def test_splora_kept_rows_that_do_not_match_the_mask(tmp_path) -> None:
    model = make_tiny("bert")
    ak.attach(model, "a", ak.methods.SPLoRA(r=2), ["intermediate.dense"])
    folder = ak.save(model, tmp_path / "sp")
    key = "adapter.bert.encoder.layer.0.intermediate.dense.keep"
    _rewrite(folder, lambda t: t.update({key: pack(torch.arange(64) % 2 == 0, 1)}))
    message = _load_error(folder)
    assert "tensor cols has shape (64, 2), expected (32, 2)" in message


def test_inspect_shows_stored_and_float32_bytes(tmp_path, capsys) -> None:
    folder = _saved(tmp_path, ak.methods.LowBit(ak.LoRA(r=8), bits=1))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    params = 2 * 2 * (8 * 32 + 32 * 8 + 2 * 2)  # 2 layers x (query, value) x (A + B codes, (mu, sigma) of each)
    assert f"{params:,} parameters" in out
    size_line = next(line for line in out.splitlines() if line.startswith("size"))
    assert f"{4 * params:,} bytes as float32" in size_line
    stored = int(size_line.split("adapter tensors ")[1].split(" bytes")[0].replace(",", ""))
    assert stored < 4 * params / 8

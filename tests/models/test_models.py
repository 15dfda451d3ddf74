"""Models by name and path: the GGUF cache (converted once, checked on load), the tokenizer fixes, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterkit.core.errors import AdapterKitError
from adapterkit.models import BadModelFileError, ModelNotFoundError, is_causal_lm, load_pretrained, resolve
from adapterkit.models.gguf_cache import MANIFEST, cached_folder, verify
from tests.conftest import make_smollm2, minilm_dir


def test_smollm2_answers_like_the_reference(smollm2_path: str) -> None:
    model, tokenizer = make_smollm2()
    assert is_causal_lm(smollm2_path) and model.config.num_hidden_layers == 30
    # the GGUF's metadata, not transformers' GGUF tokenizer guesses: no BOS added, EOS is <|im_end|>
    assert tokenizer("hello world")["input_ids"] == [28120, 905]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True) == \
        "The capital of France is Paris."


def test_cache_is_reused_and_checked(smollm2_path: str, tmp_path: Path) -> None:
    manifest = verify(Path(smollm2_path))
    assert Path(smollm2_path).name.endswith(manifest["source_sha256"][:16])
    assert resolve("smollm2") == Path(smollm2_path) == resolve(manifest["source"])  # name and .gguf path
    # a damaged copy of the cache is refused with the folder to delete
    copy = tmp_path / "models" / Path(smollm2_path).name
    shutil.copytree(smollm2_path, copy)
    with open(copy / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(AdapterKitError, match="config.json is missing or damaged.*delete the folder"):
        cached_folder(manifest["source"], root=tmp_path)
    (copy / MANIFEST).write_text("{")
    with pytest.raises(AdapterKitError, match="unreadable manifest"):
        verify(copy)


def test_a_killed_conversion_leaves_no_finished_folder(smollm2_path: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterkit.models import gguf_cache
    from tests.conftest import make_tiny

    source = Path(json.loads((Path(smollm2_path) / MANIFEST).read_text())["source"])
    _, tokenizer = make_smollm2()
    monkeypatch.setattr(gguf_cache, "read_gguf", lambda path: (make_tiny("llama"), tokenizer))  # fast stand-in

    def killed(*args: object, **kwargs: object) -> None:  # dies while the manifest is written, files all saved
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        cached_folder(source, root=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    monkeypatch.setattr(gguf_cache, "read_gguf", lambda path: (make_tiny("llama"), tokenizer))
    folder = cached_folder(source, root=tmp_path)  # the next call converts from scratch and succeeds
    assert verify(folder)["source_sha256"].startswith(folder.name.rsplit("-", 1)[1])


def test_classifier_and_folder_paths() -> None:
    model, tokenizer = load_pretrained(minilm_dir(), num_labels=3)
    assert model.config.num_labels == 3 and tokenizer.pad_token is not None
    assert resolve("minilm") == Path(minilm_dir())
    assert not is_causal_lm(minilm_dir())


@pytest.mark.parametrize("content, message", [
    (b"", "not a GGUF file"),
    (b"PK\x03\x04 a zip, not a model", "not a GGUF file"),
    (b"GGUF" + b"\x00" * 60, "GGUF"),
])
def test_a_gguf_that_is_not_a_model_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    pytest.importorskip("gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(BadModelFileError, match=message) as info:
        load_pretrained(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_names_and_paths_that_name_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"--model 'nosuch' is not a known model name \(gemma3-270m, "
                                                 r"minilm, smollm2\)"):
        load_pretrained("nosuch")
    with pytest.raises(ModelNotFoundError, match="no such folder or file"):
        load_pretrained(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a model folder or a .gguf file"):
        load_pretrained(tmp_path / "weights.bin")
    with pytest.raises(AdapterKitError, match="task must be one of"):
        load_pretrained(minilm_dir(), task="seq2seq")


def test_float_dtype_option(smollm2_path: str) -> None:
    model, _ = load_pretrained(smollm2_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16

"""Sharing a causal-LM run from the command line: `adapterkit export` (peft's format, vLLM's limits warned on
stderr), `adapterkit import --model smollm2` and `adapterkit merge` (a plain transformers folder), each checked by
greedy generation token for token on SmolLM2-135M-Instruct, and a merge that never breaks a tied head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.cli.main import main
from tests.conftest import make_smollm2, randomize
from tests.interop.test_peft_llm import chat_batch, greedy

peft = pytest.importorskip("peft")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_run(folder: Path, model, model_dir: str, spec: ak.LoRA, targets: list[str]) -> Path:
    """A causal-LM run folder as `adapterkit train` writes one: the adapter and run.json."""
    ak.save(model, folder / "adapter", "adapter")
    record = {"task": "causal-lm", "model": model_dir, "config": {"head": []}, "method": spec.method,
              "targets": targets}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2_path) -> dict:
    """A LoRA run on SmolLM2 with random non-zero weights, and its greedy answers to two chat prompts."""
    model, tokenizer = make_smollm2()
    batch = chat_batch(tokenizer)
    base_tokens = greedy(model, batch)
    ak.attach(model, "adapter", ak.LoRA(r=8, alpha=16), ["q_proj", "v_proj"])
    randomize(model, "adapter", scale=0.05)
    tokens = greedy(model, batch)
    assert not torch.equal(tokens, base_tokens)  # the adapter changes the answers
    run = write_run(tmp_path_factory.mktemp("runs") / "chat", model, smollm2_path, ak.LoRA(r=8, alpha=16),
                    ["q_proj", "v_proj"])
    return {"run": run, "batch": batch, "tokens": tokens}


def test_export_of_a_causal_lm_run_generates_the_same_tokens_in_transformers(smollm2_run, tmp_path, capsys) -> None:
    assert main(["export", str(smollm2_run["run"]), "--out", str(tmp_path / "peft")]) == 0
    captured = capsys.readouterr()
    assert "peft-format adapter written" in captured.out and "warning:" not in captured.err
    base = make_smollm2()[0]
    base.load_adapter(str(tmp_path / "peft"))
    assert torch.equal(greedy(base, smollm2_run["batch"]), smollm2_run["tokens"])


def test_merge_writes_a_plain_model_folder_that_generates_the_same_tokens(smollm2_run, smollm2_path,
                                                                          tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(smollm2_run["run"]), "--out", str(out)]) == 0
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in files if f.startswith(".")]  # no staging folder left behind
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(type(m).__module__.startswith("adapterkit") for m in merged.modules())
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2_path).chat_template
    assert torch.equal(greedy(merged, chat_batch(tokenizer)), smollm2_run["tokens"])


def test_import_of_a_peft_lora_with_model_smollm2_loads_a_causal_lm(tmp_path, capsys) -> None:
    model, tokenizer = make_smollm2()
    batch = chat_batch(tokenizer)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                                                        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    theirs.eval().save_pretrained(tmp_path / "peft")
    expected = greedy(theirs, batch)
    assert main(["import", str(tmp_path / "peft"), "--model", "smollm2", "--out", str(tmp_path / "ours")]) == 0
    assert "adapterkit adapter written" in capsys.readouterr().out
    fresh = make_smollm2()[0]
    ak.load(fresh, tmp_path / "ours")
    assert torch.equal(greedy(fresh, batch), expected)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, smollm2_path) -> str:
    """A small random Llama that ties its head to its embeddings, with SmolLM2's tokenizer (same vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    folder = tmp_path_factory.mktemp("tied") / "llama"
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if Path(smollm2_path, name).exists():
            shutil.copy(Path(smollm2_path, name), folder / name)
    return str(folder)


@pytest.mark.parametrize("targets,stays_tied", [(["q_proj", "lm_head"], False), (["embed_tokens"], False),
                                                (["q_proj"], True)], ids=["head", "embeddings", "neither"])
def test_merge_of_a_tied_model_keeps_the_head_right(tied_llama_dir, tmp_path, targets, stays_tied) -> None:
    from transformers import AutoModelForCausalLM

    from adapterkit.models import load_pretrained

    model, tokenizer = load_pretrained(tied_llama_dir)
    model.eval()
    ak.attach(model, "adapter", ak.LoRA(r=2, alpha=4), targets)
    randomize(model, "adapter", scale=0.5)
    run = write_run(tmp_path / "run", model, tied_llama_dir, ak.LoRA(r=2, alpha=4), targets)
    ids = tokenizer(["Hello there, how are you today?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings is stays_tied
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) is stays_tied
    if not stays_tied:  # both weights were written, each with its own change
        assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        got = merged.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        with ak.use(model, "adapter"):
            want = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_export_warns_on_stderr_about_what_vllm_refuses(tied_llama_dir, tmp_path, capsys) -> None:
    from adapterkit.models import load_pretrained

    model, _ = load_pretrained(tied_llama_dir)
    ak.attach(model, "adapter", ak.DoRA(r=2, alpha=4), ["q_proj", "v_proj"])
    randomize(model, "adapter")
    run = write_run(tmp_path / "run", model, tied_llama_dir, ak.DoRA(r=2, alpha=4), ["q_proj", "v_proj"])
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: vLLM refuses DoRA adapters")


def test_combine_and_convert_load_causal_lm_runs_as_causal_lms(tied_llama_dir, tmp_path, capsys) -> None:
    from adapterkit.models import load_pretrained

    runs = []
    for seed in (1, 2):
        model, _ = load_pretrained(tied_llama_dir)
        ak.attach(model, "adapter", ak.LoRA(r=2, alpha=4), ["q_proj", "v_proj"])
        randomize(model, "adapter", seed=seed)
        runs.append(str(write_run(tmp_path / f"run{seed}", model, tied_llama_dir, ak.LoRA(r=2, alpha=4),
                                  ["q_proj", "v_proj"])))
    assert main(["combine", *runs, "--how", "linear", "--out", str(tmp_path / "sum")]) == 0
    assert main(["convert", str(tmp_path / "sum"), "--model", tied_llama_dir, "-r", "2",
                 "--out", str(tmp_path / "r2")]) == 0
    assert "rank-2 LoRA" in capsys.readouterr().out
    for folder in ("sum", "r2"):  # both load onto the causal LM they were made on (its fingerprint checked)
        model, _ = load_pretrained(tied_llama_dir)
        ak.load(model, tmp_path / folder)
        assert type(model).__name__ == "LlamaForCausalLM"

"""peft's format on a real causal LM (SmolLM2-135M-Instruct, chat template, greedy decoding): an exported adapter
generates the same tokens in peft and in transformers' PEFT integration, a LoRA trained by peft imports and
generates the same tokens here, and an export warns about what vLLM refuses."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import adapterkit as ak
from adapterkit.interop.peft_format import VllmWarning, export_peft, import_peft, vllm_notes
from tests.conftest import make_smollm2, make_tiny, randomize

peft = pytest.importorskip("peft")

PROMPTS = ["What is the capital of France?", "Name a colour of the rainbow."]


def chat_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two chat-formatted prompts, left-padded as generation wants."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def greedy(model, batch: dict[str, torch.Tensor], new_tokens: int = 12) -> torch.Tensor:
    """The new token ids of a greedy generation (the prompt cut off)."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:]


def test_an_export_generates_the_same_tokens_in_peft_and_in_transformers_load_adapter(tmp_path) -> None:
    model, tokenizer = make_smollm2()
    batch = chat_batch(tokenizer)
    base_tokens = greedy(model, batch)
    ak.attach(model, "chat", ak.LoRA(r=8, alpha=16), ["q_proj", "v_proj"])
    randomize(model, "chat", scale=0.05)
    ours = greedy(model, batch)
    assert not torch.equal(ours, base_tokens)  # the adapter changes the answer: the comparisons below can fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_peft(model, "chat", tmp_path / "peft", base_model_name_or_path="smollm2")
    assert not [w for w in caught if issubclass(w.category, VllmWarning)]  # a plain rank-8 LoRA: vLLM takes it
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None

    theirs = peft.PeftModel.from_pretrained(make_smollm2()[0], tmp_path / "peft").eval()
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    assert torch.equal(greedy(theirs, batch), ours)

    integrated = make_smollm2()[0]
    integrated.load_adapter(str(tmp_path / "peft"))  # transformers' PEFT integration, no peft wrapper class
    assert torch.equal(greedy(integrated, batch), ours)


def test_a_lora_trained_by_peft_imports_and_generates_the_same_tokens(tmp_path) -> None:
    model, tokenizer = make_smollm2()
    batch = chat_batch(tokenizer)
    torch.manual_seed(0)
    trained = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."},
                                          {"role": "assistant", "content": "Hi there, friend!"}], tokenize=False)
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-2)
    trained.train()
    for _ in range(2):  # two real optimizer steps: lora_B leaves zero, so the adapter does something
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained.eval()
    trained.save_pretrained(tmp_path / "peft")
    theirs = greedy(trained, batch)
    with trained.disable_adapter():
        base_logits = _logits(trained, ids)
    assert not torch.allclose(base_logits, _logits(trained, ids), atol=1e-3)  # training did something

    fresh, _ = make_smollm2()
    assert import_peft(fresh, tmp_path / "peft", name="sft") == "sft"
    assert torch.equal(greedy(fresh, batch), theirs)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, _logits(trained, ids),
                                   atol=1e-4, rtol=1e-4)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_export_warns_one_line_per_thing_vllm_refuses_or_needs(tmp_path) -> None:
    model = make_tiny("llama")
    ak.attach(model, "d", ak.DoRA(r=32, alpha=64), ["q_proj"])
    with pytest.warns(VllmWarning) as caught:
        export_peft(copy.deepcopy(model), "d", tmp_path / "dora", modules=("lm_head",))
    lines = [str(w.message) for w in caught if issubclass(w.category, VllmWarning)]
    assert all("\n" not in line for line in lines)
    assert len(lines) == 3
    assert "DoRA" in lines[0] and "modules_to_save (lm_head)" in lines[1]
    assert "--max-lora-rank 32" in lines[2] and "default is 16" in lines[2]


def test_vllm_notes_follow_vllms_rules() -> None:
    plain = {"r": 16, "lora_alpha": 32, "use_dora": False, "modules_to_save": None}
    assert vllm_notes(plain) == []  # rank 16 is vLLM's default --max-lora-rank
    assert "--max-lora-rank 64" in vllm_notes({**plain, "r": 48})[0]  # the next value vLLM accepts
    assert "refuses rank 600" in vllm_notes({**plain, "r": 600})[0]
    # a pattern that keeps alpha/r is read right by vLLM; one that changes it is not
    assert vllm_notes({**plain, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 16}}) == []
    note = vllm_notes({**plain, "rank_pattern": {"q_proj": 8}})
    assert len(note) == 1 and "lora_alpha/r = 2" in note[0] and "'q_proj'" in note[0]
    assert vllm_notes({**plain, "use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 16}}) \
        == []  # rsLoRA: alpha / sqrt(r) is 8 both ways


def test_explain_with_the_model_alone_summarises_its_adapters_with_peft_s_counts(capsys) -> None:
    model, _ = make_smollm2()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16,
                                                                       target_modules=["q_proj", "v_proj"]))
    capsys.readouterr()
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    assert str(ak.explain(model)).splitlines() == ["no adapters attached", ak.explain(model).trainable_line()]

    ak.attach(model, "chat", ak.LoRA(r=8, alpha=16), ["q_proj", "v_proj"])
    ak.attach(model, "other", ak.IA3(), ["down_proj"])
    ak.train_only(model, "chat")  # peft freezes the base; so does train_only (and the other adapter here)
    summary = ak.explain(model)
    other = str(summary).splitlines()[1]
    assert other.startswith("other: ia3, 30 modules (down_proj x30), ") and other.endswith(" params, 0 trainable")
    assert summary.all_params == int(peft_line.split("all params: ")[1].split(" ")[0].replace(",", "")) + \
        summary.adapters[1].params  # every parameter counts among all params, a frozen adapter's too
    ak.detach(model, "other")
    summary = ak.explain(model)
    assert summary.trainable_line() == peft_line  # e.g. "trainable params: 460,800 || all params: ... || ..."
    lines = str(summary).splitlines()
    assert lines[-1] == peft_line
    assert lines[0] == "chat: lora, 60 modules (q_proj x30, v_proj x30), 460,800 params, 460,800 trainable"
    assert [a.name for a in summary.adapters] == ["chat"] and summary.adapters[0].method == "lora"
    assert summary.adapters[0].modules[0] == ("model.layers.0.self_attn.q_proj", 8 * (576 + 576))
    # the dry run is unchanged
    plan = ak.explain(model, ["k_proj"], ak.LoRA(r=2))
    assert len(plan.rows) == 30 and plan.adapter_params == 30 * 2 * (576 + 192)
    with pytest.raises(ak.TargetError, match="no targets given"):
        ak.explain(model, None, ak.LoRA(r=2))

"""transformers' Trainer (and TRL's SFTTrainer) on a real causal LM, SmolLM2-135M-Instruct: a LoRA trains with the
causal-LM loss (the loss goes down), adapter-only checkpoints resume to the weights of an uninterrupted run, and
``generate`` with the adapter active is ``generate`` under ``ak.use``.

The LoRA sits on the last four layers' q_proj / v_proj only: the backward pass then stops there, which keeps a
step on the CPU well under a second; the Trainer path is the same as with every layer adapted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import make_smollm2

import adapterkit as ak
from adapterkit.train.hf_trainer import AdapterTrainer, AdapterTrainerMixin

pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import TrainingArguments  # noqa: E402

TARGETS = [r"re:model\.layers\.(26|27|28|29)\.self_attn\.(q|v)_proj"]
TEXTS = ["The capital of France is Paris.", "Two plus two is four.", "The sky is blue on a clear day.",
         "Cats like to sleep in the sun."]
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class _Sentences(torch.utils.data.Dataset):
    """Four short sentences, padded to 16 tokens; padding is left out of the loss."""

    def __init__(self, tokenizer) -> None:
        encoded = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
        self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    def loss(self, model) -> float:
        with torch.no_grad():
            return float(model(input_ids=self.ids, attention_mask=self.mask, labels=self.labels).loss)


def _adapted(lora_seed: int = 0):
    model, tokenizer = make_smollm2()
    torch.manual_seed(lora_seed)
    ak.attach(model, "sft", ak.LoRA(r=4, alpha=8), TARGETS)
    ak.train_only(model, "sft")
    return model, tokenizer


def _args(out: Path, **extra) -> TrainingArguments:
    settings = {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                "save_strategy": "steps", "save_steps": 3, "logging_strategy": "no", "report_to": [],
                "disable_tqdm": True, "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, **extra}
    return TrainingArguments(**settings)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_trains_a_lora_on_smollm2_checkpoints_resume_and_generate_uses_it(tmp_path) -> None:
    model, tokenizer = _adapted()
    data = _Sentences(tokenizer)
    before = data.loss(model)
    trainer = AdapterTrainer(model=model, args=_args(tmp_path / "whole"), train_dataset=data,
                             processing_class=tokenizer)
    trainer.train()
    model.eval()
    assert data.loss(model) < before - 0.1  # the causal-LM loss went down
    files = {f.name for f in (tmp_path / "whole" / "checkpoint-3").iterdir()}
    assert "adapter.json" in files and not files & set(FULL_MODEL_FILES)  # the adapter only, no base weights
    assert "tokenizer.json" in files and "optimizer.pt" in files
    expected = _trained(model)

    resumed, _ = _adapted(lora_seed=123)  # another init: only the checkpoint can make the weights equal
    AdapterTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=data,
                   processing_class=tokenizer).train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    got = _trained(resumed)
    assert got.keys() == expected.keys() and len(got) == 16
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        active = model.generate(prompt, max_new_tokens=12, do_sample=False)  # the adapter is active after attach
        with ak.use(model, "sft"):
            scoped = model.generate(prompt, max_new_tokens=12, do_sample=False)
        with ak.use(model):
            bare = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(active, scoped)
    assert not torch.equal(active, bare)  # the trained adapter changes the answer: the check above can fail


def test_trl_sft_trainer_with_the_mixin_trains_and_saves_an_adapter(tmp_path) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()

    class AdapterSFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
        pass

    model, tokenizer = _adapted()
    data = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Capital of France?", "Paris."), ("Two plus two?", "Four."), ("Colour of the sky?", "Blue."),
                     ("Opposite of hot?", "Cold.")]])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                         max_length=32, save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[],
                         disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
                         bf16=False)  # TRL defaults to bf16, and accelerate then leaves forward under autocast
    before = _trained(model)
    trainer = AdapterSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    after = _trained(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_b" in n.lower())  # every B moved
    files = {f.name for f in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter.json" in files and not files & set(FULL_MODEL_FILES)
    trainer.save_model(str(tmp_path / "final"))
    fresh, _ = make_smollm2()
    ak.load(fresh, tmp_path / "final")
    ids = tokenizer(["Capital of France? Paris."], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

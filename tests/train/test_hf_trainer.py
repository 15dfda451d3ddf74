"""transformers.Trainer with adapterkit: gradient checkpointing (reentrant or not) trains every LoRA weight and the
head; checkpoints hold the adapter and head only; resume and load_best_model_at_end restore them in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.train.hf_trainer import AdapterTrainer, AdapterTrainerMixin, restore_adapters, save_adapters

pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


class _Rows(torch.utils.data.Dataset):
    """Tiny token-id classification data: the label is whether token 7 occurs."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 40, (n, 8), generator=gen)
        self.labels = (self.ids == 7).any(dim=1).long() | (torch.arange(n) % 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _base() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(config)


def _model(lora_seed: int = 0) -> nn.Module:
    model = _base()
    torch.manual_seed(lora_seed)
    ak.attach(model, "a", ak.LoRA(r=2, alpha=4), ["query", "value"])
    ak.train_only(model, "a", also=["classifier"])
    return model


def _args(out: Path, **extra) -> TrainingArguments:
    settings = {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                "save_strategy": "steps", "save_steps": 3, "logging_strategy": "no", "report_to": [],
                "disable_tqdm": True, "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, **extra}
    return TrainingArguments(**settings)


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    _, tensors = ak.read(folder)
    return tensors


def _as_saved_keys(trained: dict[str, torch.Tensor], name: str = "a") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s and the head's parameters under the keys ak.save writes (``adapter.<module>.<param>``,
    ``module.<module>.<param>``)."""
    out = {}
    for pname, value in trained.items():
        module, sep, rest = pname.partition(".adapterkit.")
        if not sep:
            out[f"module.{pname}"] = value
        elif rest.startswith(f"{name}."):
            out[f"adapter.{module}.{rest[len(name) + 1:]}"] = value
    return out


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_training_changes_every_lora_weight_and_writes_adapter_only_checkpoints(tmp_path,
                                                                                           reentrant) -> None:
    model = _model()
    before = _trained(model)
    assert sum(".adapterkit." in n for n in before) == 8 and {"classifier.weight", "classifier.bias"} <= set(before)
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = AdapterTrainer(model=model, args=args, train_dataset=_Rows(24, seed=1))
    trainer.train()
    assert model.is_gradient_checkpointing
    after = _trained(model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"not trained: {unchanged}"
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        files = {f.name for f in folder.iterdir()}
        assert "adapter.json" in files and any(f.startswith("adapter-") and f.endswith(".safetensors") for f in files)
        assert not files & set(FULL_MODEL_FILES), files
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files  # the Trainer's own state stays
        assert sum(f.stat().st_size for f in folder.glob("adapter-*.safetensors")) < 20_000  # no base weights
    final = _saved(tmp_path / "checkpoint-6")
    assert final.keys() == _as_saved_keys(after).keys()  # the adapter and the head, nothing else
    for key, value in _as_saved_keys(after).items():
        assert torch.equal(final[key], value), key
    trainer.save_model(str(tmp_path / "final"))  # the end product loads onto a fresh base with ak.load
    fresh = _base()
    with torch.no_grad():
        fresh.classifier.weight.zero_()
    ak.load(fresh, tmp_path / "final")
    batch = {"input_ids": _Rows(4, seed=5).ids}
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-6, rtol=1e-5)


def test_resume_from_a_mid_run_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path) -> None:
    data = _Rows(24, seed=1)
    whole = _model()
    AdapterTrainer(model=whole, args=_args(tmp_path / "whole", gradient_checkpointing=True),
                   train_dataset=data).train()  # transformers' default: reentrant checkpointing
    expected = _trained(whole)

    resumed = _model(lora_seed=123)  # another LoRA init and a zeroed head: only the checkpoint can make them equal
    with torch.no_grad():
        resumed.classifier.weight.zero_()
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "resumed", gradient_checkpointing=True),
                             train_dataset=data)
    params_before = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    got = _trained(resumed)
    assert all(p is dict(resumed.named_parameters())[n] for n, p in params_before.items())  # restored in place
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    # and the resumed run diverged from its own start: the comparison above is not trivially true
    assert not torch.equal(got["classifier.weight"], torch.zeros_like(got["classifier.weight"]))


class _CountingTrainer(Trainer):
    """A Trainer subclass (as TRL's SFTTrainer is one) that overrides compute_loss."""

    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        _CountingTrainer.calls += 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


class _CountingAdapterTrainer(AdapterTrainerMixin, _CountingTrainer):
    pass


def test_load_best_model_at_end_restores_the_best_checkpoint_in_a_trainer_subclass(tmp_path) -> None:
    model = _model()
    evals: list[int] = []

    def metrics(_prediction) -> dict[str, float]:  # best at the first evaluation, worse at every later one
        evals.append(len(evals))
        return {"score": -float(len(evals))}

    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="score", greater_is_better=True, gradient_checkpointing=True)
    trainer = _CountingAdapterTrainer(model=model, args=args, train_dataset=_Rows(24, seed=1),
                                      eval_dataset=_Rows(8, seed=2), compute_metrics=metrics)
    trainer.train()
    assert _CountingTrainer.calls > 0 and len(evals) == 3
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best, last = _saved(tmp_path / "checkpoint-2"), _saved(tmp_path / "checkpoint-6")
    assert not (set(f.name for f in (tmp_path / "checkpoint-2").iterdir()) & set(FULL_MODEL_FILES))
    now = _as_saved_keys(_trained(model))
    assert now.keys() == best.keys()
    for key, value in now.items():
        assert torch.equal(value, best[key]), key
    assert any(not torch.equal(now[k], last[k]) for k in now)  # the best is not simply the last


def test_several_adapters_go_to_sub_folders_and_an_unattached_one_is_a_clear_error(tmp_path) -> None:
    model = _model()
    ak.attach(model, "b", ak.LoRA(r=2), ["key"])
    ak.train_only(model, ["a", "b"], also=["classifier"])
    folders = save_adapters(model, tmp_path)
    assert [f.name for f in folders] == ["a", "b"] and not (tmp_path / "adapter.json").exists()
    assert all("module.classifier.weight" in _saved(f) for f in folders)  # each folder loads on its own with its head
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    assert restore_adapters(model, tmp_path) == ["a", "b"]
    for folder in folders:
        saved, now = _saved(folder), _as_saved_keys(_trained(model), folder.name)
        assert saved.keys() == now.keys() and all(torch.equal(now[k], saved[k]) for k in now), folder.name
    other = _model()
    with pytest.raises(ak.StateError, match="'b', which is not attached"):
        restore_adapters(other, tmp_path)

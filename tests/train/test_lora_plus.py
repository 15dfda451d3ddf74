"""LoRA+: the parameter groups equal peft's create_loraplus_optimizer's (members, learning rates, weight decay),
the training loop and the CLI take the ratio, bad input gets one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.cli.helpers import run_cli, write_tsv
from tests.conftest import make_tiny

import adapterkit as ak
from adapterkit.cli.main import build_parser
from adapterkit.train.loop import TrainConfig, adamw_with_warmup
from adapterkit.train.lora_plus import lora_plus_groups, lora_plus_optimizer

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

TARGETS = ["query", "value", "word_embeddings"]
_PEFT = ((".modules_to_save.default", ""), (".lora_A.default.weight", "#A"), (".lora_B.default.weight", "#B"),
         (".lora_embedding_A.default", "#A"), (".lora_embedding_B.default", "#B"))


def _canonical(name: str, peft_side: bool) -> str:
    if peft_side:
        name = name.removeprefix("base_model.model.")
        for old, new in _PEFT:
            name = name.replace(old, new)
        return name
    return name.replace(".adapterkit.a.lora_a", "#A").replace(".adapterkit.a.lora_b", "#B")


def _named(model: torch.nn.Module, params: list, peft_side: bool) -> set[str]:
    ids = {id(p) for p in params}
    return {_canonical(n, peft_side) for n, p in model.named_parameters() if id(p) in ids}


def test_groups_match_peft() -> None:
    base = make_tiny("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                       modules_to_save=["classifier"]))
    ours = copy.deepcopy(base)
    ak.attach(ours, "a", ak.LoRA(r=4, alpha=8), targets=TARGETS)
    ak.train_only(ours, "a", also=["classifier"])
    for model in (theirs, ours):  # a trainable LayerNorm: peft never decays it
        for param in model.get_submodule(("base_model.model." if model is theirs else "")
                                         + "bert.embeddings.LayerNorm").parameters():
            param.requires_grad_(True)
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)
    groups = lora_plus_groups(ours, lr=1e-3, ratio=16, weight_decay=0.1, embedding_lr=1e-5)
    names = ("a", "embedding", "lora_b", "lora_b_no_decay")  # peft's group order
    want = {names[i]: (_named(theirs, g["params"], True), g["lr"], g["weight_decay"])
            for i, g in enumerate(expected.param_groups) if g["params"]}
    got = {g["name"]: (_named(ours, g["params"], False), g["lr"], g["weight_decay"]) for g in groups}
    assert got == want
    assert set(want) == set(names)  # every group is exercised
    assert any(n.endswith("query#B") for n in got["lora_b"][0]) and "classifier.bias" in got["lora_b_no_decay"][0]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in ours.parameters())
    optimizer = lora_plus_optimizer(ours, lr=1e-3, ratio=16, betas=(0.8, 0.9))
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def test_training_loop_uses_the_groups() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=4), targets=["q_proj", "v_proj"])
    ak.train_only(model, "a")
    optimizer, schedule = adamw_with_warmup(model, TrainConfig(lr=1e-3, lora_plus_ratio=8, warmup=0.5), total=4)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"a": 1e-3 / 2, "lora_b": 8e-3 / 2})  # warmup scales every group alike
    plain, _ = adamw_with_warmup(model, TrainConfig(lr=1e-3), total=4)
    assert len(plain.param_groups) == 1


@pytest.mark.parametrize("kwargs,message", [({"ratio": 0}, "ratio must be a positive number"),
                                            ({"ratio": True}, "ratio must be a positive number"),
                                            ({"ratio": 4, "lr": -1}, "lr must be a positive number")])
def test_bad_numbers_are_one_line(kwargs, message) -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=2), targets=["q_proj"])
    with pytest.raises(ak.AdapterKitError, match=message) as error:
        lora_plus_groups(model, **{"lr": 1e-3, **kwargs})
    assert "\n" not in str(error.value)


def test_no_lora_is_one_line() -> None:
    model = make_tiny("llama")
    ak.attach(model, "a", ak.IA3(), targets=["down_proj"])
    ak.train_only(model, "a")
    with pytest.raises(ak.AdapterKitError, match="no trainable LoRA B matrix"):
        lora_plus_groups(model, lr=1e-3, ratio=4)


def test_cli_option_reaches_both_configs(tmp_path, monkeypatch) -> None:
    from adapterkit.cli.llm_commands import _config

    parser = build_parser()
    assert parser.parse_args(["train"]).lora_plus_ratio is None
    assert _config(parser.parse_args(["train", "--lora-plus-ratio", "16"])).lora_plus_ratio == 16.0
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tsv(tmp_path / "train.tsv", 16, seed=0)
    write_tsv(tmp_path / "dev.tsv", 8, seed=1)
    out = tmp_path / "run"
    code, _, stderr = run_cli(["train", "--data", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.tsv"),
                               "--max-steps", "1", "--epochs", "1", "--batch-size", "8", "--lora-plus-ratio", "4",
                               "--out", str(out)])
    assert code == 0, stderr
    assert json.loads((out / "run.json").read_text())["config"]["lora_plus_ratio"] == 4.0


def test_hf_trainer_takes_the_optimizer(tmp_path) -> None:
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from transformers import Trainer, TrainingArguments

    model = make_tiny("llama")
    ak.attach(model, "a", ak.LoRA(r=4), targets=["q_proj", "v_proj"])
    ak.train_only(model, "a")
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    optimizer = lora_plus_optimizer(model, lr=1e-3, ratio=16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                             learning_rate=1e-3, warmup_steps=0, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps it
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"a": 1e-3, "lora_b": 16e-3})  # the Trainer's schedule kept the ratio

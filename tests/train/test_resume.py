"""Resumable training: SIGKILL mid-run, --resume, and the final adapter equals an uninterrupted run's;
gradient accumulation gives the same updates as one batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.train.checkpoint import DIGEST, KEY, header_digest, load_checkpoint, save_checkpoint
from adapterkit.train.data import read_table, shipped_sst2
from adapterkit.train.loop import TrainConfig, run_training

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small random BERT classifier with a real WordPiece tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    vocab = folder / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for line in shipped_sst2()[0].read_text()
                                                                     .splitlines()[1:400] for w in line.split()[:-1]})
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    lines = shipped_sst2()[0].read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(lines[:361]) + "\n")
    (folder / "dev.tsv").write_text("\n".join([lines[0]] + lines[361:401]) + "\n")
    return folder / "train.tsv", folder / "dev.tsv"


def _args(model_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data[0]), "--dev", str(data[1]), "--epochs", "2",
            "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "5", "--out", str(out), *extra]


def _adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    record, tensors = ak.read(out / "adapter")
    return tensors


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_model_dir, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    assert main(_args(tiny_model_dir, data, tmp_path / "whole")) == 0
    expected = _adapter_tensors(tmp_path / "whole")

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ADAPTERKIT_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adapterkit.cli.main", *_args(tiny_model_dir, data, out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.safetensors"
    deadline = time.time() + 120
    seen = 0.0
    while time.time() < deadline and proc.poll() is None:  # kill after the second checkpoint write
        if checkpoint.exists() and checkpoint.stat().st_mtime_ns != seen:
            if seen:
                break
            seen = checkpoint.stat().st_mtime_ns
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (out / "metrics.json").exists(), "the run was not interrupted mid-way"
    step = load_file(checkpoint)  # a complete file, whatever moment the kill hit
    assert step["rng.torch"].numel() > 0
    assert main(_args(tiny_model_dir, data, out, "--resume")) == 0
    resumed = _adapter_tensors(out)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def test_gradient_accumulation_matches_one_batch(tiny_model_dir, data) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, labels = read_table(data[0], "sentence", "label")
    dev, _ = read_table(data[1], "sentence", "label", label_names=labels)
    results = []
    for accum in (1, 4):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                                                   attention_probs_dropout_prob=0.0)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        torch.manual_seed(0)  # the same LoRA init in both runs
        ak.attach(model, "a", ak.LoRA(r=4), ["query", "value"])
        ak.train_only(model, "a", also=["classifier"])
        config = TrainConfig(epochs=1, batch_size=8, max_steps=6, lr=1e-3, grad_accum=accum, seed=0)
        run_training(model, tokenizer, train, dev, config)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_and_bf16_train(tiny_model_dir, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    args = _args(tiny_model_dir, data, tmp_path / "gc", "--gradient-checkpointing", "--precision", "bf16",
                 "--max-steps", "4", "--grad-accum", "2")
    assert main(args) == 0
    tensors = _adapter_tensors(tmp_path / "gc")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_b" in k)


def test_resume_rejects_a_checkpoint_of_another_run(tiny_model_dir, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    assert main(_args(tiny_model_dir, data, tmp_path / "r", "--max-steps", "5")) == 0
    code = main(_args(tiny_model_dir, data, tmp_path / "r", "--resume", "--targets", "query"))
    assert code == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(mode, tiny_model_dir, data, tmp_path, monkeypatch) -> None:
    """torchrun, 2 processes, gloo, DDP or FSDP: the same global batch gives the same loss curve and adapter as
    1 process, and the saved adapter (and head) is complete, not a shard."""
    from transformers import AutoConfig

    no_dropout = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model_dir, no_dropout)
    config = AutoConfig.from_pretrained(no_dropout, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        classifier_dropout=0.0)
    config.save_pretrained(no_dropout)
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    single = tmp_path / "one"
    assert main(_args(no_dropout, data, single, "--max-steps", "12", "--batch-size", "8")) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    double = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "adapterkit.cli.main", *_args(no_dropout, data, double, "--max-steps", "12", "--batch-size", "8",
                                               "--parallel", mode)]
    if mode == "fsdp":  # resumable checkpoints are DDP-only for now (a clear error, tested below)
        at = cmd.index("--checkpoint-every")
        del cmd[at:at + 2]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "elastic" not in line]
    assert result.returncode == 0, "\n".join(errors[-10:])
    import json

    one = json.loads((single / "metrics.json").read_text())["history"]["loss"]
    two = json.loads((double / "metrics.json").read_text())["history"]["loss"]
    assert len(one) == len(two) == 12
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-4)
    expected, got = _adapter_tensors(single), _adapter_tensors(double)
    for key, value in expected.items():  # complete adapters, not empty shards
        assert got[key].shape == value.shape and got[key].numel() > 0
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4)


def test_fsdp_with_checkpoints_is_a_clear_error(tiny_model_dir, data, tmp_path, monkeypatch) -> None:
    from adapterkit.train.distributed import Parallel

    monkeypatch.setattr(Parallel, "sharded", property(lambda self: True))
    assert main(_args(tiny_model_dir, data, tmp_path / "f", "--parallel", "fsdp")) == 2


def _run_parts(seed: int = 0):
    """A small model with a frozen layer, AdamW and a LambdaLR: the pieces a checkpoint holds."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))


def _trained_checkpoint(path: Path) -> None:
    model, optimizer, scheduler = _run_parts()
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    progress = {"step": 2, "epoch": 1, "batch": 2, "seconds": 0.1,
                "history": {"step": [1, 2], "loss": [0.5, 0.4], "epoch": [], "epoch_step": [], "dev_accuracy": []}}
    save_checkpoint(path, model, optimizer, scheduler, progress, torch.Generator().manual_seed(4).get_state())


class FakeCuda:
    """torch.cuda's RNG calls on a machine with ``count`` devices, recording what is restored."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.restored: list[torch.Tensor] | None = None
        self.states = [torch.arange(16, dtype=torch.uint8) + i for i in range(count)]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "restored", list(states)))


def test_cuda_random_states_are_saved_and_restored(tmp_path, monkeypatch) -> None:
    saved = FakeCuda(monkeypatch, 2)
    _trained_checkpoint(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()[KEY])["cuda_rng_devices"] == 2
        assert torch.equal(handle.get_tensor("rng.cuda.1"), saved.states[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "c.safetensors", *_run_parts(1))
    assert saved.restored is not None and all(map(torch.equal, saved.restored, saved.states))
    for count in (1, 0):  # another machine: what can be restored is, and the resume says it is not exact
        here = FakeCuda(monkeypatch, count)
        with pytest.warns(UserWarning, match="CUDA random states for 2 devices, this machine has " + str(count)):
            load_checkpoint(tmp_path / "c.safetensors", *_run_parts(1))
        assert (here.restored is None) if count == 0 else torch.equal(here.restored[0], saved.states[0])


def test_a_cpu_checkpoint_holds_no_cuda_state_and_restores_the_cpu_stream(tmp_path, monkeypatch) -> None:
    FakeCuda(monkeypatch, 0)
    _trained_checkpoint(tmp_path / "c.safetensors")
    expected = torch.rand(3)  # the stream as the checkpoint saved it
    assert not [k for k in load_file(tmp_path / "c.safetensors") if k.startswith("rng.cuda")]
    torch.manual_seed(99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "c.safetensors", *_run_parts(1))
    assert torch.equal(torch.rand(3), expected)


def _rewrite_meta(path: Path, edit) -> None:
    """Change the checkpoint's JSON header and re-sign it, as a buggy writer would: only the key checks can tell."""
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()[KEY])
    tensors = load_file(path)
    text = json.dumps(edit(meta))
    save_file(tensors, path, metadata={KEY: text, DIGEST: header_digest(text, tensors)})


@pytest.mark.parametrize("edit,wanted", [
    (lambda m: [m], "header must be a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "scheduler"}, "scheduler must be a JSON object"),
    (lambda m: {**m, "format_version": "2"}, "format_version must be an integer"),
    (lambda m: {**m, "progress": {**m["progress"], "step": "3"}}, "progress.step must be a count"),
    (lambda m: {**m, "param_groups": m["param_groups"] * 2}, "groups [2, 2] in the checkpoint, [2] in this"),
    (lambda m: {**m, "scheduler": {**m["scheduler"], "last_epoch": "x"}}, "scheduler.last_epoch must be like"),
], ids=["list", "no-scheduler", "version-str", "step-str", "two-groups", "scheduler-type"])
def test_checkpoint_metadata_of_the_wrong_shape_is_a_one_line_error(edit, wanted, tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    _trained_checkpoint(path)
    _rewrite_meta(path, edit)
    model, optimizer, scheduler = _run_parts(1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ak.StateError) as exc:
        load_checkpoint(path, model, optimizer, scheduler)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: ") and wanted in str(exc.value)
    assert all(map(torch.equal, before, model.parameters())) and not optimizer.state  # nothing was restored

"""`adapterkit train` / `eval` on a causal LM: SFT on the shipped instructions and generative classification of a
labelled table write a complete run folder (adapter, metrics, samples, curve, run.json) and evaluate back the same
numbers, with and without the adapter; causal-LM defaults leave the classifier's untouched; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.cli.main import build_parser
from adapterkit.train.data import shipped_sst2
from adapterkit.train.sft_data import shipped_alpaca
from tests.cli.helpers import one_error_line, run_cli
from tests.conftest import make_tiny

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, smollm2_path) -> dict:
    """3 steps on the first 120 rows of the shipped set (its 6-row dev split keeps the per-epoch eval short)."""
    folder = tmp_path_factory.mktemp("runs")
    data = folder / "alpaca120.jsonl"
    data.write_text("\n".join(shipped_alpaca().read_text().splitlines()[:120]) + "\n")
    out = folder / "sft"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERKIT_NO_PROGRESS", "1")
        code, stdout, stderr = run_cli(["train", "--model", "smollm2", "--data", str(data),
                                        "--max-steps", "3", "--batch-size", "2", "--max-length", "96",
                                        "--samples", "2", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "data": data}


def test_sft_run_writes_adapter_metrics_samples_and_curve(sft_run):
    out = sft_run["out"]
    for name in ("adapter/adapter.json", "metrics.json", "run.json", "training_curve.png", "samples-epoch-1.jsonl"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "causal-lm" and record["model_name"] == "smollm2" and Path(record["model"]).is_dir()
    assert record["targets"] == PROJECTIONS and record["method"]["method"] == "lora"
    assert record["train_file"] == str(sft_run["data"]) and record["dev_file"] is None
    assert record["dev_split"] == {"share": 0.05, "seed": 0}
    assert record["config"]["lr"] == 2e-4 and record["config"]["max_length"] == 96 and record["config"]["head"] == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dev_examples"] + metrics["train_examples"] + \
        metrics["dropped_examples"] == 120
    assert metrics["truncated_examples"] > 0 and 0 <= metrics["padding_share"] < 0.2
    samples = [json.loads(line) for line in (out / "samples-epoch-1.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["generated"] and s["reference"] and s["messages"] for s in samples)
    assert "cut to --max-length 96" in sft_run["stdout"] and "210 modules" in sft_run["stdout"]


def test_eval_of_an_sft_run_repeats_its_dev_loss_and_base_differs(sft_run, capsys):
    from adapterkit.cli.main import main

    metrics = json.loads((sft_run["out"] / "metrics.json").read_text())
    assert main(["eval", str(sft_run["out"])]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["loss"] == pytest.approx(metrics["dev_loss"], abs=1e-3)
    assert tuned["examples"] == metrics["dev_examples"] and tuned["adapter"] is True
    assert main(["eval", str(sft_run["out"]), "--base"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["adapter"] is False and base["tokens"] == tuned["tokens"] and base["loss"] != tuned["loss"]


def _table(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_generative_classification_run_and_eval(tmp_path, smollm2_path, capsys):
    from adapterkit.cli.main import main

    train_lines = shipped_sst2()[0].read_text().splitlines()
    dev_lines = shipped_sst2()[1].read_text().splitlines()
    train = _table(tmp_path / "train.tsv", train_lines[:25])
    dev = _table(tmp_path / "dev.tsv", dev_lines[:7])
    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2", "--data", str(train), "--dev", str(dev), "--max-steps", "2",
                 "--batch-size", "4", "--samples", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["labels"] == ["0", "1"] and record["label_words"] == ["negative", "positive"]
    assert "{text}" in record["prompt"] and record["columns"] == {"text": "sentence", "label": "label"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dev_accuracy" in metrics and "dev_exact_match" in metrics and "dev accuracy" in printed
    sample = json.loads((out / "samples-epoch-1.jsonl").read_text())
    assert sample["reference"] in ("negative", "positive")
    assert main(["eval", str(out)]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["examples"] == 6 and tuned["accuracy"] == pytest.approx(metrics["dev_accuracy"], abs=0.01)
    assert main(["eval", str(out), "--base", "--data", str(dev)]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["adapter"] is False and 0 <= base["accuracy"] <= 100 and "exact_match" in base


def test_causal_lm_defaults_leave_the_classifiers_alone():
    from adapterkit.cli.llm_commands import _config

    parser = build_parser()
    plain = parser.parse_args(["train"])
    assert (plain.lr, plain.batch_size, plain.max_length, plain.epochs, plain.head) == (5e-4, 32, 64, 3, "classifier")
    config = _config(parser.parse_args(["train", "--model", "smollm2"]))
    assert (config.lr, config.batch_size, config.max_length, config.epochs, config.head) == (2e-4, 8, 512, 1, [])
    typed = _config(parser.parse_args(["train", "--lr", "1e-3", "--batch-size", "4", "--head", "lm_head"]))
    assert (typed.lr, typed.batch_size, typed.max_length, typed.head) == (1e-3, 4, 512, ["lm_head"])


def test_default_targets_for_causal_lms():
    from adapterkit.cli.defaults import default_targets

    llama, gpt2 = make_tiny("llama"), make_tiny("gpt2")
    assert default_targets(llama, "lora", causal_lm=True) == PROJECTIONS
    assert default_targets(llama, "dora", causal_lm=True) == PROJECTIONS
    assert default_targets(gpt2, "lora", causal_lm=True) == ["c_attn", "c_proj", "c_fc"]
    assert default_targets(llama, "ia3", causal_lm=True) == ["k_proj", "v_proj"]
    assert default_targets(llama, "lora") == ["q_proj", "v_proj"]  # a classifier's placement is unchanged


@pytest.mark.parametrize("extra, message", [
    (["--dev", "d.jsonl"], "--dev needs --data"),
    (["--parallel", "fsdp"], "--parallel fsdp is for classifier runs"),
    (["--batch-size", "2", "--grad-accum", "4"], "--grad-accum 4 exceeds --batch-size 2"),
    (["--max-length", "0"], "--max-length must be at least 1, got 0"),
    (["--samples", "-1"], "--samples must be at least 0"),
    (["-p", "rank=4"], "-p rank: lora has no such parameter"),
])
def test_option_errors_before_anything_loads(extra, message):
    code, _, err = run_cli(["train", "--task", "causal-lm", *extra])
    assert code == 2 and message in one_error_line(err, "train")


@pytest.mark.parametrize("extra, message", [
    (["--label-words", "bad,ok,good"], "--label-words names 3 word(s) for 2 labels (0, 1)"),
    (["--prompt", "Classify."], "--prompt must hold a {text} slot"),
])
def test_generative_classification_errors(tmp_path, smollm2_path, extra, message):
    train = _table(tmp_path / "t.tsv", shipped_sst2()[0].read_text().splitlines()[:5])
    code, _, err = run_cli(["train", "--model", "smollm2", "--data", str(train), "--out", str(tmp_path / "o"),
                            *extra])
    assert code == 2 and message in one_error_line(err, "train")


def test_bad_instruction_file_is_one_line(tmp_path, smollm2_path):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    code, _, err = run_cli(["train", "--model", "smollm2", "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2 and f"{data}:1: message 2 has role 'robot'" in one_error_line(err, "train")

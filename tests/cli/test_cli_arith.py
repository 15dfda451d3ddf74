"""`adapterkit convert`: a run's DoRA (or an adapter folder with --model) becomes a plain LoRA saved with the head;
the printed errors are the conversion's; bad inputs end in one error line. The runs are built directly (a tiny
random BERT saved with a word-level tokenizer, an adapter saved beside a run.json), not trained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.arith.convert import to_lora
from adapterkit.cli.common import load_classifier, load_run
from adapterkit.cli.main import main
from tests.cli.helpers import one_error_line
from tests.conftest import randomize

TARGETS = ["query", "value", "dense"]  # 11 modules up to (64, 32) / (32, 64): rank 32 is full everywhere


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT classifier folder with a tokenizer, as `--model` or a run.json's model names it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _run(model_dir: Path, folder: Path, spec: ak.core.spec.AdapterSpec, targets: list[str]) -> Path:
    """A run folder like `adapterkit train` writes: run.json and adapter/ (saved with the classifier head)."""
    model, _ = load_classifier(str(model_dir), 2)
    ak.attach(model, "adapter", spec, targets)
    randomize(model, "adapter", scale=0.3)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)  # a head of its own, which the conversion must carry along
    ak.save(model, folder / "adapter", "adapter", modules=("classifier",))
    (folder / "run.json").write_text(json.dumps({
        "model": str(model_dir), "labels": ["0", "1"], "config": {"head": ["classifier"], "max_length": 16},
        "columns": {"text": "sentence", "label": "label", "pair": None}}))
    return folder


@pytest.fixture(scope="module")
def dora_run(model_dir, tmp_path_factory) -> Path:
    return _run(model_dir, tmp_path_factory.mktemp("runs") / "dora", ak.DoRA(r=4, alpha=8), TARGETS)


def _logits(model, name: str | None = None) -> torch.Tensor:
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if name is None:
            return model(input_ids=ids).logits
        with ak.use(model, name):
            return model(input_ids=ids).logits


def _printed(out: str) -> tuple[float, float]:
    found = re.search(r"relative error  max (\S+) \(.*\)  mean (\S+)", out)
    assert found, out
    return float(found.group(1)), float(found.group(2))


def test_convert_help_reads_well(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for words in ("RUN_OR_ADAPTER_DIR", "--rank", "--out", "--drop-bias", "truncated SVD", "max and mean", "examples"):
        assert words in text, words
    assert main([]) == 0 and "convert" in capsys.readouterr().out  # listed in the top-level help


def test_convert_a_run_at_full_rank_reproduces_it(dora_run, model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "lora"
    assert main(["convert", str(dora_run), "--to", "lora", "-r", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'adapter' (dora, 11 modules) to a rank-32 LoRA 'adapter_lora32'" in printed and "classifier" in printed
    worst, mean = _printed(printed)
    assert worst < 1e-6 and mean <= worst
    record = json.loads((out / "adapter.json").read_text())
    assert record["spec"]["method"] == "lora" and record["modules"] == ["classifier"]
    _, source, _ = load_run(str(dora_run))
    fresh, _ = load_classifier(str(model_dir), 2)
    assert ak.load(fresh, out) == "adapter_lora32"
    torch.testing.assert_close(_logits(fresh), _logits(source), atol=1e-5, rtol=1e-5)  # head included


def test_convert_prints_the_conversions_errors(dora_run, model_dir, tmp_path, capsys) -> None:
    adapter = dora_run / "adapter"  # an adapter folder with --model, and another name
    assert main(["convert", str(adapter), "--model", str(model_dir), "-r", "2", "--name", "small",
                 "--out", str(tmp_path / "small")]) == 0
    worst, mean = _printed(capsys.readouterr().out)
    _, source, _ = load_run(str(dora_run))
    errors = to_lora(source, "adapter", 2)
    assert worst == pytest.approx(max(errors.values()), rel=1e-3)
    assert mean == pytest.approx(sum(errors.values()) / len(errors), rel=1e-3)
    assert worst > 1e-2  # rank 2 of a rank-4 DoRA change is not exact
    assert json.loads((tmp_path / "small" / "adapter.json").read_text())["name"] == "small"


def test_convert_errors_are_one_line(model_dir, dora_run, tmp_path, capsys) -> None:
    seq = _run(model_dir, tmp_path / "seq", ak.SeqBottleneck(), ["output.dense"])
    cases = [
        (["convert", str(seq), "-r", "4", "--out", str(tmp_path / "o1")], ["not mergeable"]),
        (["convert", str(dora_run), "-r", "0", "--out", str(tmp_path / "o2")], ["--rank must be at least 1"]),
        (["convert", str(dora_run / "adapter"), "-r", "4", "--out", str(tmp_path / "o3")], ["pass --model DIR"]),
        (["convert", str(dora_run), "--model", str(model_dir), "-r", "4", "--out", str(tmp_path / "o4")],
         ["run folder", "drop --model"]),
        (["convert", str(tmp_path), "-r", "4", "--out", str(tmp_path / "o5")], ["neither a run folder"]),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, "convert")
        assert all(w in line for w in words), line
        assert not Path(argv[-1], "adapter.json").exists()


def test_a_bias_change_needs_drop_bias(model_dir, tmp_path, capsys) -> None:
    run = _run(model_dir, tmp_path / "bitfit", ak.BitFit(), ["query"])
    assert main(["convert", str(run), "-r", "4", "--out", str(tmp_path / "refused")]) == 2
    line = one_error_line(capsys.readouterr().err, "convert")
    assert "a LoRA cannot hold" in line and "--drop-bias" in line
    assert main(["convert", str(run), "-r", "4", "--drop-bias", "--out", str(tmp_path / "dropped")]) == 0
    assert _printed(capsys.readouterr().out) == (1.0, 1.0)  # a bias-only change is all lost, and says so


@pytest.fixture(scope="module")
def lora_runs(model_dir, tmp_path_factory) -> list[Path]:
    """Two LoRA runs of rank 2 on the same base, with different weights and heads."""
    folder = tmp_path_factory.mktemp("loras")
    runs = []
    for i in range(2):
        torch.manual_seed(10 + i)
        runs.append(_run(model_dir, folder / f"r{i}", ak.LoRA(r=2, alpha=4), ["query", "value"]))
    return runs


def _both(model_dir: Path, runs: list[Path]):
    """A fresh model with both runs' adapters as "a0", "a1" and the first run's head."""
    model, _ = load_classifier(str(model_dir), 2)
    ak.load(model, runs[1] / "adapter", name="a1")
    ak.load(model, runs[0] / "adapter", name="a0")
    return model


def test_combine_cat_is_the_sum_with_the_first_head(lora_runs, model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "sum"
    assert main(["combine", *map(str, lora_runs), "--how", "cat", "--weights", "1,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "combined 2 adapters (cat, weights 1,1) into 'combined': 4 modules, rank 4" in printed
    fresh, _ = load_classifier(str(model_dir), 2)
    ak.load(fresh, out)
    both = _both(model_dir, lora_runs)
    with ak.use(both, "a0", "a1"):  # both deltas at once: the exact sum, under the first run's head
        want = _logits(both)
    torch.testing.assert_close(_logits(fresh, "combined"), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(both, "a0"), want, atol=1e-3)  # the second run's adapter did count


def test_combine_ties_matches_the_library(lora_runs, model_dir, tmp_path, capsys) -> None:
    from adapterkit.arith.combine import combine

    out = tmp_path / "ties"
    assert main(["combine", *map(str, lora_runs), "--how", "ties_svd", "--weights", "0.5,0.5", "--density", "0.5",
                 "--rank", "3", "--name", "t", "--out", str(out)]) == 0
    assert "rank 3" in capsys.readouterr().out
    fresh, _ = load_classifier(str(model_dir), 2)
    assert ak.load(fresh, out) == "t"
    both = _both(model_dir, lora_runs)
    combine(both, ["a0", "a1"], [0.5, 0.5], "ties_svd", "t", density=0.5, rank=3)
    torch.testing.assert_close(_logits(fresh, "t"), _logits(both, "t"), atol=1e-6, rtol=1e-6)


def test_combine_errors_are_one_line(lora_runs, tmp_path, capsys) -> None:
    runs = list(map(str, lora_runs))
    cases = [
        (["combine", *runs, "--weights", "1", "--out", str(tmp_path / "o1")], ["--weights", "1 values for 2 runs"]),
        (["combine", *runs, "--weights", "a,b", "--out", str(tmp_path / "o2")], ["comma-separated numbers"]),
        (["combine", *runs, "--how", "ties", "--out", str(tmp_path / "o3")], ["density"]),
        (["combine", *runs, "--how", "nope", "--out", str(tmp_path / "o4")], ["unknown combination type"]),
        (["combine", runs[0], str(tmp_path), "--out", str(tmp_path / "o5")], ["no run.json"]),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, "combine")
        assert all(w in line for w in words), line
        assert not Path(argv[-1], "adapter.json").exists()

"""`adapterkit continual`: a stream of labelled text tasks on a tiny encoder, its outputs, --resume, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from adapterkit.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _table(path: Path, rows: int, seed: int) -> Path:
    """Four topics, each its own words (w0-w9 for "a", w10-w19 for "b", ...)."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = "abcd"[i % 4]
        base = 10 * "abcd".index(label)
        lines.append(" ".join(f"w{base + rng.randrange(10)}" for _ in range(6)) + f"\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_continual_runs_a_stream_writes_its_result_and_resumes(model_dir, tmp_path, capsys):
    train, test = _table(tmp_path / "train.tsv", 64, 0), _table(tmp_path / "test.tsv", 32, 1)
    out = tmp_path / "run"
    args = ["continual", "--model", str(model_dir), "--data", str(train), "--test", str(test), "--tasks", "a,b/c,d",
            "--strategy", "lae", "--epochs", "3", "--lr", "1e-2", "--batch-size", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lae on 2 tasks (a+b, c+d)" in printed and "ensemble" in printed
    result = json.loads((out / "result.json").read_text())
    assert [len(row) for row in result["matrices"]["ensemble"]] == [1, 2]
    assert (out / "accuracy_matrix.png").is_file() and (out / "stream_state.safetensors").is_file()
    assert main(args + ["--resume"]) == 0  # everything is done: the saved result comes back unchanged
    assert json.loads((out / "result.json").read_text())["matrices"] == result["matrices"]


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "a,b/x"], "--tasks 'a,b/x': labels ['x'] (the data's labels: a, b, c, d)"),
    (["--tasks", "a,b/a,c"], "classes [0] were already seen in task 'a+b'"),
    (["--classes-per-task", "0"], "--classes-per-task 0: needs at least 1"),
])
def test_continual_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, message):
    train, test = _table(tmp_path / "train.tsv", 16, 0), _table(tmp_path / "test.tsv", 8, 1)
    code = main(["continual", "--model", str(model_dir), "--data", str(train), "--test", str(test),
                 "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

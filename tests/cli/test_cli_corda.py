"""`adapterkit train -p init=corda_ipm|corda_kpm`: the CLI calibrates on the training data or on --calibration
before the adapter attaches, records it, and refuses bad calibration input in one line."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import run_cli


@pytest.mark.parametrize("mode,extra", [("corda_ipm", []), ("corda_kpm", ["--calibration", "general.txt"])])
def test_corda_run_calibrates_then_trains(tmp_path, data_dir, monkeypatch, mode, extra) -> None:
    (tmp_path / "general.txt").write_text("the cat sat on the mat\n\nrain falls in spain\nwater boils at 100 c\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                                    "-p", f"init={mode}", "-p", "r=2", "--max-steps", "2", "--epochs", "1",
                                    "--batch-size", "8", "--calibration-rows", "16", "--out", str(out), *extra])
    assert code == 0, stderr
    samples = 3 if extra else 16  # the file's three non-empty lines, or the first 16 training rows
    assert f"{mode}: calibrating 2 target kinds on {samples} samples" in stdout
    record = json.loads((out / "run.json").read_text())
    assert record["calibration"]["rows"] == 16 and record["method"]["init"] == mode  # what was asked for
    saved = json.loads((out / "adapter" / "adapter.json").read_text())
    assert saved["spec"]["init"] == "residual"  # what was built: the base holds the residual
    assert record["calibration"]["source"].endswith("general.txt") == bool(extra)


@pytest.mark.parametrize("extra,message", [
    (["--calibration", "missing.txt", "-p", "init=corda_ipm"], "--calibration missing.txt: no such file"),
    (["--calibration", "empty.txt", "-p", "init=corda_kpm"], "no text (one calibration sample a line)"),
    (["--calibration", "empty.txt"], "--calibration is for -p init=corda_ipm / corda_kpm (CorDA) only"),
    (["--calibration-rows", "0", "-p", "init=corda_ipm"], "--calibration-rows must be at least 1"),
])
def test_bad_calibration_is_one_line(tmp_path, data_dir, monkeypatch, extra, message) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(["train", "--data", str(data_dir / "train.tsv"), "--max-steps", "1", "--out",
                               str(tmp_path / "run"), *extra])
    assert code != 0 and message in stderr and stderr.count("\n") == 1, stderr

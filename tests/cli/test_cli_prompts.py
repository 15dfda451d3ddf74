"""`adapterkit train --method prompt_tuning | prefix_tuning`: methods that place themselves need no targets on the
command line; the run trains, saves, explains and predicts like any other."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import run_cli


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_self_placing_method_trains_and_predicts(tmp_path, data_dir, method) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["train", "--method", method, "-p", "n_tokens=4", "--data",
                                    str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"), "--max-steps",
                                    "2", "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert code == 0, stderr
    assert f"{method} on 1 modules (its call)" in stdout
    saved = json.loads((out / "adapter" / "adapter.json").read_text())
    assert saved["spec"]["method"] == method and saved["spec"]["n_tokens"] == 4
    assert saved["targets"] == ([""] if method == "prompt_tuning" else ["bert"])  # the model, or its encoder
    code, stdout, stderr = run_cli(["explain", "--method", method, "-p", "n_tokens=4"])
    assert code == 0, stderr
    assert "1 modules" in stdout
    code, _, stderr = run_cli(["train", "--method", method, "--targets", "query", "--data",
                               str(data_dir / "train.tsv"), "--max-steps", "1", "--out", str(tmp_path / "bad")])
    assert code != 0 and "places itself" in stderr and len(stderr.strip().splitlines()) == 1

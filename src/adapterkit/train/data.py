"""Labelled text tables from local CSV / TSV / JSONL files, checked with one-line errors."""

from __future__ import annotations

import csv
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


def shipped_sst2() -> tuple[Path, Path]:
    """Paths of the SST-2 sentence-level train and dev files shipped inside the package."""
    root = resources.files("adapterkit") / "data" / "sst2"
    return Path(str(root / "train.tsv")), Path(str(root / "dev.tsv"))


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a .csv, .tsv or .jsonl file as dicts (quotes in TSV are kept literally, as GLUE needs)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = file.read_text(encoding="latin-1")
    if not text.strip():
        raise DataError(f"data file {file} is empty")
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append({k: str(v) for k, v in json.loads(line).items()})
                except (json.JSONDecodeError, AttributeError):
                    raise DataError(f"{file}:{number}: not a JSON object") from None
        return rows
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{file}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    if suffix == ".tsv":
        reader = csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    if not rows:
        raise DataError(f"data file {file} has a header but no rows")
    return rows


def read_table(path: str | Path, text_col: str, label_col: str, pair_col: str | None = None,
               label_names: list[str] | None = None) -> tuple[TextTable, list[str]]:
    """Read a labelled table; returns it and the label names (index = class id).

    Pass ``label_names`` (e.g. from the training file) to map another split's labels the same way; a label
    outside that set is an error naming the file and line.
    """
    rows = read_rows(path)
    columns = list(rows[0])
    for column in (text_col, label_col, pair_col):
        if column is not None and column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns)}); "
                            "choose with --text-column / --label-column")
    raw = [row[label_col].strip() if row[label_col] is not None else "" for row in rows]
    if label_names is None:
        label_names = _label_order(sorted(set(raw)))
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for number, value in enumerate(raw, 2):
        if value not in index:
            raise DataError(f"{path}:{number}: label {value!r} is outside the label set {label_names}")
        labels.append(index[value])
    texts = [row[text_col] or "" for row in rows]
    pairs = [row[pair_col] or "" for row in rows] if pair_col else None
    return TextTable(texts, pairs, labels), label_names


def _label_order(values: list[str]) -> list[str]:
    # integer labels keep their numeric meaning ("0" -> class 0); others are sorted names
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values

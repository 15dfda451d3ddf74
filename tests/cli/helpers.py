"""Helpers of the CLI tests: a small labelled TSV, running ``main(argv)`` in-process, and the check that an error
is one line naming only options its command has."""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
from pathlib import Path

from adapterkit.cli.main import build_parser, main

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


def options_of(command: str) -> set[str]:
    """Every option string of ``adapterkit COMMAND`` (from the real parser)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices[command]._actions for opt in action.option_strings}


def one_error_line(err: str, command: str) -> str:
    """The single ``error: ...`` line on stderr; any option it names must be one ``command`` has."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line on stderr, got {err!r}"
    assert lines[0].startswith("error: ")
    named = set(re.findall(r"(?<![\w/.-])(--[a-z][a-z-]*|-p)(?![\w-])", lines[0]))
    assert named <= options_of(command), f"{command} has no {sorted(named - options_of(command))}: {lines[0]}"
    return lines[0]

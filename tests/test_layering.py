"""Import layering of DESIGN.md: floors import downward only, and engine code never names a method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adapterkit"

# floor of each sub-package; a module may import only from its own floor or lower ones
FLOORS = {"ops": 1, "core": 1, "methods": 2, "compose": 2, "inject": 2, "merge": 2, "serve": 3, "train": 3,
          "interop": 3, "cli": 4}
# engine code: never imports a concrete method or combiner
ENGINE = ("core", "inject", "merge", "serve")


def _imports(file: Path) -> list[str]:
    tree = ast.parse(file.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.append(str(node.args[0].value))
    return [n for n in names if n.startswith("adapterkit")]


def _files() -> list[tuple[str, Path]]:
    files = [f for f in PACKAGE.rglob("*.py") if len(f.relative_to(PACKAGE).parts) > 1]
    return [(f.relative_to(PACKAGE).parts[0], f) for f in files]


@pytest.mark.parametrize("package,file", _files(), ids=lambda v: str(v).rsplit("adapterkit/", 1)[-1])
def test_imports_point_down(package: str, file: Path) -> None:
    floor = FLOORS[package]
    for name in _imports(file):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in FLOORS:
            assert package == "cli", f"{file.name} imports the package root {name} (only cli may)"
            continue
        target = parts[1]
        assert target == package or FLOORS[target] < floor or (FLOORS[target] == floor and target not in
                                                                ("methods", "compose") and package not in
                                                                ("methods", "compose")), \
            f"{package}/{file.name} imports {name}: floor {FLOORS[target]} from floor {floor}"
        if package in ENGINE:
            assert target not in ("methods", "compose"), f"engine file {package}/{file.name} imports {name}"


def test_methods_import_only_core_and_siblings() -> None:
    for file in (PACKAGE / "methods").glob("*.py"):
        for name in _imports(file):
            assert name.split(".")[1] in ("core", "methods", "ops"), f"methods/{file.name} imports {name}"


def test_engine_code_names_no_method() -> None:
    import adapterkit as ak

    words = set(ak.methods())
    for package in ENGINE:
        for file in (PACKAGE / package).glob("*.py") if (PACKAGE / package).exists() else []:
            source = file.read_text().lower()
            tree_names = {n.id.lower() for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
            strings = {n.value.lower() for n in ast.walk(ast.parse(source))
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert not words & (tree_names | strings), f"{package}/{file.name} names a method: {words & strings}"

"""Import layering of DESIGN.md: floors import downward only, no import circle (between modules or packages, lazy
imports inside functions included), and engine code never names a method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "adapterkit"

# floor of each sub-package; a module may import only from its own floor or lower ones
FLOORS = {"ops": 1, "core": 1, "models": 2, "methods": 2, "compose": 2, "inject": 2, "merge": 2, "serve": 3, "train": 3,
          "interop": 3, "arith": 3, "cli": 4}
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

    words = set(ak.methods.available())
    for package in ENGINE:
        for file in (PACKAGE / package).glob("*.py") if (PACKAGE / package).exists() else []:
            source = file.read_text().lower()
            tree_names = {n.id.lower() for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
            strings = {n.value.lower() for n in ast.walk(ast.parse(source))
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert not words & (tree_names | strings), f"{package}/{file.name} names a method: {words & strings}"


def _module_of(name: str) -> str | None:
    """The file-level module that import ``name`` refers to (a package means its __init__), or None if none."""
    parts = name.split(".")[1:]
    for cut in range(len(parts), 0, -1):  # "from adapterkit.core.errors import X" or "import adapterkit.core"
        base = PACKAGE.joinpath(*parts[:cut])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts[:cut])
    return None


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle_between_modules_or_packages() -> None:
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        rel = file.relative_to(PACKAGE).with_suffix("")
        me = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if not me:
            continue  # the package root re-exports everything: it is the top, not part of any floor
        for name in _imports(file):
            target = _module_of(name)
            if target is None or target == me:
                continue
            modules.setdefault(me, set()).add(target)
            mine, theirs = me.split(".")[0], target.split(".")[0]
            if mine != theirs:
                packages.setdefault(mine, set()).add(theirs)
    assert _cycle(packages) is None, f"import circle between packages: {' -> '.join(_cycle(packages) or [])}"
    assert _cycle(modules) is None, f"import circle between modules: {' -> '.join(_cycle(modules) or [])}"

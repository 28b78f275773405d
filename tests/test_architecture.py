"""The architecture, checked: the stages are layers that import one way only (docs/architecture.md), no
import cycle among our modules, and no function long or branchy enough to need scrolling.

Imports are read from the source with ``ast`` (function-level imports included), so the check sees what
Python would import, without importing anything. ``reflow.pipelines`` and ``reflow.cli`` live in the
top-level folders ``pipelines/`` and ``cli/`` and are mapped into the package, as setuptools installs them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"reflow": ROOT / "reflow", "reflow.pipelines": ROOT / "pipelines", "reflow.cli": ROOT / "cli"}

# Highest first: a module may import its own layer and any layer below it, never one above.
LAYERS = [
    "reflow.cli",
    "reflow.rounds",
    "reflow.eval",
    "reflow.student",
    "reflow.pairs",
    "reflow.teachers",
    "reflow.pipelines",
    "reflow.models",
    "reflow.folders",
    "reflow.core",
]
# Imported by every layer, importing nothing of ours: the error type and the version.
BASE = {"reflow.errors", "reflow.version"}
# The package root only re-exports the public API lazily (reflow/__init__.py); nothing of ours imports it.
ROOT_PACKAGE = "reflow"

MAX_LINES = 60  # a function body longer than this needs scrolling
MAX_GRADE = "C"  # radon's cyclomatic-complexity grade: D (21+) or worse must be split
# The few functions allowed past the limits, each with its reason.
EXCEPTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    """Every module of ours by dotted name."""
    found = {}
    for package, folder in FOLDERS.items():
        for file in sorted(folder.rglob("*.py")):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = file
    # a module under reflow/ shadowed by a mapped folder does not exist
    return found


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``file`` imports (top-level or inside functions)."""
    tree = ast.parse(file.read_text(), str(file))
    is_package = file.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, file, known) for name, file in mods.items()}


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(g.items()):
        if module in BASE:
            bad += [f"{module} imports {t} (the base imports nothing of ours)" for t in sorted(targets)]
            continue
        mine = layer_of(module)
        for target in sorted(targets):
            if target in BASE:
                continue
            if target == ROOT_PACKAGE and module != ROOT_PACKAGE:
                bad.append(f"{module} imports the package root {ROOT_PACKAGE} (import the module itself)")
                continue
            theirs = layer_of(target)
            if mine is None and module != ROOT_PACKAGE:
                bad.append(f"{module} is in no layer (add it to one in docs/architecture.md and LAYERS)")
            elif mine is not None and theirs is not None and theirs < mine:
                bad.append(f"{module} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]}), a layer above it")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_layers_import_one_way():
    assert layer_violations(graph()) == []


def test_no_import_cycle():
    g = {m: {t for t in ts if t != ROOT_PACKAGE} for m, ts in graph().items() if m != ROOT_PACKAGE}
    assert cycles(g) == []


def test_the_check_catches_a_wrong_import(tmp_path):
    """The contract fails on a deliberately wrong import: core importing the student, and a cycle."""
    g = graph()
    core = next(m for m in g if m.startswith("reflow.core."))
    student = next(m for m in g if m.startswith("reflow.student"))
    wrong = {**g, core: g[core] | {student}}
    assert any(f"{core} (reflow.core) imports {student}" in v for v in layer_violations(wrong))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # and it reads a function-level relative import from source
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    from ..student.loop import train\n")
    assert imports_of("reflow.core.m", pkg / "m.py", {"reflow.student.loop"}) == {"reflow.student.loop"}


def functions() -> list[tuple[str, int, str]]:
    """(qualified name, lines, radon grade) of every function and method of ours."""
    radon = pytest.importorskip("radon.complexity")
    out = []
    for name, file in modules().items():
        source = file.read_text()
        grades = {}
        for block in radon.cc_visit(source):
            for item in [block, *getattr(block, "methods", [])]:
                key = f"{item.classname}.{item.name}" if getattr(item, "classname", None) else item.name
                grades[(key, item.lineno)] = radon.cc_rank(item.complexity)
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                owner = next((c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and node in c.body), None)
                key = f"{owner}.{node.name}" if owner else node.name
                out.append((f"{name}.{key}", body_lines(node), grades.get((key, node.lineno), "A")))
    return out


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, without its signature and docstring: a Typer command's options are its
    documentation, not code a reader scrolls through."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:] or body
    return node.end_lineno - body[0].lineno + 1


def test_no_function_needs_scrolling():
    too_long = [
        f"{name}: {lines} lines" for name, lines, _ in functions() if lines > MAX_LINES and name not in EXCEPTIONS
    ]
    too_branchy = [
        f"{name}: grade {grade}" for name, _, grade in functions() if grade > MAX_GRADE and name not in EXCEPTIONS
    ]
    assert too_long + too_branchy == []

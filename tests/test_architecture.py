"""The package's shape, read from its source with `ast`: no import cycle, no private name imported across modules,
no function over 80 lines, and imports that point one way between the stages (docs/design.md, "The tree")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fyc_convert"
MAX_FUNCTION_LINES = 80
# Each layer may import itself and the layers listed for it; everything else is the wrong way round.
BASE = {"errors", "files", "options", "distributed", "report"}
ALLOWED = {
    "base": {"base"},
    "head": {"base", "head"},
    "model": {"base", "head", "model"},
    "data": {"base", "data"},
    "train": {"base", "head", "model", "data", "train"},
    "export": {"base", "head", "model", "data", "export"},
    "pipeline": {"base", "head", "model", "data", "train", "export", "pipeline"},
    "cli": {"base", "pipeline", "cli", "package"},  # the package root: __version__ (its other names load lazily)
    "package": {"base", "head", "model", "data", "train", "export", "pipeline", "cli", "package"},
}


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, packages by their __init__.py."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.with_suffix("").relative_to(root.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every fyc_convert import in the file, function-level included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == PACKAGE.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE.name:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in modules else (target, alias.name))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("head", "model", "data", "train", "export"):
        return parts[1]
    if parts[1] in BASE:
        return "base"
    return {"pipeline": "pipeline", "cli": "cli", "__main__": "cli"}.get(parts[1], parts[1])


def _graph() -> tuple[dict[str, Path], dict[str, set[str]], list[tuple[str, str, str]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            if target not in modules:
                continue
            edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                private.append((name, target, imported))
    return modules, edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    _, edges, _ = _graph()
    # a package's __init__ importing its submodules is how re-exports work; drop those edges
    pruned = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    assert _cycles(pruned) == []


def test_no_private_names_imported_across_modules():
    _, _, private = _graph()
    assert private == []


def test_no_function_over_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_imports_point_one_way():
    _, edges, _ = _graph()
    wrong = sorted(f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, ts in edges.items() for t in ts
                   if _layer(t) not in ALLOWED[_layer(m)])
    assert wrong == []


def test_every_subpackage_is_packaged():
    """pyproject's package list finds every folder with an __init__.py (a non-editable install ships them all)."""
    text = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*\ninclude = \[(.*?)\]", text, re.M)
    assert section is not None, "pyproject.toml has no [tool.setuptools.packages.find] include list"
    assert {"fyc_convert", "fyc_convert.*"} <= set(re.findall(r'"([^"]+)"', section.group(1)))
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == {"head", "model", "data", "train", "export"}


@pytest.mark.parametrize("source, expected", [
    ("import fyc_convert.a\n", []),
    ("from fyc_convert.a import _x\n", [("fyc_convert.b", "fyc_convert.a", "_x")]),
])
def test_checker_finds_private_imports(tmp_path, source, expected):
    """The checker itself: a private import is reported, a public one is not (so the tests above can fail)."""
    root = tmp_path / "fyc_convert"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("_x = 1\n")
    (root / "b.py").write_text(source)
    modules = _modules(root)
    imports = _imports("fyc_convert.b", root / "b.py", modules)
    private = [("fyc_convert.b", t, n) for t, n in imports if n and n.startswith("_")]
    assert private == expected


def test_checker_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []

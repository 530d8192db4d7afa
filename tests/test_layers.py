"""The import graph reads top-down: cli -> pipeline -> stages -> backends -> core -> config/errors.

A module may import project modules of its own layer or below, never above; no circles.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lower number = lower layer
LAYERS: list[tuple[str, int]] = [
    ("dbr_builder.errors", 0),
    ("dbr_builder.log", 0),
    ("dbr_builder.resources", 0),
    ("dbr_builder.config", 0),
    ("dbr_builder.core", 1),
    ("dbr_builder.backends", 2),
    ("dbr_builder.stages", 3),
    ("trainers", 3),
    ("dbr_builder.pipeline", 4),
    ("dbr_builder.cli", 5),
    ("dbr_builder.__main__", 6),
    ("dbr_builder", 0),  # the package itself (__version__)
]


def layer(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module}: not assigned to a layer; add it to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("dbr_builder", "trainers"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def project_imports(path: Path, mods: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in mods] or [node.module]
        for n in names:
            if n.split(".")[0] in ("dbr_builder", "trainers") and n in mods:
                found.add(n)
    return found


def test_no_upward_imports() -> None:
    mods = modules()
    bad = []
    for name, path in mods.items():
        for imp in project_imports(path, mods):
            if layer(imp) > layer(name):
                bad.append(f"{name} (layer {layer(name)}) imports {imp} (layer {layer(imp)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {name: {i for i in project_imports(p, mods) if i != name} for name, p in mods.items()}
    # a package's __init__ importing its own submodules is the package exporting them, not a cycle
    # when the submodule does not import the package back; Tarjan's SCC finds real circles.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_user_error_lives_outside_the_cli() -> None:
    from dbr_builder import errors

    assert errors.UserError.__module__ == "dbr_builder.errors"
    assert "class UserError" not in (ROOT / "dbr_builder" / "cli.py").read_text()


def test_no_hidden_function_local_imports_of_own_modules() -> None:
    """Own modules are imported at the top, where a reader sees them; the only exception is a module
    that pulls torch (imported where used, marked `# pulls torch`, so that `dbr --help` stays fast)."""
    hidden = []
    for name, path in modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else (
                    node.names[0].name if isinstance(node, ast.Import) else None)
                if mod and mod.split(".")[0] in ("dbr_builder", "trainers") and \
                        "pulls torch" not in lines[node.lineno - 1]:
                    hidden.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not hidden, "function-local imports of the project's own modules:\n" + "\n".join(hidden)

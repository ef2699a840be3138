"""The dependency rule, read from the source (imports inside functions included):

    cli ─► harness ─► analysis ─► tracking ─► core ◄─ valuers

A layer imports only itself and the layers to its right; valuers import only core
(and each other); the harness reaches valuers only through Hydra (``_target_``).
No two modules import each other, directly or in a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {
    "bench.core": {"bench.core"},
    "bench.tracking": {"bench.core", "bench.tracking"},
    "bench.analysis": {"bench.core", "bench.tracking", "bench.analysis"},
    "bench.harness": {"bench.core", "bench.tracking", "bench.analysis", "bench.harness"},
    "bench.cli": {"bench", "valuers"},                  # the programs may use anything
    "bench": {"bench.cli"},                             # bench/__main__.py
    "valuers": {"bench.core", "valuers"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("bench", "valuers"):
        for f in (REPO / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def layer(module: str) -> str:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} is in no layer; add it to a folder of bench/ or valuers/")


def imports(module: str, path: Path, known: dict) -> set[str]:
    """The project modules ``module`` imports, at any depth of its code."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def allowed(src: str, dst: str) -> bool:
    return any(dst == a or dst.startswith(a + ".") for a in ALLOWED[layer(src)])


def test_every_import_follows_the_layers():
    known = modules()
    bad = sorted(f"{src} imports {dst}" for src, path in known.items()
                 for dst in imports(src, path, known) if not allowed(src, dst))
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("src, dst, ok", [
    ("bench.core.game", "bench.harness.job", False), ("valuers.shed", "bench.tracking", False),
    ("bench.harness.job", "valuers.base", False), ("bench.cli.run", "valuers.logra", True),
    ("bench.analysis.report", "bench.tracking.schema", True), ("bench.tracking", "bench.analysis", False)])
def test_the_rule_itself(src, dst, ok):
    assert allowed(src, dst) is ok

"""The code's layout as rules that can fail: no import circles between our modules, and each stage
imports only stages before it in the data flow (config → io → compress → merge → runtime → router →
staged → front → server → evaluate → cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import branchmerge

ROOT = Path(branchmerge.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every ``branchmerge.*`` module each module imports, at any depth (function-level imports too)."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("branchmerge"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("branchmerge."))
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def _stage(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles():
    graph = _imports()
    # a package's __init__ re-exporting its children is not a circle
    edges = {m: {d for d in ds if not (m == d.rpartition(".")[0] and m in graph)} for m, ds in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if seen.get(d) == 1:
                raise AssertionError("import circle: " + " → ".join(stack[stack.index(d):] + [d]))
            if d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(edges):
        if m not in seen:
            visit(m)


ORDER = ["errors", "common", "architectures", "methods", "config_mergekit", "config", "io", "compress", "merge", "multimerge", "export", "export_vllm",
         "extract_lora", "moe", "runtime",
         "router", "staged", "front", "server", "family", "evaluate", "harness", "selection", "demo", "cli"]


def test_stages_import_only_earlier_stages():
    """config → io → compress → merge → runtime → router → staged → front → server → evaluate → cli.

    (io reads the compressed form through ``compress.Difference``, a data type; ``merge`` ends by
    loading what it wrote through ``runtime.check``: both named exceptions.)"""
    allowed_back = {("io", "compress"), ("merge", "runtime")}
    rank = {s: i for i, s in enumerate(ORDER)}
    bad = []
    for m, deps in _imports().items():
        for d in deps:
            a, b = _stage(m), _stage(d)
            if a and b and a != b and rank[b] > rank[a] and (a, b) not in allowed_back:
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_runtime_never_routes_and_math_is_pure():
    graph = _imports()
    for m, deps in graph.items():
        if _stage(m) == "runtime":
            assert not {d for d in deps if _stage(d) in ("router", "front", "server", "staged")}, m
    pure = [*sorted((ROOT / "methods").glob("*.py")), *sorted((ROOT / "compress").glob("*.py"))]
    assert len(pure) >= 8
    for path in pure:
        src = path.read_text()
        assert "open(" not in src and "Path" not in src and "transformers" not in src, path

"""The package layout's rules, read from the source: dependencies point one way (launch -> phi_bench -> data_tools ->
phi_train), no module imports itself back through others, and the entry points stay thin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("phi_train", "phi_bench", "data_tools")
# who may import whom: each layer sees only the layers below it
BELOW = {"phi_train": set(), "data_tools": {"phi_train"}, "phi_bench": {"phi_train", "data_tools"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth (function-level imports count: they still couple)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in found if n.split(".")[0] in PACKAGES}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_dependencies_point_one_way():
    bad = []
    for name, path in project_modules().items():
        layer = name.split(".")[0]
        for dep in imports(path):
            top = dep.split(".")[0]
            if top != layer and top not in BELOW[layer]:
                bad.append(f"{name} imports {dep}")
    assert not bad, bad


def test_no_import_cycles():
    mods = project_modules()
    graph = {name: {d for d in imports(path) if d in mods and d != name} for name, path in mods.items()}
    # a package's __init__ is imported with any of its submodules; ours are empty, so edges to them add nothing
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_entry_points_are_thin_and_need_no_path_tricks():
    for path in sorted((ROOT / "launch").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 200, f"{path.name}: {len(text.splitlines())} lines; move logic to a package"
        assert "sys.path" not in text, f"{path.name} edits sys.path; the packages are installed"

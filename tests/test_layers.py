"""The package's architecture, read from its imports: each part imports only the parts below it, and no module
imports another in a circle (the order is stated in CONTRIBUTING.md and in each part's ``__init__``)."""

import ast
from pathlib import Path

import pytest

DST = Path(__file__).resolve().parents[1] / "dst"
# Each part and the parts it may import: core < engine < csr and methods (side by side) < tutorial.
MAY_IMPORT = {
    "core": set(),
    "engine": {"core"},
    "csr": {"core", "engine"},
    "methods": {"core", "engine"},
    "tutorial": {"core", "engine", "csr", "methods"},
}


def module_name(path: Path) -> str:
    """``dst/engine/masked.py`` -> ``dst.engine.masked``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(DST.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(DST.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The ``dst`` modules that module ``name`` imports, anywhere in it (function bodies included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from dst.tutorial import benchmark_rows" imports a module; "from dst.core.checks import f" a name
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {module for module in found if module == "dst" or module.startswith("dst.")}


def part_of(module: str) -> str | None:
    """The part a ``dst`` module belongs to; None for the door (``dst`` itself)."""
    return module.split(".")[1] if module.count(".") >= 1 else None


def test_every_module_sits_in_a_part_whose_init_says_what_it_may_import():
    strays = [name for name in MODULES if name != "dst" and part_of(name) not in MAY_IMPORT]
    assert not strays, f"modules outside the parts {sorted(MAY_IMPORT)}: {strays}"
    for part in MAY_IMPORT:
        docstring = ast.get_docstring(ast.parse(MODULES[f"dst.{part}"].read_text()))
        assert docstring and "import" in docstring, f"dst/{part}/__init__.py must say what it may import"


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name != "dst"))
def test_a_module_imports_only_its_own_part_and_the_parts_below(name):
    part = part_of(name)
    upward = sorted(module for module in imported_modules(name)
                    if part_of(module) != part and part_of(module) not in MAY_IMPORT[part])
    assert not upward, f"{name} ({part}, which may import {sorted(MAY_IMPORT[part])}) imports {upward}"


def test_no_module_imports_another_in_a_circle():
    graph = {name: imported_modules(name) & set(MODULES) for name in MODULES}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is checked

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                circle = path[path.index(imported):] + [imported] if imported in path else [name, imported]
                pytest.fail("import circle: " + " -> ".join(circle))
            if imported not in state:
                visit(imported, path + [imported])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_the_scheduler_does_not_reach_the_simulated_engines_step():
    # DSTScheduler drives any TopologyUpdate: the truly sparse trainer uses it without the masked net's step.
    reached, frontier = set(), {"dst.engine.schedule"}
    while frontier:
        name = frontier.pop()
        reached.add(name)
        frontier |= (imported_modules(name) & set(MODULES)) - reached
    assert "dst.engine.prune_regrow" not in reached, sorted(reached)

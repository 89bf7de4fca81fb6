"""The house's shape, read from the source: no two modules import each other (directly or
round a loop), imports point down the layers of docs/ARCHITECTURE.md, and no dialect test sits
outside db/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prompt_tool"

# docs/ARCHITECTURE.md, bottom up: a module may import its own layer and the layers below.
LAYERS: dict[str, int] = {
    "errors": 0,
    "settings": 0,
    "db": 1,
    "core": 1,
    "templates": 2,
    "flags": 3,
    "ab_testing": 4,
    "compat": 5,
    "orchestration": 6,
    "migrate": 6,
    "cli": 7,
}
SIDE_BY_SIDE = {
    ("orchestration", "migrate"),
    ("migrate", "orchestration"),
    ("db", "core"),
    ("core", "db"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports_at_load(path: Path, modules: dict[str, Path]) -> set[str]:
    """prompt_tool modules ``path`` imports when it is loaded (not inside functions, not under
    TYPE_CHECKING): the edges an import cycle is made of."""
    imported: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                imported.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name in modules}


def _all_imports(path: Path) -> set[str]:
    """Every prompt_tool module ``path`` names in an import, wherever the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("prompt_tool.")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in order:
            visit(node)
    return found


def test_no_two_modules_import_each_other_even_round_a_loop() -> None:
    modules = _modules()
    graph = {
        name: _imports_at_load(path, modules) - {name} - _parents(name)
        for name, path in modules.items()
    }
    assert _cycles(graph) == []


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: path.name)
def test_imports_point_down_the_layers(path: Path) -> None:
    here = _layer(_module_name(path))
    if here is None:
        return
    upward = sorted(
        target
        for target in _all_imports(path)
        if (there := _layer(target)) is not None
        and there != here
        and (LAYERS[there] > LAYERS[here] or (here, there) in SIDE_BY_SIDE)
    )
    assert upward == [], f"{_module_name(path)} imports a layer above or beside it"


def test_no_dialect_test_outside_db() -> None:
    dialect_test = re.compile(r"dialect\.name\b|get_backend_name\(")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "db"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if dialect_test.search(line)
    ]
    assert offenders == []

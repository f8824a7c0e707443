"""The house plan holds: every import in ``src/dtback`` points down the floors of ``DESIGN.md``, and no modules import
each other in a circle. Imports are read with ``ast`` (module-level, inside functions and under TYPE_CHECKING alike),
so a lazy import cannot hide a back-arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import dtback

SRC = Path(dtback.__file__).resolve().parent

# Rooms from the ground up: a room may import itself and the rooms before it, never one after it.
FLOORS = (
    "errors", "io", "devices",  # ground: imports nothing of ours
    "viz",  # pictures, curves, report (a leaf over the run folder's files)
    "config", "download",
    "data",  # the dataset layer: folders -> clean pairs
    "identity",  # encoders (one interface), crops, cache, resampler, precompute
    "model",  # FLUX base + identity adapters
    "world",  # the identity world at run time: loaders load, never train
    "backends",  # config names -> parts
    "curate",  # the dataset builder
    "inference",
    "evaluation",  # validation metrics (training imports them) and `dtback evaluate`
    "training",
    "world_build",  # trains the world's components (uses the trainer)
    "cli", "__main__", "__init__",  # the front door
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(("dtback", *parts))


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``path`` imports (``from dtback.x import y`` counts ``dtback.x.y`` when that is a
    module, else ``dtback.x``)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("dtback"):
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    known = {module_name(path) for path in files}
    return {module_name(path): imports_of(path, known) for path in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_room_is_on_a_floor():
    rooms = {room(module) for module in import_graph()} - {"dtback"}
    assert rooms <= set(FLOORS), f"rooms missing from FLOORS (and from DESIGN.md?): {sorted(rooms - set(FLOORS))}"


def test_no_import_points_up_the_floors():
    back = []
    for module, targets in import_graph().items():
        for target in targets:
            if FLOORS.index(room(target)) > FLOORS.index(room(module)) and room(target) != "__init__":
                back.append(f"{module} -> {target}")
    assert not back, "imports from a lower room to a higher one:\n  " + "\n  ".join(sorted(back))


def test_no_import_loops():
    loops = cycles(import_graph())
    assert not loops, f"modules importing each other in a circle: {loops}"


def test_the_checker_sees_back_arrows_and_loops():
    # The checks above must be able to fail: a lazy import of a higher room and a two-module circle.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    graph = import_graph()
    assert "dtback.training.trainer" in graph["dtback.world_build.base"]  # world_build stands on training
    assert FLOORS.index("training") > FLOORS.index("evaluation") > FLOORS.index("world")

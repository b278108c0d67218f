"""The package's layers, read from its source: the engine imports no Trainer library, and no module of
hf_sam imports one that imports it back (docs/architecture.md).

Every import statement counts, also the ones under ``TYPE_CHECKING`` and inside functions: a circle
that only a type checker or a lazy import walks is still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_sam"
ENGINE_MAY_NOT_IMPORT = ("transformers", "accelerate", "datasets", "evaluate", "trl", "peft", "deepspeed")
# the engine imports nothing else of hf_sam (the config reads the engine's registry, not the other way)
ENGINE_MAY_IMPORT_FROM_HF_SAM = ("hf_sam.engine",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module that ``path`` names in an import: hf_sam modules resolved to the module that is
    imported (``from .x import y`` is x, or x.y when y is a submodule); others by their full name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue  # outside hf_sam
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "hf_sam.engine.ascent" in graph and "hf_sam.trainer.mixin" in graph
    # the reader resolves relative imports: the mixin imports the engine's class and its own siblings
    assert {"hf_sam.engine.ascent", "hf_sam.trainer.micro_batch", "transformers"} <= graph["hf_sam.trainer.mixin"]


def test_no_import_circles():
    assert circles(import_graph()) == []


def benchmark_graph() -> dict[str, set[str]]:
    """benchmarks/ is a folder of scripts that import each other by their file names (each puts its folder on
    sys.path): the same graph, over those names."""
    folder = PACKAGE.parent / "benchmarks"
    scripts = {p.stem: p for p in sorted(folder.glob("*.py"))}
    graph = {}
    for name, path in scripts.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = {m for m in found if m in scripts}
    return graph


def test_no_import_circles_in_the_benchmarks():
    graph = benchmark_graph()
    assert {"bench_step", "own_time", "traffic"} <= set(graph) and "own_time" in graph["bench_step"]
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    # the finder itself: a known circle (the one the layout removed: ascent <-> descents) and a self-import
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "d": {"d"}}
    assert sorted(circles(graph)) == [["a", "b"], ["d"]]


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("hf_sam.engine")))
def test_the_engine_imports_torch_only(name):
    imported = import_graph()[name]
    for other in imported:
        top = other.split(".")[0]
        assert top not in ENGINE_MAY_NOT_IMPORT, f"{name} imports {other}"
        if top == "hf_sam":
            assert other.startswith(ENGINE_MAY_IMPORT_FROM_HF_SAM), f"{name} imports {other}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("hf_sam.trainer")))
def test_the_trainer_never_imports_tasks_or_the_study(name):
    for other in import_graph()[name]:
        assert not other.startswith(("hf_sam.tasks", "hf_sam.study")), f"{name} imports {other}"


def test_no_module_over_450_lines():
    """A smell detector, not a rule: a module past the mark is read for a second job to move out; none is split
    only to pass it (the SAM mixin, 409 lines, holds the Trainer overrides SAM needs and nothing else)."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert long == {}

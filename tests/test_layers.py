"""The import contract: attndrift's layers, and no import circles.

Data flows one way. Each module belongs to one layer and imports only from its own layer and
the layers below it; editing and analysis are side by side and do not import each other (an
analysis runs on any model, edited or not: it takes the edit as hooks). Imports inside
functions count as much as those at the top of a module. A new module must be placed in a
layer here, which is the one place the layering is written down.
"""

import ast
from pathlib import Path

import pytest

import attndrift

ROOT = Path(attndrift.__file__).parent

#: layer -> (rank, modules); a module may import a module of a lower rank or of its own layer
LAYERS: dict[str, tuple[int, set[str]]] = {
    "base": (0, {"checks", "interrupts", "version", "_io", "registry"}),
    "models": (1, {"models"}),  # and every module of attndrift.models
    "data": (2, {"data", "distractors", "encoding", "capture", "generation"}),
    "scoring": (3, {"scoring", "metrics", "evaluation"}),
    "editing": (
        4,
        {"sadr", "value", "edits", "editors", "covariance", "layer_loop", "setting"}
        | {"rome", "memit", "pmet", "alphaedit"},
    ),
    "analysis": (4, {"cells", "drift", "patching", "tracing", "knockout"}),
    "plotting": (5, {"plotting"}),
    "experiments": (6, {"results", "sweep", "summary", "demo", "report"}),
    "cli": (7, {"cli"}),
}
#: layers of the same rank that must not import each other
SIDE_BY_SIDE = {("editing", "analysis"), ("analysis", "editing")}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (the package itself, whose ``__init__``
    re-exports the public API, is not a node of the graph)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "attndrift":
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The attndrift modules ``name`` imports anywhere in its source (functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in modules else module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    top = module.split(".")[1]
    for layer, (_, members) in LAYERS.items():
        if top in members:
            return layer
    raise KeyError(module)


def test_every_module_has_a_layer():
    unplaced = []
    for module in _graph():
        try:
            _layer(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


def test_no_module_imports_above_its_layer():
    bad = []
    for module, imported in _graph().items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if LAYERS[theirs][0] > LAYERS[mine][0] or (mine, theirs) in SIDE_BY_SIDE:
                bad.append(f"{module} ({mine}) imports {other} ({theirs})")
    assert not bad, "\n".join(sorted(bad))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    circle = _cycle(_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize(
    "graph, circle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"a"}}, True),
    ],
)
def test_the_circle_finder(graph, circle):
    assert (_cycle(graph) is not None) == circle


def test_the_contract_sees_imports_inside_functions(tmp_path):
    # an import inside a function is an edge: the circles the contract breaks were all of
    # that kind (an editor map inside edits, a loader import inside load_model)
    modules = {"attndrift.a": tmp_path / "a.py", "attndrift.b": tmp_path / "b.py"}
    modules["attndrift.a"].write_text("def f():\n    from attndrift import b\n")
    modules["attndrift.b"].write_text("from . import a\n")
    assert _imports("attndrift.a", modules["attndrift.a"], modules) == {"attndrift.b"}
    assert _imports("attndrift.b", modules["attndrift.b"], modules) == {"attndrift.a"}

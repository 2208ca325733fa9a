"""The import contract: attndrift's layers, and no import circles.

Data flows one way. Each module belongs to one layer and imports only from its own layer and
the layers below it; editing and analysis are side by side and do not import each other (an
analysis runs on any model, edited or not: it takes the edit as hooks). Imports inside
functions count as much as those at the top of a module. A module of a sub-package
(``attndrift.editing.rome``) is in its sub-package's layer; a top-level module is placed by its
own name. A new top-level module or sub-package must be placed in a layer here, which is the one
place the layering is written down.
"""

import ast
import dataclasses
from pathlib import Path

import pytest

import attndrift

ROOT = Path(attndrift.__file__).parent

#: layer -> (rank, top-level modules and sub-packages); a module may import a module of a lower
#: rank or of its own layer
LAYERS: dict[str, tuple[int, set[str]]] = {
    "base": (0, {"checks", "interrupts", "version", "_io"}),
    "models": (1, {"models"}),
    "data": (2, {"data", "distractors", "encoding", "capture", "generation"}),
    "scoring": (3, {"scoring", "metrics", "evaluation"}),
    "editing": (4, {"editing"}),
    "analysis": (4, {"analysis"}),
    "plotting": (5, {"plotting"}),
    "experiments": (6, {"experiments"}),
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


def _against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` that goes up a layer or across to a side-by-side layer."""
    bad = []
    for module, imported in graph.items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if LAYERS[theirs][0] > LAYERS[mine][0] or (mine, theirs) in SIDE_BY_SIDE:
                bad.append(f"{module} ({mine}) imports {other} ({theirs})")
    return sorted(bad)


def test_no_module_imports_above_its_layer():
    bad = _against_the_layers(_graph())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module, imported, wrong",
    [
        ("attndrift.analysis.drift", "attndrift.editing.rome", True),  # side by side
        ("attndrift.editing.value", "attndrift.analysis.cells", True),  # side by side
        ("attndrift.editing.rome", "attndrift.experiments.sweep", True),  # up
        ("attndrift.data", "attndrift.scoring", True),  # up, top-level modules
        ("attndrift.models.names", "attndrift.capture", True),  # up, out of a sub-package
        ("attndrift.plotting.drift", "attndrift.cli", True),  # up
        ("attndrift.experiments.sweep", "attndrift.editing.setting", False),  # down
        ("attndrift.editing.kit", "attndrift.editing.edits", False),  # its own layer
        ("attndrift.analysis.patching", "attndrift.capture", False),  # down
    ],
)
def test_the_layer_check(module, imported, wrong):
    assert bool(_against_the_layers({module: {imported}, imported: set()})) == wrong


def test_the_package_imports_no_flat_layout_path():
    # the short paths (attndrift.rome …) are kept for users; inside the package they would
    # hide an import from the layer check, which only sees the modules' real paths
    flat = {f"attndrift.{name}" for name in attndrift.FLAT_LAYOUT}
    used = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                paths = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                paths = {a.name for a in node.names}
            else:
                continue
            used += [f"{name} imports {p}" for p in sorted(paths & flat)]
    assert not used, "\n".join(used)


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


#: the modules of the flat layout (before the sub-packages) and where each went
MOVED = {
    **{m: f"editing.{m}" for m in ("alphaedit", "covariance", "edits", "layer_loop", "memit")},
    **{m: f"editing.{m}" for m in ("pmet", "registry", "rome", "sadr", "setting", "value")},
    "editors": "editing.kit",
    **{m: f"analysis.{m}" for m in ("cells", "drift", "knockout", "patching", "tracing")},
    **{m: f"experiments.{m}" for m in ("demo", "report", "results", "summary", "sweep")},
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_flat_layout_paths_are_the_same_modules(old, new):
    # code written against the flat layout keeps working: the old path is the very module
    # object, so what it monkeypatches is what runs
    import importlib
    import sys

    module = importlib.import_module(f"attndrift.{new}")
    assert importlib.import_module(f"attndrift.{old}") is module
    assert sys.modules[f"attndrift.{old}"] is module
    assert getattr(attndrift, old) is module
    assert attndrift.FLAT_LAYOUT[old] is module


def test_flat_layout_imports_and_monkeypatches(monkeypatch, tiny_llama):
    import attndrift.patching
    from attndrift.rome import RomeConfig, preset
    from attndrift.sweep import run

    from attndrift.analysis import patching
    from attndrift.editing import rome
    from attndrift.experiments import sweep

    assert attndrift.patching is patching
    assert (preset, RomeConfig, run) == (rome.preset, rome.RomeConfig, sweep.run)
    # a patch through the old path reaches callers inside the package
    from attndrift.editing import registry

    marker = dataclasses.replace(rome.PRESETS["tiny"])
    monkeypatch.setattr(attndrift.rome, "PRESETS", {"tiny": marker})
    assert registry.get("rome").preset(tiny_llama) is marker


def test_every_sub_package_ships():
    # setuptools installs the packages pyproject.toml lists, not the folders it finds: a new
    # sub-package left out works from the source tree and is missing from every install
    import tomllib

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"

"""The tutorials in notebooks/: written for a person (contents, a setup cell, prose after every
figure, public API only, no index arithmetic), and they run top to bottom on the embedded model
without an error or a warning (small settings: ATTNDRIFT_SMALL=1)."""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: a code line that ends by drawing a figure (the cell's output is the figure)
FIGURE = re.compile(r"^(ad\.plotting\.\w+|px\.\w+)\(", re.MULTILINE)
#: arithmetic on an index or a layer number a reader would have to decode
INDEX_ARITHMETIC = re.compile(r"\w\[-?\d+\]\s*[-+]\s*\d|\+\s*1\s*\+\s*\w")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _last_statement(source: str) -> str:
    """The cell's last top-level statement (what Jupyter displays)."""
    lines = [x for x in source.rstrip().splitlines() if x.strip()]
    starts = [i for i, x in enumerate(lines) if not x.startswith((" ", ")", "]", "}"))]
    return "\n".join(lines[starts[-1] :]) if starts else ""


def test_notebooks_are_numbered_and_stripped():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]
    for path in NOTEBOOKS:
        for cell in _cells(path):
            assert not cell.get("outputs"), f"{path.name} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} has execution counts"
            source = "".join(cell["source"])
            if cell["cell_type"] == "code":
                # public API only: the notebooks go through `import attndrift as ad`
                assert "attndrift." not in source.replace("import attndrift as ad", "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reads_as_a_tutorial(path):
    cells = _cells(path)
    sources = ["".join(c["source"]) for c in cells]
    title, contents = sources[0], sources[1]
    assert cells[0]["cell_type"] == "markdown" and title.startswith(f"# {path.name[:2]} — ")
    assert contents.startswith("**Contents**")
    # every entry of the contents is a heading of the notebook
    headings = {
        line[3:].strip() for s in sources for line in s.splitlines() if line.startswith("## ")
    }
    entries = re.findall(r"\d+\. \[([^\]]+)\]\(#([^)]+)\)", contents)
    assert entries and all(name in headings and anchor == name.replace(" ", "-")
                           for name, anchor in entries), entries  # fmt: skip
    # a setup cell that installs what is missing, and nothing about how the project is built
    setup = next(s for c, s in zip(cells, sources, strict=True) if c["cell_type"] == "code")
    assert "%pip install" in setup and "import attndrift as ad" in setup
    text = "\n".join(sources)
    assert not re.search(r"\bCI\b|continuous integration", text)
    assert not INDEX_ARITHMETIC.search(text), INDEX_ARITHMETIC.search(text).group(0)
    # prose after every figure: the cell after a figure says what to notice
    for i, (cell, source) in enumerate(zip(cells, sources, strict=True)):
        if cell["cell_type"] == "code" and FIGURE.match(_last_statement(source)):
            assert i + 1 < len(cells) and cells[i + 1]["cell_type"] == "markdown", (
                f"{path.name}: no prose after the figure of cell {i}"
            )


def test_the_checks_can_fail():
    assert INDEX_ARITHMETIC.search('{"layer": edits[g].layers[0] + 1 + i}')
    assert not INDEX_ARITHMETIC.search("watched = ad.sadr.watched_layers(model, edit.layers)")
    assert FIGURE.match(_last_statement('x = 1\nad.plotting.drift_heatmap(d, "kl")'))
    assert FIGURE.match(_last_statement("px.line(trace, x='step',\n        y='sadr')"))
    assert not FIGURE.match(_last_statement("fig = ad.plotting.headline(a, b)\nfig.data"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDRIFT_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # no warning in the outputs (e.g. tqdm's "IProgress not found" without ipywidgets)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr, stderr[-2000:]
    # every figure is followed by prose (checked on the executed cells too)
    for i, cell in enumerate(nb.cells):
        figures = [o for o in cell.get("outputs", []) if "application/vnd.plotly.v1+json" in
                   o.get("data", {})]  # fmt: skip
        if figures:
            assert nb.cells[i + 1].cell_type == "markdown", f"no prose after cell {i}"

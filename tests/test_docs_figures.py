"""The figures of docs/ draw cleanly from the committed results, and the committed PNGs are
those drawings (their size); checked in headless Chromium, skipped where none is installed."""

import importlib.util
import struct
from pathlib import Path

import pytest

from attndrift import plotting

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "scripts" / "docs_figures.py")
docs_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_figures)

needs_chromium = pytest.mark.skipif(
    plotting.chromium() is None,
    reason="no chromium on the PATH (Debian/Ubuntu: apt-get install chromium); the docs "
    "figures are drawn in a real headless browser only where one is installed",
)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_every_docs_figure_is_drawn_by_the_script():
    committed = {p.name for p in (ROOT / "docs" / "figures").glob("*.png")}
    assert committed == set(docs_figures.FIGURES)
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for name in committed:
        assert f"figures/{name}" in text, f"docs/figures/{name} is not shown in docs/"


@needs_chromium
@pytest.mark.parametrize("name", sorted(docs_figures.FIGURES))
def test_docs_figure_draws_cleanly_at_its_committed_size(name, tmp_path):
    figures = docs_figures.FIGURES[name]()
    png = plotting.save_png(figures, tmp_path / name)  # refuses a figure that draws badly
    width = max(f.layout.width or plotting.STATIC_WIDTH for f in figures)
    height = sum(f.layout.height or plotting.STATIC_HEIGHT for f in figures)
    assert _png_size(png) == (width, height)
    assert _png_size(ROOT / "docs" / "figures" / name) == (width, height)

"""Saving figures: :func:`save_html` (standalone, plotly.js embedded) and :func:`save_png` (a
static PNG without the modebar, through headless Chromium or kaleido; a clear RuntimeError
when neither is there). :func:`layout_problems` lists what a browser draws outside a figure or
on top of another label."""

import html
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go


def save_html(figures: go.Figure | Sequence[go.Figure], path: str | Path) -> Path:
    """Write one or several figures to one standalone HTML file (plotly.js embedded, offline)."""
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to save")
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)
    ]
    page = (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>attndrift</title></head>\n'
        "<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


#: the size of a static figure whose layout sets none (px)
STATIC_WIDTH, STATIC_HEIGHT = 1000, 450
#: browsers :func:`save_png` and :func:`layout_problems` look for on the PATH, in order
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: run in the page once every figure is drawn: what lies outside its figure, what covers a
#: title, a title on a plot area, and legends that scroll; written into the page as JSON
_CHECK = r"""
function attndriftCheck() {
  var problems = [];
  var title = function (t) {
    var c = t.getAttribute('class') || '';
    return /title$/.test(c) || c === 'annotation-text';
  };
  var name = function (t) { return JSON.stringify(t.textContent.trim().slice(0, 50)); };
  document.querySelectorAll('.js-plotly-plot').forEach(function (gd, k) {
    var box = gd.getBoundingClientRect();
    var texts = Array.from(gd.querySelectorAll('svg text')).filter(function (t) {
      var r = t.getBoundingClientRect();
      return t.textContent.trim() && r.width > 0 && r.height > 0;
    });
    texts.forEach(function (t) {
      var r = t.getBoundingClientRect();
      if (r.left < box.left - 2 || r.right > box.right + 2 || r.top < box.top - 2 ||
          r.bottom > box.bottom + 2) {
        problems.push('figure ' + (k + 1) + ': ' + name(t) + ' lies outside the figure');
      }
    });
    var labels = texts.filter(function (t) {
      return (t.parentNode.getAttribute('class') || '').indexOf('textpoint') >= 0;
    });
    labels.forEach(function (a, i) {
      labels.slice(i + 1).forEach(function (b) {
        var ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
        var w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        var h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(a) + ' overlaps ' + name(b));
        }
      });
    });
    texts.filter(title).forEach(function (a) {
      var ra = a.getBoundingClientRect();
      texts.forEach(function (b) {
        if (a === b || (title(b) && a.compareDocumentPosition(b) & 2)) return;
        var rb = b.getBoundingClientRect();
        var w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        var h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(a) + ' overlaps ' + name(b));
        }
      });
    });
    var plots = (gd._fullLayout && gd._fullLayout._plots) || {};
    Object.keys(plots).forEach(function (id) {
      var xa = plots[id].xaxis, ya = plots[id].yaxis;
      var area = {left: box.left + xa._offset, right: box.left + xa._offset + xa._length,
                  top: box.top + ya._offset, bottom: box.top + ya._offset + ya._length};
      texts.filter(title).forEach(function (t) {
        var r = t.getBoundingClientRect();
        var w = Math.min(r.right, area.right) - Math.max(r.left, area.left);
        var h = Math.min(r.bottom, area.bottom) - Math.max(r.top, area.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(t) + ' lies on the plot of ' + id);
        }
      });
    });
    gd.querySelectorAll('.legend .scrollbar').forEach(function (bar) {
      var r = bar.getBoundingClientRect();
      if (r.height > 0 && r.width > 0) {
        problems.push('figure ' + (k + 1) + ': the legend scrolls (part of it is hidden)');
      }
    });
    if (gd.querySelector('.modebar-container .modebar-btn')) {
      problems.push('figure ' + (k + 1) + ': the modebar is shown');
    }
  });
  var out = document.createElement('pre');
  out.id = 'attndrift-problems';
  out.textContent = JSON.stringify(problems);
  document.body.appendChild(out);
}
window.addEventListener('load', function () { setTimeout(attndriftCheck, 200); });
"""


def _static(fig: go.Figure) -> go.Figure:
    """A copy with an explicit size (what a static export draws)."""
    out = go.Figure(fig)
    out.update_layout(
        width=fig.layout.width or STATIC_WIDTH, height=fig.layout.height or STATIC_HEIGHT
    )
    return out


def _static_page(figures: Sequence[go.Figure], check: bool) -> str:
    """The figures stacked on one page at their sizes, without modebars (and the check)."""
    from plotly.offline import get_plotlyjs

    config = {"displayModeBar": False, "responsive": False}
    divs = [f.to_html(full_html=False, include_plotlyjs=False, config=config) for f in figures]
    script = f"<script>{_CHECK}</script>" if check else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<style>body{margin:0;background:white} div{margin:0}</style>"
        f"<script>{get_plotlyjs()}</script>{script}</head><body>" + "".join(divs) + "</body></html>"
    )


def chromium() -> str | None:
    """The headless browser :func:`save_png` uses (None when none is installed)."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _browse(page: str, *args: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium with ``args`` (a throwaway profile; nothing else on
    disk changes)."""
    browser = chromium()
    if browser is None:
        raise RuntimeError(
            "no Chrome/Chromium browser on the PATH (Debian/Ubuntu: apt-get install chromium)"
        )
    with tempfile.TemporaryDirectory(prefix="attndrift-png-") as tmp:
        html_path = Path(tmp) / "figure.html"
        html_path.write_text(page, encoding="utf-8")
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={Path(tmp) / 'profile'}",
            "--virtual-time-budget=10000", *args, html_path.as_uri(),
        ]  # fmt: skip
        return subprocess.run(
            command, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": tmp}
        )


def layout_problems(figures: go.Figure | Sequence[go.Figure]) -> list[str]:
    """What a browser draws badly when the figures are exported at their sizes: labels outside
    the figure (cut off), a label over a title, a title on a plot area (e.g. an axis title on
    the panel below), a legend that scrolls, a modebar. Needs Chromium (:func:`chromium`).

    Returns:
        One sentence per problem (empty: the figures draw cleanly).
    """
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to check")
    shown = [_static(f) for f in figures]
    width = max(int(f.layout.width) for f in shown)
    height = sum(int(f.layout.height) for f in shown)
    done = _browse(
        _static_page(shown, check=True), f"--window-size={width},{height + 200}", "--dump-dom"
    )
    found = done.stdout.split('<pre id="attndrift-problems">', 1)
    if done.returncode != 0 or len(found) != 2:
        raise RuntimeError(f"Chromium could not draw the figures: {done.stderr[-500:]}")
    return json.loads(html.unescape(found[1].split("</pre>", 1)[0]))


def _kaleido_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def save_png(
    figures: go.Figure | Sequence[go.Figure], path: str | Path, *, check: bool = True
) -> Path:
    """Write a static PNG of one figure, or of several stacked, at their layout sizes (width
    :data:`STATIC_WIDTH`, height :data:`STATIC_HEIGHT` where unset), without the modebar.

    Renders with headless Chromium where one is installed (:func:`chromium`), else with the
    optional package kaleido (one figure). With ``check`` (Chromium only), a figure that draws
    badly (:func:`layout_problems`: a label cut off or over a title, a scrolling legend) is
    refused with a ValueError that lists the problems, and no file is written.

    Raises:
        RuntimeError: neither Chromium nor kaleido can render.
        ValueError: ``check`` found problems.
    """
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to save")
    path = Path(path)
    shown = [_static(f) for f in figures]
    if chromium() is not None:
        if check:
            problems = layout_problems(shown)
            if problems:
                raise ValueError("the figure draws badly: " + "; ".join(problems))
        width = max(int(f.layout.width) for f in shown)
        height = sum(int(f.layout.height) for f in shown)
        path.parent.mkdir(parents=True, exist_ok=True)
        done = _browse(
            _static_page(shown, check=False),
            f"--window-size={width},{height}",
            f"--screenshot={path.resolve()}",
        )
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"Chromium could not render the PNG: {done.stderr[-500:]}")
        return path
    if not _kaleido_available():
        raise RuntimeError(
            "save_png needs a Chrome/Chromium browser (Debian/Ubuntu: apt-get install "
            "chromium) or the optional package kaleido (pip install kaleido); use save_html "
            "for a standalone file instead"
        )
    if len(shown) != 1:
        raise RuntimeError("kaleido writes one figure per PNG: install Chromium to stack them")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        shown[0].write_image(path, format="png")
    except Exception as err:
        raise RuntimeError(
            f"kaleido could not render the PNG ({type(err).__name__}: {err}); it needs a "
            "Chrome/Chromium browser. Use save_html for a standalone file instead"
        ) from err
    return path

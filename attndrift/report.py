"""Report: one self-contained HTML page of sections (text, tables, plotly figures).

plotly.js is embedded once (the page works offline); figures are inlined as divs. Only
rendering happens here: callers compute, and the CLI writes the file.
"""

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class Section:
    """A heading with paragraphs, tables and figures, rendered in that order."""

    title: str
    paragraphs: Sequence[str] = ()
    tables: Sequence[pd.DataFrame] = ()
    figures: Sequence[go.Figure] = ()
    notes: Sequence[str] = field(default_factory=tuple)


def render(title: str, sections: Sequence[Section], footer: str = "") -> str:
    """The whole page as a string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        parts += [t.to_html(border=0, float_format=lambda x: f"{x:.3f}") for t in s.tables]
        parts += [f.to_html(full_html=False, include_plotlyjs=False) for f in s.figures]
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in s.notes]
    if footer:
        parts.append(f"<hr><p class='note'>{html.escape(footer)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)

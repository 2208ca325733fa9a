"""Report: one self-contained HTML page of sections (text, tables, plotly figures).

plotly.js is embedded once (the page works offline); figures are inlined as divs. Only
rendering happens here: callers compute (what failed, which numbers rest on too few probes),
and the CLI writes the file.

* :class:`Section`: a heading with paragraphs, tables, figures and notes;
* :class:`Figure`: a plotly figure with a caption above it (numbered "Figure 1", …);
* :func:`table`: a DataFrame as a styled HTML table: wrapped text columns, right-aligned
  numbers, grouped column headers (MultiIndex columns), failed cells (class ``failed``, ✗)
  and cells that rest on too few observations (class ``uncertain``, †);
* :func:`render`: the whole page.
"""

import html
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

#: CSS class and marker of failed cells (:func:`table`'s ``failed``)
FAILED, FAILED_MARK = "failed", "✗"
#: CSS class and marker of cells that rest on too few observations (``uncertain``)
UNCERTAIN, UNCERTAIN_MARK = "uncertain", "†"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; }
p { max-width: 60em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0 0.4em;
        font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: #444; padding-bottom: 0.3em; }
th, td { padding: 0.3em 0.65em; vertical-align: top; }
thead th { border-bottom: 1px solid #888; font-weight: 600; text-align: center; }
thead tr:first-child th { border-top: 2px solid #444; }
thead th.group { border-bottom: 1px solid #bbb; }
tbody tr:last-child td, tbody tr:last-child th { border-bottom: 2px solid #444; }
tbody tr.group-start td, tbody tr.group-start th { border-top: 1px solid #ccc; }
tbody th { text-align: left; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
td.txt { text-align: left; white-space: nowrap; }
td.wrap { text-align: left; min-width: 18em; max-width: 34em; white-space: normal;
          overflow-wrap: anywhere; }
td.failed { background: #fde2df; color: #8b1a10; font-weight: 600; }
td.uncertain { color: #777; font-style: italic; }
span.mark { font-weight: 700; }
figure { margin: 1.2em 0 1.6em; }
figcaption { color: #333; margin-bottom: 0.4em; max-width: 60em; }
.note { color: #555; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class Html:
    """Ready HTML (from :func:`table`), inserted as is."""

    text: str


@dataclass(frozen=True)
class Figure:
    """A plotly figure with a one-sentence caption shown above it."""

    figure: go.Figure
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A heading with paragraphs, tables and figures, rendered in that order.

    Tables are DataFrames (rendered by :func:`table` with its defaults) or :class:`Html`
    from :func:`table`; figures are plotly figures or captioned :class:`Figure`.
    """

    title: str
    paragraphs: Sequence[str] = ()
    tables: Sequence[pd.DataFrame | Html] = ()
    figures: Sequence[go.Figure | Figure] = ()
    notes: Sequence[str] = field(default_factory=tuple)


def _mask(mask: pd.DataFrame | None, frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """A boolean mask of ``frame``'s shape (missing rows and columns: False)."""
    if mask is None:
        return pd.DataFrame(False, index=frame.index, columns=frame.columns)
    unknown = set(mask.columns) - set(frame.columns)
    if unknown:
        raise ValueError(f"{name} names columns the table lacks: {sorted(map(str, unknown))}")
    return mask.reindex(index=frame.index, columns=frame.columns, fill_value=False).astype(bool)


def _cell(value, digits: int) -> tuple[str, bool]:
    """``(escaped text, numeric)`` of one value: floats with ``digits`` decimals, NaN as —,
    booleans as ✓/✗."""
    if isinstance(value, bool | np.bool_):
        return ("✓" if value else "✗"), False
    if isinstance(value, numbers.Integral):
        return str(value), True
    if isinstance(value, numbers.Real):
        return ("—" if math.isnan(value) else f"{value:.{digits}f}"), True
    if value is None:
        return "—", False
    return html.escape(str(value)), False


def _header(frame: pd.DataFrame, index: bool) -> list[str]:
    """Header rows; MultiIndex columns give one row per level, equal neighbours merged."""
    columns = [c if isinstance(c, tuple) else (c,) for c in frame.columns]
    levels = max((len(c) for c in columns), default=1)
    rows = []
    for level in range(levels):
        cells = []
        if index and level == 0:
            name = frame.index.name if frame.index.name is not None else ""
            cells.append(f"<th rowspan='{levels}'>{html.escape(str(name))}</th>")
        j = 0
        while j < len(columns):
            prefix = columns[j][: level + 1]
            span = 1
            while j + span < len(columns) and columns[j + span][: level + 1] == prefix:
                span += 1
            label = str(prefix[-1]) if len(prefix) > level else ""
            last = level == levels - 1
            cls = "" if last else " class='group'" if label else " style='border-bottom:0'"
            cells.append(f"<th colspan='{span}'{cls}>{html.escape(label)}</th>")
            j += span
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def table(
    frame: pd.DataFrame,
    failed: pd.DataFrame | None = None,
    uncertain: pd.DataFrame | None = None,
    *,
    wrap: Sequence = (),
    group: object = None,
    index: bool | None = None,
    digits: int = 3,
    caption: str = "",
) -> Html:
    """A DataFrame as a styled HTML table.

    Numbers are right-aligned (floats with ``digits`` decimals, NaN as —), text is left-aligned,
    booleans show as ✓/✗, and 2-level (MultiIndex) columns get a grouped header.

    Args:
        frame: the table (shown as is: format strings before if needed).
        failed: booleans, same index and columns as ``frame`` (or a subset of its columns):
            the cells marked True get the CSS class ``failed`` (a red cell) and a ✗.
        uncertain: booleans likewise: cells that rest on too few observations to read get the
            class ``uncertain`` (grey, italic) and a †. The caller says what † means.
        wrap: columns of long text (e.g. prompts), shown in full and wrapped.
        group: a column whose changes start a new group of rows (a rule above each group).
        index: show the index as the first column (default: unless it is a RangeIndex).
        digits: decimals of floats.
        caption: a caption above the table.
    """
    failed_ = _mask(failed, frame, "failed")
    uncertain_ = _mask(uncertain, frame, "uncertain")
    if index is None:
        index = not isinstance(frame.index, pd.RangeIndex)
    missing = [c for c in (*wrap, *([group] if group is not None else [])) if c not in frame]
    if missing:
        raise ValueError(f"no such columns: {missing}")
    wrapped = set(wrap)
    groups = list(frame[group]) if group is not None else [None] * len(frame)
    body = []
    for i, label in enumerate(frame.index):
        start = i > 0 and groups[i] != groups[i - 1]
        cells = [f"<th>{html.escape(str(label))}</th>"] if index else []
        for j, column in enumerate(frame.columns):
            text, numeric = _cell(frame.iat[i, j], digits)
            classes = ["wrap" if column in wrapped else "num" if numeric else "txt"]
            if failed_.iat[i, j]:
                classes.append(FAILED)
                text = f"<span class='mark'>{FAILED_MARK}</span> {text}"
            if uncertain_.iat[i, j]:
                classes.append(UNCERTAIN)
                text = f"{text} <span class='mark'>{UNCERTAIN_MARK}</span>"
            cells.append(f"<td class='{' '.join(classes)}'>{text}</td>")
        cls = " class='group-start'" if start else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    head = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return Html(
        f"<table>{head}<thead>{''.join(_header(frame, index))}</thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def render(title: str, sections: Sequence[Section], footer: str = "") -> str:
    """The whole page as a string (plotly.js inlined once); captioned figures are numbered."""
    from plotly.offline import get_plotlyjs

    config = {"displaylogo": False, "responsive": True}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    number = 0
    for s in sections:
        parts.append(f"<section id='{_slug(s.title)}'><h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        parts += [(t if isinstance(t, Html) else table(t)).text for t in s.tables]
        for f in s.figures:
            fig, caption = (f.figure, f.caption) if isinstance(f, Figure) else (f, "")
            div = fig.to_html(full_html=False, include_plotlyjs=False, config=config)
            if caption:
                number += 1
                caption = f"<figcaption><b>Figure {number}.</b> {html.escape(caption)}</figcaption>"
            parts.append(f"<figure>{caption}{div}</figure>")
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in s.notes]
        parts.append("</section>")
    if footer:
        parts.append(f"<hr><p class='note'>{html.escape(footer)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)

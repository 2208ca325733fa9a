"""Sweep summaries (:mod:`attndrift.experiments.summary` frames): the γ trade-off curves, the
trade-off map (one point per setting) and specificity against edit strength."""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attndrift.plotting.common import DASHES, METRIC_COLOURS, VANILLA, style
from attndrift.plotting.export import STATIC_HEIGHT, STATIC_WIDTH


def _percent_range(
    values: Sequence[float] | np.ndarray, pad: float = 4.0, span: float = 10.0
) -> list[float]:
    """A y range in % fitted to the values (intervals included), inside [0, 100] plus room for
    the markers at the ends, at least ``span`` points wide."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return [0.0, 100.0]
    low, high = max(0.0, float(v.min()) - pad), min(100.0, float(v.max()) + pad)
    if high - low < span:
        middle = (high + low) / 2
        low, high = max(0.0, middle - span / 2), min(100.0, middle + span / 2)
        low, high = (100.0 - span, 100.0) if high >= 100 else (low, max(high, low + span))
    return [low - 1.5, high + 1.5]


def tradeoff(frame, editor: str | None = None, title: str = "") -> go.Figure:
    """The γ trade-off: edit success (ES, PS) and specificity (NS, RS, DNS) against γ.

    One curve per editor, head selection and variant (a colour per metric, a line style per
    curve); an editor's γ = 0 row (its baseline) starts every curve of that editor. Values and
    intervals are in %, the intervals clipped to [0, 100] and the axis fitted to them. The
    legend lists the metrics' colours and the curves' line styles once each.

    Args:
        frame: :func:`attndrift.experiments.summary.tradeoff` — one row per setting with ``editor``,
            ``gamma``, ``selection`` (``variant``: optional) and each metric with
            ``_low``/``_high`` interval bounds.
        editor: plot one editor's rows only (default: all).
        title: the figure title (default: what is plotted; name the model and the records).
    """
    if editor is not None:
        frame = frame[frame["editor"] == editor]
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("edit success", "specificity"), shared_yaxes=True
    )
    if "variant" not in frame:
        frame = frame.assign(variant="")
    gammas = sorted(frame["gamma"].unique())
    labels = [f"{g:g}" for g in gammas]
    sadr_rows = frame[frame["gamma"] > 0]
    curves = list(sadr_rows.groupby(["editor", "selection", "variant"], sort=True)) or [
        ((ed, True, ""), sadr_rows)
        for ed in sorted(set(frame["editor"]))  # baselines only
    ]
    shown, kinds_drawn = [], []
    for i, ((ed, selection, variant), part) in enumerate(curves):
        base = frame[(frame["editor"] == ed) & (frame["gamma"] == 0)]
        part = pd.concat([base, part])
        if part["gamma"].duplicated().any():
            raise ValueError(
                f"two settings of {ed} (variant {variant or 'none'}) at one γ: choose the "
                "settings to plot (summarize --settings)"
            )
        part = part.set_index("gamma").reindex(gammas)
        suffix = f"{ed}, {'selected heads' if selection else 'all heads'}"
        suffix += f", {variant}" if variant else ""
        dash = DASHES[i % len(DASHES)]
        for col, kinds in ((1, ("ES", "PS")), (2, ("NS", "RS", "DNS"))):
            for kind in kinds:
                y = 100 * part[kind].to_numpy(float)
                if np.isnan(y).all():
                    continue
                low = np.clip(100 * part[f"{kind}_low"].to_numpy(float), 0, 100)
                high = np.clip(100 * part[f"{kind}_high"].to_numpy(float), 0, 100)
                shown += [*y, *low, *high]
                kinds_drawn.append(kind)
                fig.add_trace(
                    go.Scatter(
                        x=labels,
                        y=y,
                        error_y={
                            "type": "data",
                            "symmetric": False,
                            "array": np.maximum(high - y, 0),
                            "arrayminus": np.maximum(y - low, 0),
                        },
                        mode="lines+markers",
                        connectgaps=True,
                        cliponaxis=False,
                        line={"dash": dash, "color": METRIC_COLOURS[kind]},
                        name=f"{kind} ({suffix})",
                        legendgroup=kind,
                        showlegend=False,
                    ),
                    row=1,
                    col=col,
                )
        fig.add_trace(  # the curve's line style, once in the legend
            go.Scatter(
                x=[None], y=[None], mode="lines", name=suffix, legendgroup=suffix,
                line={"dash": dash, "color": "#444"},
            )
        )  # fmt: skip
    for kind in dict.fromkeys(kinds_drawn):  # each metric's colour, once in the legend
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=kind, legendgroup=kind,
                marker={"color": METRIC_COLOURS[kind], "size": 10, "symbol": "square"},
            )
        )  # fmt: skip
    fig.update_xaxes(title_text="SADR γ", type="category")
    fig.update_yaxes(title_text="% of probes right (95 % interval)", row=1, col=1)
    fig.update_yaxes(range=_percent_range(shown))
    entries = len(curves) + len(set(kinds_drawn))
    fig.update_layout(
        title=title or "SADR trade-off: edit success vs specificity across γ",
        height=max(460, 22 * entries + 200),
        legend={"tracegroupgap": 4, "title": {"text": "colour: metric · line: curve"}},
    )
    return style(fig)


#: where a point's label may go, tried in order: plotly's position, and which way its centre
#: lies from the point (x, y: -1, 0, 1)
_LABEL_SPOTS = (("top center", (0, 1)), ("bottom center", (0, -1)), ("middle right", (1, 0)),
                ("middle left", (-1, 0)), ("top right", (1, 1)), ("bottom left", (-1, -1)),
                ("top left", (-1, 1)), ("bottom right", (1, -1)))  # fmt: skip


def _label_positions(
    x: np.ndarray, y: np.ndarray, labels: Sequence[str], x_range: list, y_range: list
) -> list[str]:
    """A text position per point whose label covers no marker and no label placed before it
    (points taken left to right; label boxes estimated at 7 px a character in a 1000 x 450 px
    figure)."""
    sx = 0.76 * STATIC_WIDTH / (x_range[1] - x_range[0])
    sy = 0.6 * STATIC_HEIGHT / (y_range[1] - y_range[0])
    points = [(float(a) * sx, float(b) * sy) for a, b in zip(x, y, strict=True)]
    placed = [(px - 5, px + 5, py - 5, py + 5) for px, py in points]  # the markers
    out = ["top center"] * len(labels)
    for i in sorted(range(len(labels)), key=lambda k: points[k]):
        if not labels[i]:
            continue
        w, h = 7.0 * len(labels[i]) + 4, 16.0
        px, py = points[i]
        box = placed[i]
        for spot, (dx, dy) in _LABEL_SPOTS:
            cx = px + dx * (w / 2 + (8 if not dy else 0))
            cy = py + dy * (h / 2 + 7)
            box = (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2)
            out[i] = spot
            if not any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3]
                       for b in placed):  # fmt: skip
                break
        placed.append(box)
    return out


def _short_keys(keys: list[str]) -> list[str]:
    """Setting keys without the ``|``-parts they all share (``rome``, ``steps=80``, …)."""
    parts = [k.split("|") for k in keys]
    shared = set.intersection(*map(set, parts)) if len(keys) > 1 else set()
    return ["|".join(p for p in ps if p not in shared) or "|".join(ps) for ps in parts]


def tradeoff_map(frame, title: str = "") -> go.Figure:
    """Every setting as one point: paraphrase success (PS) against the harmonic mean of RS and
    DNS (``RS_DNS``, what the SADR rule maximises), with ES in the hover text; up and right is
    better. Both axes in %, fitted to the points inside [0, 100].

    Args:
        frame: :func:`attndrift.experiments.summary.tradeoff`.
        title: the figure title (default: what is plotted).
    """
    if frame.empty:
        raise ValueError("no settings to plot")
    x = 100 * frame["RS_DNS"].to_numpy(float)
    y = 100 * frame["PS"].to_numpy(float)
    labels = _short_keys(list(frame["setting"]))
    x_range, y_range = _percent_range(x, 8.0), _percent_range(y, 8.0)
    # points that (nearly) coincide share one label: "a · b" on the first, none on the others
    near = 0.01 * (x_range[1] - x_range[0]), 0.01 * (y_range[1] - y_range[0])
    for i in range(len(labels)):
        for j in range(i):
            if labels[j] and abs(x[i] - x[j]) < near[0] and abs(y[i] - y[j]) < near[1]:
                labels[j], labels[i] = f"{labels[j]} · {labels[i]}", ""
                break
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="markers+text",
            text=labels,
            textposition=_label_positions(x, y, labels, x_range, y_range),
            customdata=list(frame["setting"]),
            hovertext=[f"ES {100 * e:.1f}" for e in frame["ES"].to_numpy(float)],
            name="settings",
            cliponaxis=False,
            marker={"color": "#444", "size": 9},
        )
    )
    fig.update_xaxes(title_text="harmonic mean of RS and DNS (%)", range=x_range)
    fig.update_yaxes(title_text="PS (%)", range=y_range)
    fig.update_layout(
        title=title or "Specificity against generalisation, one point per setting",
        margin={"l": 80, "r": 80},
    )
    return style(fig)


def strength(frame, title: str = "", metrics: Sequence[str] = ("PS", "RS", "DNS")) -> go.Figure:
    """Specificity against edit strength: one panel per metric (in %, with intervals), the x
    axis the median log-odds margin of the edited model on the edit prompts (ES margin).

    The plain margin stops and their same-budget baseline are joined by a line: the curve a
    weaker plain edit traces. Every other row (a variant) is a labelled point; a variant above
    the curve at its own ES margin does more than edit less.

    Args:
        frame: :func:`attndrift.experiments.summary.strength`.
        title: the figure title (default: what is plotted).
        metrics: the panels, in order.
    """
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics), shared_xaxes=True)
    curve = frame[frame["family"].isin(["margin stop", "baseline"])].sort_values("ES_margin")
    points = frame[~frame["family"].isin(["margin stop", "baseline"])]
    markers = ("diamond", "square", "triangle-up", "star", "cross", "x")
    for col, metric in enumerate(metrics, start=1):
        colour = METRIC_COLOURS.get(metric, VANILLA)

        def trace(part, name, mode, marker, show, colour=colour, metric=metric):
            y = 100 * part[metric].to_numpy(float)
            low = np.clip(100 * part[f"{metric}_low"].to_numpy(float), 0, 100)
            high = np.clip(100 * part[f"{metric}_high"].to_numpy(float), 0, 100)
            return go.Scatter(
                x=part["ES_margin"],
                y=y,
                mode=mode,
                name=name,
                legendgroup=name,
                showlegend=show,
                # the plain curve in the metric's colour, the variants' points in grey
                marker={
                    "color": colour if mode != "markers" else "#444",
                    "symbol": marker,
                    "size": 10,
                },
                line={"color": colour},
                error_y={
                    "type": "data",
                    "array": high - y,
                    "arrayminus": y - low,
                    "color": colour,
                    "thickness": 1,
                },
                customdata=list(part["setting"]),
                hovertemplate="%{customdata}<br>ES margin %{x:.2f}: %{y:.1f} %<extra></extra>",
            )

        if not curve.empty:
            fig.add_trace(
                trace(curve, "plain ROME: margin stops and 80 steps", "lines+markers", "circle",
                      col == 1),
                row=1, col=col,
            )  # fmt: skip
        for i, (family, part) in enumerate(points.groupby("family", sort=True)):
            fig.add_trace(
                trace(part, str(family), "markers", markers[i % len(markers)], col == 1),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text="% of probes right" if col == 1 else None, row=1, col=col)
        fig.update_xaxes(title_text="median ES margin (log-odds)", row=1, col=col)
    fig.update_yaxes(range=[-3, 103])
    fig.update_layout(
        title=title or "Specificity against edit strength",
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 90, "b": 120},
        width=1100,
        height=460,
    )
    return style(fig)

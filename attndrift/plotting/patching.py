"""Patching sweeps (:mod:`attndrift.analysis.patching`): layer x token heatmaps, one row per
direction and one column per component."""

import html
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attndrift.analysis.patching import CELL_METRICS, Patching
from attndrift.plotting.common import (
    _DIFFERENCES,
    _NATURAL,
    _TITLES,
    COMPONENT_NAMES,
    _colorbar,
    _colours,
    _of,
    _range,
    style,
    unique_labels,
)


def patching_heatmap(
    results: Patching | Sequence[Patching], metric: str = "p_true", zmax: float | None = None
) -> go.Figure:
    """Layer x token heatmaps: one row per direction, one column per component.

    The title names the prompt, the answers, the edit and the model, and states the baselines:
    the metric's value in the unpatched runs of the edited and the vanilla model (for
    ``recovery``: ``(P − P_edited) / (P_vanilla − P_edited)`` of P(o_true), 0 = the edited
    run, 1 = the vanilla run, on a diverging scale centred at 0).

    Args:
        results: one or several sweeps (e.g. restore and contaminate) of one prompt.
        metric: one of :data:`attndrift.analysis.patching.CELL_METRICS`.
        zmax: the colour range, ``[-zmax, zmax]`` for differences (default: the metric's
            natural range, widened to the data; differences without one: symmetric about 0).
    """
    results = [results] if isinstance(results, Patching) else list(results)
    if not results:
        raise ValueError("no patching results to plot")
    if metric not in CELL_METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {CELL_METRICS}")
    components = results[0].components
    titles = [f"{r.direction}: {COMPONENT_NAMES.get(c, c)}" for r in results for c in components]
    fig = make_subplots(
        rows=len(results),
        cols=len(components),
        subplot_titles=titles,
        shared_yaxes=True,
        shared_xaxes=True,
        vertical_spacing=0.1 if len(results) > 1 else 0.0,
        horizontal_spacing=0.05,
    )
    largest = 0.0
    for i, r in enumerate(results):
        if r.components != components:
            raise ValueError("every sweep must cover the same components")
        labels = unique_labels(r.tokens)
        x = [labels[p] for p in r.positions]
        values = r.metric(metric).float()
        finite = values[values.isfinite()]
        largest = max(largest, float(finite.abs().max()) if len(finite) else 0.0)
        for j in range(len(components)):
            fig.add_trace(
                go.Heatmap(
                    z=values[j].numpy(),
                    x=x,
                    y=list(range(values.shape[1])),
                    coloraxis="coloraxis",
                    hovertemplate="layer %{y}, token %{x}: %{z:.4g}<extra></extra>",
                ),
                row=i + 1,
                col=j + 1,
            )
        n_layers = values.shape[1]
        dtick = 1 if n_layers <= 16 else 2 if n_layers <= 32 else 5
        fig.update_yaxes(dtick=dtick, row=i + 1)
        fig.update_yaxes(title_text="layer (window start)", row=i + 1, col=1)
    for j in range(len(components)):  # one x title, under the bottom row
        fig.update_xaxes(title_text="token", tickangle=-45, row=len(results), col=j + 1)
    fig.update_layout(
        coloraxis=_coloraxis(metric, zmax, largest),
        title=_patching_title(results, metric),
        height=300 * len(results) + 200,
        margin={"t": 120},
    )
    return style(fig)


def _coloraxis(metric: str, zmax: float | None, largest: float) -> dict:
    """A patching figure's colour axis: ``zmax``, or the natural range widened to the data."""
    colours = _colours(metric)
    axis: dict = {"colorscale": colours["colorscale"]}
    axis["colorbar"] = _colorbar(metric)
    if zmax is not None:
        low, high = _range(metric, zmax)
    elif metric in _NATURAL:
        low, high = _NATURAL[metric]
        if metric in _DIFFERENCES:
            high = max(high, largest)
            low = -high
    elif metric in _DIFFERENCES:
        high = max(largest, 1e-12)
        low = -high
    else:
        return axis
    return axis | {"cmin": low, "cmax": high}


def _patching_title(results: Sequence[Patching], metric: str) -> str:
    r0 = results[0]
    edited = next((r.target if r.direction == "restore" else r.source for r in results), None)
    vanilla = r0.source if r0.direction == "restore" else r0.target
    base = metric if metric in ("p_true", "p_new", "logit_diff") else "p_true"
    name = {"p_true": "P(o_true)", "p_new": "P(o_new)", "logit_diff": "logit diff"}[base]
    baselines = (
        f"unpatched {name}: vanilla {getattr(vanilla, base):.4f}, edited "
        f"{getattr(edited, base):.4f}"
    )
    what = _TITLES[metric] if metric != "recovery" else (
        "recovery of P(o_true): (P − P_edited) / (P_vanilla − P_edited)"
    )  # fmt: skip
    windows = sorted({r.window for r in results})
    window = f"windows of {'/'.join(map(str, windows))} layer{'s' if windows != [1] else ''}"
    return (
        f"{what} after patching{_of(r0.edit, r0.model)}<br><sub>{html.escape(r0.prompt)} → "
        f"o_true {html.escape(r0.target_true)}, o_new {html.escape(r0.target_new)}; "
        f"{baselines}; {window}</sub>"
    )
